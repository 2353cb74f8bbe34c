"""experiments/conv_norm_dynamics.py on a tiny run: the recorded exact norms, the Theorem 14 forecast
and the realised one-step Taylor check, with a wrong Hessian form rejected by the same check."""

import functools
import importlib.util
import json
import math
from pathlib import Path

import torch

from lipverify import conv_dynamics as cd

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "conv_norm_dynamics.py"
TINY = dict(steps=4, n_train=64, size=6, channels=2, batch_size=8)


def load_script():
    spec = importlib.util.spec_from_file_location("conv_norm_dynamics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def second_to_first_order_ratio(result, name):
    t = result["layers"][name]["one_step_taylor"]
    return t["mean_abs_residual_second_order"] / t["mean_abs_residual_first_order"]


def test_tiny_run_records_exact_norms_and_forecast(tmp_path):
    exp = load_script()
    out = tmp_path / "r.json"
    result = exp.main([f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()] + [f"--out={out}"])
    assert json.loads(out.read_text())["config"]["steps"] == TINY["steps"]
    torch.manual_seed(0)  # the script's model seed: the first observed norm is the initial weight's
    model = exp.CircularConvNet(TINY["channels"], TINY["size"]).double()
    grid = (TINY["size"], TINY["size"])
    for name in exp.CONV_LAYERS:
        layer = result["layers"][name]
        weight = getattr(model, name).weight.detach()
        assert math.isclose(layer["observed_norm_0"], cd.circular_conv_norm(weight, grid), rel_tol=1e-14)
        series = layer["series"]
        assert len(series["observed_log"]) == TINY["steps"] + 1 == len(series["predicted_log_mean"])
        assert all(math.isfinite(v) for v in series["predicted_log_mean"] + series["predicted_log_var"])
        assert series["predicted_log_var"][-1] > 0 and 0.0 <= layer["band_coverage_2std"] <= 1.0
        # the realised step: Delta||conv|| = first order + eta^2/2 q + O(eta^3), so the second-order
        # residual is a factor ~ eta ||E|| / gap (<< 0.01 here) below the first-order one
        assert layer["one_step_taylor"]["steps_compared"] >= 1
        assert second_to_first_order_ratio(result, name) < 0.01


def test_tiny_run_rejects_the_real_formula_hessian(monkeypatch):
    exp = load_script()
    wrong = functools.partial(cd.complex_hessian_quadratic_form, variant="real_formula")
    monkeypatch.setattr(cd, "complex_hessian_quadratic_form", wrong)
    result = exp.run(**TINY)
    # without Im(u^H E v)^2 / sigma_1 an O(eta^2) error remains: the same check fails
    assert any(second_to_first_order_ratio(result, name) > 0.01 for name in exp.CONV_LAYERS)
