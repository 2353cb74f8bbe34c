"""The full-data gradient under each regulariser (issue 14): ``_Run.full_batches`` must transform the
training set as a training step transforms its batch, so that the full-data gradient (``mu_full``,
the expectation-based forecast's drift) estimates the expected step gradient ``E[g_B | W]`` of the
regularised objective, the gradient whose projection Theorem 14's drift is.

Each test has a wrong variant (the transform left out, or a different law of the random transform)
that the same check rejects."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lipverify.data import to_model_input
from lipverify.training import TrainConfig, _Run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def make_run(**kw) -> _Run:
    base = dict(train_size=40, batch_size=8, steps=2, lr=0.05, dtype="float64")
    base.update(kw)
    return _Run(TrainConfig(**base).validate())


# -- mixup -----------------------------------------------------------------------------------------


def linear_model_projections(x, target, weight, directions):
    """<grad_W mean_j CE(W x_j, t_j), D_k> for a bias-free linear model, vectorised over draws.

    x: (M, n, f), target: (M, n, classes) soft targets, weight: (classes, f), directions: (k, classes, f)
    -> (M, k). The gradient of CE with a soft target t is (softmax(W x) - t) x^T, averaged over j."""
    residual = torch.softmax(x @ weight.T, dim=-1) - target  # (M, n, c)
    xd = torch.einsum("mjf,kcf->mjkc", x, directions)
    return torch.einsum("mjc,mjkc->mk", residual, xd) / x.shape[1]


def step_law_draws(run: _Run, draws: int, gen: torch.Generator):
    """The training step's mixup (lipverify.training._Run.train_step) written out from its definition:
    a uniform batch of b samples, one lam ~ Beta(a, a), partners torch.randperm(b), loss
    lam CE(out, y) + (1 - lam) CE(out, y[perm]) = CE(out, lam e_y + (1 - lam) e_y[perm])."""
    c, n = run.config, len(run.data)
    x_all = to_model_input(run.images, "mlp", torch.float64)
    onehot = F.one_hot(run.labels, run.data.classes).double()
    beta = torch.distributions.Beta(torch.tensor(c.mixup, dtype=torch.float64), torch.tensor(c.mixup))
    xs, ts = [], []
    for _ in range(draws):
        idx = torch.randperm(n, generator=gen)[: c.batch_size]
        perm = torch.randperm(c.batch_size, generator=gen)
        lam = float(beta.sample())
        x, t = x_all[idx], onehot[idx]
        xs.append(lam * x + (1 - lam) * x[perm])
        ts.append(lam * t + (1 - lam) * t[perm])
    return torch.stack(xs), torch.stack(ts)


def full_batches_draws(run: _Run, draws: int, transform=None):
    xs, ts = [], []
    for _ in range(draws):
        chunks = list(run.full_batches()) if transform is None else [transform(run)]
        ((x, t),) = chunks  # 40 samples: one chunk
        xs.append(x)
        ts.append(t if t.dim() == 2 else F.one_hot(t, run.data.classes).double())
    return torch.stack(xs), torch.stack(ts)


def old_whole_chunk_mixup(run: _Run):
    """Wrong variant: one lam and one permutation of the whole chunk (a sample is its own partner with
    probability 1/n instead of 1/b)."""
    x = to_model_input(run.images, "mlp", torch.float64)
    lam = float(torch.distributions.Beta(run.config.mixup, run.config.mixup).sample())
    perm = torch.randperm(x.shape[0])
    onehot = F.one_hot(run.labels, run.data.classes).double()
    return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm]


def clean_chunk(run: _Run):
    """Wrong variant: the full-data gradient of the clean objective (mixup left out)."""
    return to_model_input(run.images, "mlp", torch.float64), run.labels


def mean_difference_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z of the difference of two independent sample means, per column: (M_a, k), (M_b, k) -> (k,)."""
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    return (a.mean(0) - b.mean(0)) / se


