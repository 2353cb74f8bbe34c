"""Theorem 14 terms of each Conv2d's circular-model norm along a run (``conv_norm_every``),
conv_norm.csv, and its prediction in ``lipverify report`` (issue 16, last piece)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lipverify import LipverifyError
from lipverify import conv_dynamics as cd
from lipverify.commands.report import report_run
from lipverify.records import read_json, read_steps
from lipverify.training import TrainConfig, _Run, train

#: the paper's ConvNet on 32x32 inputs, padding 1: conv1 sees 32x32, conv2 16x16, conv3 8x8 (after
#: two 2x2 max-pools); the circular model lives on the zero-padded grids
PADDED_GRIDS = {"conv1": (34, 34), "conv2": (18, 18), "conv3": (10, 10)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def tiny(**kw) -> TrainConfig:
    base = dict(
        model="convnet",
        train_size=64,
        batch_size=8,
        steps=3,
        checkpoint_every=2,
        lr=0.05,
        sharpness_every=0,
        dtype="float64",
        conv_norm_every=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _loop_reference_grads(model, x, y, name):
    """Per-sample gradients of ``name``.weight by one ordinary backward pass per sample (no torch.func)."""
    out = []
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append(dict(model.named_parameters())[f"{name}.weight"].grad.detach().clone())
    return torch.stack(out)


def test_terms_equal_conv_norm_terms_on_loop_gradients_and_a_wrong_variant_is_rejected():
    """One step of a run: each layer's recorded norm, mu, psi, phi equal :func:`conv_norm_terms` on
    per-sample gradients from single-sample backward passes on the same batch, on the padded grid.
    The wrong variant (every per-sample gradient replaced by the batch mean) gives phi = psi = 0 and
    is rejected by the same comparison."""
    config = tiny(steps=1)
    run = _Run(config)
    before = copy.deepcopy(run.model)
    drawn = []
    real_batch = run.batch

    def keep_batch():
        drawn.append(real_batch())
        return drawn[-1]

    run.batch = keep_batch
    run.train_step()
    row = run.conv_norm_row
    x, y = drawn[0]
    assert run.conv_grids() == PADDED_GRIDS
    for name, grid in PADDED_GRIDS.items():
        G = _loop_reference_grads(before, x, y, name)
        W = dict(before.named_parameters())[f"{name}.weight"].detach()
        ref = cd.conv_norm_terms(W, G, config.lr, grid, population_size=len(run.data), name=name)
        # float64 throughout: vmap and the loop sum the same products in different orders
        for key, value in (
            ("norm", ref.terms.sigma),
            ("mu", ref.terms.mu),
            ("psi", ref.terms.psi),
            ("phi", ref.terms.phi),
        ):
            assert row[f"{name}.{key}"] == pytest.approx(value, rel=1e-9, abs=1e-15), (name, key)
        assert ref.terms.phi > 0 and ref.terms.psi != 0
        wrong = cd.conv_norm_terms(
            W, G.mean(0).expand_as(G), config.lr, grid, population_size=len(run.data), name=name
        )
        assert wrong.terms.phi < 1e-12 * ref.terms.phi  # zero up to the rounding of G_i - G_bar
        assert row[f"{name}.phi"] != pytest.approx(wrong.terms.phi, rel=1e-9, abs=1e-15)
        assert row[f"{name}.frequency_flagged"] == ref.terms.degenerate
        assert row[f"{name}.near_tie"] == ref.near_tie


def test_run_writes_conv_norm_csv_and_the_report_compares_prediction_and_observation(tmp_path, capsys):
    out = train(tiny(conv_norm_every=2, steps=5), tmp_path, progress=False)
    _, rows = read_steps(out / "conv_norm.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]  # every k steps, then the norms at W_T
    assert all(r["conv1.mu"] is not None for r in rows[:-1]) and rows[-1]["conv1.mu"] is None
    for r in rows[:-1]:
        for name in PADDED_GRIDS:
            assert math.isfinite(r[f"{name}.mu"]) and r[f"{name}.phi"] > 0 and r[f"{name}.norm"] > 0
    # the recorded norm is the circular-model norm of the run's weights (checkpoint at W_T)
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    for name, grid in PADDED_GRIDS.items():
        assert rows[-1][f"{name}.norm"] == pytest.approx(
            cd.circular_conv_norm(state[f"{name}.weight"], grid), rel=1e-12
        )
    report_run(out)
    block = read_json(out / "summary.json")["conv_norm_dynamics"]
    assert set(block) == set(PADDED_GRIDS)
    for p in block.values():
        assert p["records"] == 3 and p["steps"] == 5
        assert p["observed_log_change"] == pytest.approx(math.log(p["norm_T"] / p["norm_0"]), rel=1e-12)
    assert (out / "conv_norm.png").stat().st_size > 0
    assert "conv norm dynamics" in capsys.readouterr().out


def test_recording_leaves_the_trajectory_unchanged_and_a_global_rng_user_is_caught(tmp_path, monkeypatch):
    """Dropout draws from torch's global RNG and the per-sample pass runs in training mode (its own
    masks): unless the stream is forked, every later mask shifts. The leaky variant is rejected."""
    plain = train(tiny(dropout=0.3, conv_norm_every=0), tmp_path / "plain", progress=False)
    recorded = train(tiny(dropout=0.3), tmp_path / "rec", progress=False)
    assert read_steps(plain / "steps.csv")[1] == read_steps(recorded / "steps.csv")[1]
    real = cd.conv_norm_record

    def leaky(*args, **kwargs):
        torch.rand(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cd, "conv_norm_record", leaky)
    leaked = train(tiny(dropout=0.3), tmp_path / "leak", progress=False)
    assert read_steps(plain / "steps.csv")[1] != read_steps(leaked / "steps.csv")[1]


def test_resumed_run_records_the_same_terms(tmp_path):
    config = tiny(steps=4)
    full = train(config, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    train(config, part, progress=False, stop_after=3)  # stopped after step 3, checkpoint at 2
    train(config, part, progress=False)
    assert read_steps(full / "conv_norm.csv")[1] == read_steps(part / "conv_norm.csv")[1]


def test_prediction_holds_terms_between_records():
    """m and v by hand for records at steps 0 and 2 (terms held 2 steps each) and a last row at 3."""
    rows = [
        {
            "step": 0,
            "c.norm": 2.0,
            "c.mu": 0.01,
            "c.mu_full": None,
            "c.psi": 0.002,
            "c.phi": 0.1,
            "c.frequency_flagged": 0,
            "c.near_tie": 1,
        },
        {
            "step": 2,
            "c.norm": 2.1,
            "c.mu": -0.02,
            "c.mu_full": None,
            "c.psi": 0.001,
            "c.phi": 0.2,
            "c.frequency_flagged": 1,
            "c.near_tie": 0,
        },
        {
            "step": 3,
            "c.norm": 2.05,
            "c.mu": None,
            "c.mu_full": None,
            "c.psi": None,
            "c.phi": None,
            "c.frequency_flagged": None,
            "c.near_tie": None,
        },
    ]
    p = cd.conv_norm_prediction(rows)["c"]
    d0 = (0.01 + 0.002) / 2.0 - (0.1 / 2.0) ** 2 / 2  # Ito: d ln s = ds / s - (ds)^2 / (2 s^2)
    d1 = (-0.02 + 0.001) / 2.1 - (0.2 / 2.1) ** 2 / 2
    v = 2 * (0.1 / 2.0) ** 2 + (0.2 / 2.1) ** 2
    assert p["series"]["mean"] == pytest.approx(
        [math.log(2.0), math.log(2.0) + 2 * d0, math.log(2.0) + 2 * d0 + d1]
    )
    assert p["predicted_log_change"] == pytest.approx(2 * d0 + d1)
    assert p["predicted_log_std"] == pytest.approx(math.sqrt(v))
    assert p["z_T"] == pytest.approx((math.log(2.05) - math.log(2.0) - 2 * d0 - d1) / math.sqrt(v))
    assert p["flagged_steps"] == 1 and p["near_tie_steps"] == 1
    assert p["drift"].startswith("batch mu")
    # a full-data drift on every term row makes it a forecast with that drift
    for r in rows[:2]:
        r["c.mu_full"] = 0.0
    q = cd.conv_norm_prediction(rows)["c"]
    assert q["drift"].startswith("full-data")
    assert q["predicted_log_change"] == pytest.approx(
        2 * (0.002 / 2.0 - (0.1 / 2.0) ** 2 / 2) + 0.001 / 2.1 - (0.2 / 2.1) ** 2 / 2
    )


def test_config_checks():
    with pytest.raises(LipverifyError, match="conv_norm_every needs model = 'convnet'"):
        TrainConfig(conv_norm_every=1).validate()
    with pytest.raises(LipverifyError, match="batch_norm = false"):
        TrainConfig(model="convnet", batch_norm=True, conv_norm_every=1).validate()
    with pytest.raises(LipverifyError, match="mixup = 0"):
        TrainConfig(model="convnet", mixup=0.2, conv_norm_every=1).validate()
    with pytest.raises(LipverifyError, match="conv_norm_every must be >= 0"):
        TrainConfig(model="convnet", conv_norm_every=-1).validate()
    TrainConfig(model="convnet", conv_norm_every=3).validate()


def test_record_folds_grad_scale_and_weight_decay_into_the_terms():
    """The step ``W -= lr (alpha G_B + wd W)`` is SGD at rate ``lr alpha`` on ``G + (wd / alpha) W``:
    the record equals conv_norm_terms with those; forgetting the decay (the wrong variant) changes mu.
    Also: a circular-padded layer's grid is its input grid, a zero-padded one's the padded grid."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 6 * 6, 2),
    ).double()
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    grids = cd.conv_layer_grids(model, x[:1])
    assert grids == {"0": (8, 8), "2": (6, 6)}
    lr, alpha, wd = 0.1, 2.0, 0.01
    row = cd.conv_norm_record(model, F.cross_entropy, x, y, lr, grids, 0, weight_decay=wd, grad_scale=alpha)
    for name, grid in grids.items():
        G = _loop_reference_grads(model, x, y, name)
        W = dict(model.named_parameters())[f"{name}.weight"].detach()
        ref = cd.conv_norm_terms(W, G, lr * alpha, grid, mean_grad=G.mean(0) + (wd / alpha) * W)
        assert row[f"{name}.mu"] == pytest.approx(ref.terms.mu, rel=1e-9)
        assert row[f"{name}.psi"] == pytest.approx(ref.terms.psi, rel=1e-9)
        assert row[f"{name}.phi"] == pytest.approx(ref.terms.phi, rel=1e-9)
        no_decay = cd.conv_norm_terms(W, G, lr * alpha, grid)
        assert row[f"{name}.mu"] != pytest.approx(no_decay.terms.mu, rel=1e-6)


def test_dilated_conv_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, dilation=2))
    with pytest.raises(LipverifyError, match="dilation"):
        cd.conv_layer_grids(model, torch.zeros(1, 1, 8, 8))
