"""Per-sample early exit: converged samples leave the solve, nothing else changes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deq.solvers
from deq import SOLVERS, DEQClassifier, DEQFixedPoint, ModelConfig, ResNetCell
from deq.evaluate import evaluate, report
from deq.solvers import PerSample, get_solver

BUILT_IN = ("anderson", "broyden", "forward")


def spread_problem(batch: int = 6, dim: int = 16, seed: int = 0):
    """Per-sample linear maps z -> A_b z + x_b with contraction rates 0.2 ... 0.9, so the samples
    converge after very different numbers of iterations. Returns (fn, x, calls): fn(z, x) is the
    map (of any subset of the samples, given its x), calls lists the batch size of each call."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=g, dtype=torch.float64)
    rates = torch.linspace(0.2, 0.9, batch, dtype=torch.float64)
    A = A * (rates / torch.linalg.matrix_norm(A, ord=2))[:, None, None]
    x = torch.cat((torch.randn(batch, dim, generator=g, dtype=torch.float64), A.flatten(1)), 1)
    calls: list[int] = []

    def fn(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        calls.append(z.shape[0])
        b, a = x[:, :dim], x[:, dim:].view(-1, dim, dim)
        return torch.einsum("bij,bj->bi", a, z) + b

    return fn, x, calls


@pytest.mark.parametrize("name", BUILT_IN)
def test_early_exit_changes_only_the_work(name):
    fn, x, calls = spread_problem()
    z0 = torch.zeros(x.shape[0], 16, dtype=torch.float64)
    solve = get_solver(name)
    z_full, full = solve(PerSample(fn, x), z0, tol=1e-8, max_iter=200)
    full_calls = list(calls)
    calls.clear()
    z_exit, exit_ = solve(PerSample(fn, x), z0, tol=1e-8, max_iter=200, early_exit=True)
    assert full.converged and exit_.converged and exit_.early_exit and not full.early_exit
    assert torch.equal(exit_.sample_evals, full.sample_evals)  # each sample's own count
    assert exit_.n_evals == full.n_evals and len(exit_.trace) == len(full.trace)
    assert (exit_.sample_residuals < 1e-8).all()
    # every sample is back in its place, with the answer it has in the full batch: its first
    # iterate below tol, whatever the rest of the batch did afterwards
    assert torch.equal(z_exit, z_full)
    assert torch.equal(exit_.sample_residuals, full.sample_residuals)
    assert sum(calls) < sum(full_calls) and calls[-1] < x.shape[0]
    assert sum(calls) == int(exit_.sample_evals.sum())  # f ran only on samples not yet converged


@pytest.mark.parametrize("name", BUILT_IN)
def test_device_side_bookkeeping_matches_the_host_side(monkeypatch, name):
    """On CUDA the Monitor keeps its bookkeeping on the device; run that path on the CPU."""
    fn, x, _ = spread_problem()
    z0 = torch.zeros(x.shape[0], 16, dtype=torch.float64)
    solve = get_solver(name)
    for early_exit in (False, True):
        z_host, host = solve(PerSample(fn, x), z0, tol=1e-8, max_iter=200, early_exit=early_exit)
        with monkeypatch.context() as patch:
            patch.setattr(deq.solvers, "HOST_BOOKKEEPING", ())
            z_dev, dev = solve(PerSample(fn, x), z0, tol=1e-8, max_iter=200, early_exit=early_exit)
            # checks every 3rd iteration: samples leave the solve only at checks
            z_sparse, sparse = solve(
                PerSample(fn, x), z0, tol=1e-8, max_iter=200, early_exit=early_exit, check_every=3
            )
        torch.testing.assert_close(z_dev, z_host, atol=1e-12, rtol=0)
        assert dev.trace == pytest.approx(host.trace) and torch.equal(dev.sample_evals, host.sample_evals)
        assert sparse.converged and torch.equal(sparse.sample_evals, host.sample_evals)
        assert (sparse.sample_residuals < 1e-8).all()


def test_divergence_is_still_reported_with_early_exit():
    """Sample 0 converges (and leaves the solve), sample 1 overflows: the solve says so."""
    calls = []

    def fn(z, scale):
        calls.append(z.shape[0])
        return scale * z * z + 1.0

    scale = torch.tensor([[0.01], [1.0]], dtype=torch.float64)
    z0 = torch.zeros(2, 4, dtype=torch.float64)
    z, stats = SOLVERS["forward"](PerSample(fn, scale), z0, tol=1e-6, max_iter=100, early_exit=True)
    assert stats.diverged and not stats.converged
    assert "diverged" in stats.message
    assert stats.sample_residuals[0] < 1e-6 and int(stats.sample_evals[1]) == 100
    assert stats.n_evals < 100
    assert calls[-1] == 1  # the converged sample had left


def test_early_exit_needs_a_per_sample_function_and_a_bool():
    f = lambda z: 0.5 * z + 1  # noqa: E731
    z0 = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="PerSample"):
        SOLVERS["anderson"](f, z0, early_exit=True)
    with pytest.raises(ValueError, match="early_exit"):
        SOLVERS["anderson"](PerSample(lambda z, x: 0.5 * z + x, z0 + 1), z0, early_exit=1)
    assert SOLVERS["anderson"](f, z0, early_exit=False)[1].converged  # off: any f will do