def test_mixup_partner_law_is_that_of_a_training_batch():
    # Exact law check: in a batch of b, P(partner = self) = 1/b (torch.randperm(b) fixed points), and
    # the partner is otherwise uniform; full_batches must reproduce it. Binomial 99.9% interval.
    torch.manual_seed(0)
    run = make_run(mixup=1.0)
    n, b, draws = 40, run.config.batch_size, 500
    x = to_model_input(run.images, "mlp", torch.float64)
    distinct = torch.cdist(x, x).fill_diagonal_(math.inf).min() > 0
    assert distinct  # so "partner = self" is readable from the mixed images

    def self_fraction(chunk_fn) -> float:
        hits = 0
        for _ in range(draws):
            xm, _ = chunk_fn()
            # lam x_i + (1 - lam) x_j equals x_i only for j = i (images distinct, lam < 1 a.s.)
            hits += int(torch.isclose(xm, x, rtol=0, atol=1e-12).all(1).sum())
        return hits / (draws * n)

    expected = 1 / b
    half_width = 3.29 * math.sqrt(expected * (1 - expected) / (draws * n))
    got = self_fraction(lambda: next(iter(run.full_batches())))
    assert abs(got - expected) < half_width, (got, expected, half_width)
    wrong = self_fraction(lambda: old_whole_chunk_mixup(run))
    assert abs(wrong - expected) > half_width, (wrong, expected, half_width)


def test_mixup_full_gradient_estimates_the_expected_step_gradient():
    # Monte Carlo: the mean of many full-data mixup gradients and the mean of many training-step
    # gradients (the step's law written out independently) agree on k fixed directions, for a
    # linear model where both are cheap. Two-sided z-test per direction with Bonferroni: |z| < 3.5
    # for k = 4 is a 0.2% false-alarm rate. The clean objective's gradient is rejected.
    torch.manual_seed(1)
    run = make_run(mixup=1.0)
    gen = torch.Generator().manual_seed(2)
    weight = 0.3 * torch.randn(10, 784, generator=gen, dtype=torch.float64)
    # directions fixed before any draw: the clean objective's gradient (where mixup's shrunken
    # targets show) and three random ones
    x_clean, t_clean = clean_chunk(run)
    clean_gradient = (torch.softmax(x_clean @ weight.T, -1) - F.one_hot(t_clean, 10).double()).T @ x_clean
    directions = torch.cat(
        [
            clean_gradient[None] / clean_gradient.norm(),
            torch.randn(3, 10, 784, generator=gen, dtype=torch.float64),
        ]
    )
    steps = linear_model_projections(*step_law_draws(run, 6000, gen), weight, directions)
    full = linear_model_projections(*full_batches_draws(run, 400), weight, directions)
    z = mean_difference_z(full, steps)
    assert z.abs().max() < 3.5, z
    clean = linear_model_projections(*full_batches_draws(run, 1, clean_chunk), weight, directions)
    z_clean = (clean[0] - steps.mean(0)) / (steps.var(0) / steps.shape[0]).sqrt()
    assert z_clean.abs().max() > 3.5, z_clean


def test_mixup_soft_targets_are_the_steps_two_term_loss_with_label_smoothing():
    # Cross-entropy is linear in the target, with label smoothing too, so the soft-target loss of
    # full_batches equals the step's lam CE(out, y) + (1 - lam) CE(out, y') sample by sample.
    torch.manual_seed(3)
    out = torch.randn(12, 10, dtype=torch.float64)
    y, y2 = torch.randint(0, 10, (12,)), torch.randint(0, 10, (12,))
    lam = torch.rand(12, dtype=torch.float64)
    soft = lam[:, None] * F.one_hot(y, 10).double() + (1 - lam[:, None]) * F.one_hot(y2, 10).double()
    for eps in (0.0, 0.1):
        two_term = lam * F.cross_entropy(out, y, reduction="none", label_smoothing=eps) + (
            1 - lam
        ) * F.cross_entropy(out, y2, reduction="none", label_smoothing=eps)
        soft_loss = F.cross_entropy(out, soft, reduction="none", label_smoothing=eps)
        torch.testing.assert_close(soft_loss, two_term, rtol=1e-12, atol=1e-12)
    # wrong variant: the first label only
    hard = F.cross_entropy(out, y, reduction="none", label_smoothing=0.1)
    assert not torch.allclose(hard, two_term, rtol=1e-3)


# -- FGSM ------------------------------------------------------------------------------------------


def test_fgsm_full_batches_perturb_each_sample_by_its_own_input_gradient_sign():
    # Without batch norm the sign of d(mean loss)/dx_i is the sign of sample i's own input gradient,
    # so the chunk's FGSM inputs are each sample's FGSM input, computed here one sample at a time.
    torch.manual_seed(4)
    run = make_run(model="mlp", fgsm_eps=0.03, label_smoothing=0.1)
    ((x, y),) = list(run.full_batches())
    clean = to_model_input(run.images, "mlp", torch.float64)
    expected = []
    for i in range(clean.shape[0]):
        xi = clean[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(run.loss_fn(run.model(xi), run.labels[i : i + 1]), xi)
        expected.append((clean[i : i + 1] + 0.03 * g.sign()).clamp(0, 1))
    expected = torch.cat(expected)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-15)
    assert torch.equal(y, run.labels)
    # wrong variant: the clean inputs (FGSM left out of the full-data gradient)
    assert (x - clean).abs().max() > 0.029


def test_fgsm_full_gradient_is_the_mean_of_per_sample_adversarial_gradients():
    torch.manual_seed(5)
    run = make_run(model="mlp", fgsm_eps=0.03)
    full = run.probe.full_gradient(run.full_batches(), run.loss_fn)
    clean = to_model_input(run.images, "mlp", torch.float64)
    layers = {name: getattr(run.model, name).weight for name in ("fc1", "fc2", "fc3")}
    totals = {name: torch.zeros_like(w) for name, w in layers.items()}
    for i in range(clean.shape[0]):
        xi = clean[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(run.loss_fn(run.model(xi), run.labels[i : i + 1]), xi)
        xa = (clean[i : i + 1] + 0.03 * g.sign()).clamp(0, 1)
        grads = torch.autograd.grad(run.loss_fn(run.model(xa), run.labels[i : i + 1]), list(layers.values()))
        for name, gw in zip(layers, grads, strict=True):
            totals[name] += gw
    for name in layers:
        torch.testing.assert_close(full[name], totals[name] / clean.shape[0], rtol=1e-10, atol=1e-13)
    clean_full = run.probe.full_gradient([(clean, run.labels)], run.loss_fn)
    assert not torch.allclose(clean_full["fc1"], full["fc1"], rtol=1e-3)


# -- AutoAugment (torchvision is optional: a stand-in policy checks the wiring) --------------------


def test_autoaugment_full_batches_transform_every_image(inverting_torchvision):
    run = make_run(model="convnet", autoaugment=True, train_size=20, batch_size=4)
    ((x, _),) = list(run.full_batches())
    inverted = 255 - run.images
    expected = to_model_input(inverted, "convnet", torch.float64)
    inner = (slice(None), slice(None), slice(2, 30), slice(2, 30))
    torch.testing.assert_close(x[inner], expected[inner], rtol=0, atol=1e-15)
    clean = to_model_input(run.images, "convnet", torch.float64)
    assert not torch.allclose(x[inner], clean[inner])  # wrong variant: AutoAugment left out
    assert inverting_torchvision == ["cifar10"]


# -- batch norm ------------------------------------------------------------------------------------


def batch_membership(run: _Run, chunks) -> list[list[int]]:
    """Which samples (by their distinct images) each yielded chunk holds."""
    clean = to_model_input(run.images, "convnet", torch.float64).flatten(1)
    out = []
    for x, _ in chunks:
        match = torch.cdist(x.flatten(1), clean) < 1e-9
        assert (match.sum(1) == 1).all()
        out.append(match.float().argmax(1).tolist())
    return out


@pytest.mark.parametrize("train_size", [20, 22])
def test_batch_norm_full_batches_are_a_random_partition_into_uniform_batches_of_b(train_size):
    # Training-mode batch norm makes the step gradient depend on which b samples share a batch, so
    # E[g_B] is over uniform b-subsets: every chunk must have b samples, chunks must be disjoint, and
    # two samples share a chunk with probability (b - 1)/(N - 1) (N mod b samples left out per pass).
    # Per-pair frequencies are checked against a binomial interval with a Bonferroni z = 4.
    torch.manual_seed(6)
    run = make_run(model="convnet", batch_norm=True, train_size=train_size, batch_size=4)
    n, b, draws = train_size, 4, 300
    together = torch.zeros(n, n)
    for _ in range(draws):
        members = batch_membership(run, run.full_batches())
        flat = [i for m in members for i in m]
        assert all(len(m) == b for m in members) and len(set(flat)) == len(flat) == n - n % b
        for m in members:
            idx = torch.tensor(m)
            together[idx[:, None], idx[None, :]] += 1
    p = (b - 1) / (n - 1) * (n - n % b) / n  # both in the kept part, then in the same batch
    freq = together[~torch.eye(n, dtype=torch.bool)] / draws
    assert (freq - p).abs().max() < 4 * math.sqrt(p * (1 - p) / draws), (freq.min(), freq.max(), p)


def test_batch_norm_membership_check_rejects_consecutive_chunks():
    # The same membership check on the old consecutive chunks of FULL_GRADIENT_CHUNK samples: one
    # batch of all N (batch statistics of N, not of b).
    run = make_run(model="convnet", batch_norm=False, train_size=20, batch_size=4)
    members = batch_membership(run, run.full_batches())
    assert [len(m) for m in members] != [4] * 5