def small_layer(**kwargs) -> tuple[DEQFixedPoint, torch.Tensor]:
    torch.manual_seed(0)
    layer = DEQFixedPoint(ResNetCell(8, 16, 4, 0.05), tol=1e-5, max_iter=200, **kwargs).double()
    return layer, torch.randn(5, 8, 6, 6, dtype=torch.float64)  # float64: the counts do not
    # depend on rounding, which differs with the batch's size in a convolution


def test_layer_turns_early_exit_on_for_batches():
    layer, x = small_layer()
    with torch.no_grad():
        assert layer.eval().solve(x)[1].early_exit
        assert not layer.solve(x[:1])[1].early_exit  # one sample: nothing to retire
        assert not layer.solve(x, observe=lambda fz: None)[1].early_exit  # observe sees whole batches
        assert layer.train().solve(x)[1].early_exit  # training on the CPU too
        assert not layer.train().solve(x, early_exit=False)[1].early_exit
        assert not layer.eval().solve(x, early_exit=False)[1].early_exit
        z_exit, exit_ = layer.eval().solve(x)
        z_full, full = layer.solve(x, early_exit=False)
    assert torch.equal(exit_.sample_evals, full.sample_evals)
    assert (exit_.sample_residuals < 1e-5).all()
    with torch.no_grad():  # each sample is back in its place: an equilibrium for its own x
        fz = layer.f(z_exit, x)
    residual = (fz - z_exit).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)
    torch.testing.assert_close(residual, exit_.sample_residuals)
    assert z_exit.shape == z_full.shape


class BatchNormCell(nn.Module):
    def __init__(self, track_running_stats: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4, track_running_stats=track_running_stats)

    def forward(self, z, x):
        return torch.tanh(self.norm(self.conv(z)) * 0.3 + x)


def test_early_exit_is_refused_where_the_cell_mixes_samples():
    layer = DEQFixedPoint(BatchNormCell(), tol=1e-4, max_iter=50)
    x = torch.randn(4, 4, 5, 5)
    with torch.no_grad():
        with pytest.raises(ValueError, match="BatchNorm2d normalises with batch statistics"):
            layer.train().solve(x, early_exit=True)
        assert not layer.solve(x)[1].early_exit
        assert layer.eval().solve(x)[1].early_exit  # running statistics: samples independent
        batch_statistics = DEQFixedPoint(
            BatchNormCell(track_running_stats=False), tol=1e-4, max_iter=50
        ).eval()
        assert not batch_statistics.solve(x)[1].early_exit  # even in eval mode
        with pytest.raises(ValueError, match="batch statistics"):
            batch_statistics.solve(x, early_exit=True)


def test_early_exit_options_of_the_layer():
    with pytest.raises(ValueError, match="backward_kwargs: early_exit"):
        DEQFixedPoint(ResNetCell(8, 16, 4, 0.3), backward_kwargs={"early_exit": True})
    with pytest.raises(ValueError, match="backward_kwargs: early_exit"):
        ModelConfig(backward_kwargs={"early_exit": True})
    with pytest.raises(ValueError, match="solver_kwargs: early_exit must be True, False or None"):
        DEQFixedPoint(ResNetCell(8, 16, 4, 0.3), early_exit="yes")
    assert DEQFixedPoint(ResNetCell(8, 16, 4, 0.3), early_exit=None).early_exit is None  # automatic
    layer, x = small_layer(early_exit=True)  # the forward solve's option; the backward never takes it
    layer.train()
    x.requires_grad_()
    z, info = layer(x)
    z.sum().backward()
    assert info.forward.early_exit and info.backward is not None and not info.backward.early_exit
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="early_exit must be True, False or None"):
        layer.solve(x.detach(), early_exit=2)


def test_evaluate_reports_throughput_and_the_same_predictions():
    torch.manual_seed(0)
    model = DEQClassifier(ModelConfig(n_channels=16, n_inner_channels=16, n_groups=4, init_std=0.2))
    images, labels = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))
    runs = {
        ee: report(evaluate(model, images, labels, batch_size=6, tol=1e-4, max_iter=60, early_exit=ee))
        for ee in (False, True)
    }
    assert runs[True]["early_exit"] and not runs[False]["early_exit"]
    assert runs[True]["predictions_digest"] == runs[False]["predictions_digest"]
    assert runs[True]["accuracy"] == runs[False]["accuracy"]
    assert runs[True]["images_per_s"] > 0 and runs[False]["images_per_s"] > 0


def test_broyden_narrows_everything_when_samples_start_converged():
    """A warm start: sample 0 starts at its fixed point and leaves at the first check."""
    fn, x, calls = spread_problem(batch=3)
    x[0, :16] = 0  # z -> A z: its fixed point is z0 = 0
    z0 = torch.zeros(3, 16, dtype=torch.float64)
    for name in BUILT_IN:
        z, stats = get_solver(name)(PerSample(fn, x), z0, tol=1e-8, max_iter=200, early_exit=True)
        full = get_solver(name)(PerSample(fn, x), z0, tol=1e-8, max_iter=200)[1]
        assert stats.converged and int(stats.sample_evals[0]) == 1
        assert torch.equal(stats.sample_evals, full.sample_evals)
        assert stats.f_work == int(stats.sample_evals.sum()) < full.f_work == 3 * full.n_evals


def test_a_converged_sample_going_non_finite_stops_nothing():
    """Sample 0 converges, then its f turns NaN: the others go on, with or without early exit."""

    def fn(z, x):
        scale, poison = x[:, :1], x[:, 1:2]
        fz = scale * z + 1.0
        close = (z - 1 / (1 - scale)).abs().amax(1, keepdim=True) < 1e-9  # well after it converged
        return torch.where((poison > 0) & close, math.nan, fz)

    x = torch.tensor([[0.05, 1.0], [0.8, 0.0], [0.9, 0.0]], dtype=torch.float64)
    z0 = torch.zeros(3, 4, dtype=torch.float64)
    runs = [
        SOLVERS["forward"](PerSample(fn, x), z0, tol=1e-6, max_iter=300, early_exit=ee)
        for ee in (False, True)
    ]
    for z, stats in runs:
        assert stats.converged and not stats.diverged, stats.message
        assert torch.isfinite(z).all()
    assert torch.equal(runs[0][1].sample_evals, runs[1][1].sample_evals)
    assert torch.equal(runs[0][0], runs[1][0])
    # a converged sample counts with its final residual: the same finite trace in both modes
    assert runs[0][1].trace == runs[1][1].trace and all(map(math.isfinite, runs[0][1].trace))
