"""Solvers: fixed points of known maps, per-sample independence, stats, validation."""

from __future__ import annotations

import math

import pytest
import torch

import deq.solvers
from deq import SOLVERS, ResNetCell, anderson, broyden, forward_iteration, get_solver
from deq.solvers import DIVERGENCE_FACTOR, check_solver_kwargs

SOLVER_NAMES = sorted(SOLVERS)


def linear_problem(batch: int = 3, dim: int = 20, norm: float = 0.9, seed: int = 0):
    """z = A z + b with ||A||_2 = norm < 1 per sample; returns f, z* = (I - A)^-1 b."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=g, dtype=torch.float64)
    A = norm * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    b = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - A, b)
    return (lambda z: torch.einsum("bij,bj->bi", A, z) + b), z_star


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_reaches_known_fixed_point_float64(name):
    f, z_star = linear_problem()
    z, stats = get_solver(name)(f, torch.zeros_like(z_star), tol=1e-11, max_iter=500)
    assert stats.converged and not stats.diverged
    assert z.dtype == torch.float64 and z.shape == z_star.shape
    torch.testing.assert_close(z, z_star, atol=1e-8, rtol=0)
    assert stats.residual < 1e-11
    assert len(stats.trace) == stats.n_evals
    assert stats.trace[0] == pytest.approx(1.0)  # z0 = 0: ||f(0) - 0|| / ||f(0)||


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_float32_and_4d_shapes(name):
    torch.manual_seed(0)
    cell = ResNetCell(8, 16, 4, 0.05)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        z, stats = get_solver(name)(lambda z: cell(z, x), torch.zeros_like(x), tol=1e-5, max_iter=500)
        assert z.dtype == torch.float32 and z.shape == x.shape
        assert stats.converged
        assert (cell(z, x) - z).norm() / cell(z, x).norm() < 1e-4


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.8])
def test_anderson_mixing_beta(beta):
    f, z_star = linear_problem(norm=0.8)
    z, stats = anderson(f, torch.zeros_like(z_star), tol=1e-10, max_iter=300, beta=beta)
    assert stats.converged
    torch.testing.assert_close(z, z_star, atol=1e-8, rtol=0)


def test_anderson_needs_fewer_evaluations_than_forward_on_seed_cell():
    torch.manual_seed(0)
    cell = ResNetCell(48, 64, 8, 0.01)
    x = torch.randn(2, 48, 32, 32)
    f = lambda z: cell(z, x)
    with torch.no_grad():
        _, a = anderson(f, torch.zeros_like(x), tol=1e-4, max_iter=200)
        _, fw = forward_iteration(f, torch.zeros_like(x), tol=1e-4, max_iter=200)
        _, over = anderson(f, torch.zeros_like(x), tol=1e-4, max_iter=200, beta=2.0)
        _, damped = anderson(f, torch.zeros_like(x), tol=1e-4, max_iter=200, beta=0.5)
    assert a.converged and fw.converged and over.converged and damped.converged
    assert a.n_evals * 1.5 < fw.n_evals


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_batch_of_two_equals_two_batches_of_one(name):
    # A fixed budget (tol unreachable), so both runs do the same iterations.
    f2, _ = linear_problem(batch=2, norm=0.95)
    solver = get_solver(name)
    z2, s2 = solver(f2, torch.zeros(2, 20, dtype=torch.float64), tol=1e-30, max_iter=12)
    for i in range(2):
        fi = lambda z, i=i: f2(torch.cat([z if j == i else torch.zeros_like(z) for j in range(2)]))[i : i + 1]
        zi, si = solver(fi, torch.zeros(1, 20, dtype=torch.float64), tol=1e-30, max_iter=12)
        torch.testing.assert_close(z2[i : i + 1], zi, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(
            s2.sample_residuals[i : i + 1], si.sample_residuals, atol=1e-14, rtol=1e-10
        )
    assert s2.n_evals == 12 and not s2.converged


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_callback_sees_every_iteration(name):
    f, z_star = linear_problem()
    seen = []
    _, stats = get_solver(name)(
        f, torch.zeros_like(z_star), tol=1e-6, max_iter=100, callback=lambda k, r: seen.append((k, r))
    )
    assert [k for k, _ in seen] == list(range(stats.n_evals))
    assert [r for _, r in seen] == pytest.approx(stats.trace)


def test_check_every_keeps_result_and_may_overshoot():
    f, z_star = linear_problem()
    z1, s1 = anderson(f, torch.zeros_like(z_star), tol=1e-9, max_iter=200, check_every=1)
    z5, s5 = anderson(f, torch.zeros_like(z_star), tol=1e-9, max_iter=200, check_every=5)
    assert s1.converged and s5.converged
    assert s1.n_evals <= s5.n_evals < s1.n_evals + 5
    torch.testing.assert_close(z5, z_star, atol=1e-7, rtol=0)


def test_best_iterate_returned_when_budget_runs_out():
    # f(z) = -2z + 3 moves away from its fixed point 1: z0 = 0 stays the best iterate.
    z, stats = forward_iteration(lambda z: -2 * z + 3, torch.zeros(1, 4), tol=1e-6, max_iter=6)
    assert not stats.converged
    assert stats.trace[0] == pytest.approx(1.0) and max(stats.trace[1:]) > 1.0
    assert torch.equal(z, torch.zeros(1, 4))
    assert stats.residual == pytest.approx(1.0)
    assert "not converged" in stats.message


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_non_finite_values_are_reported(name):
    def f(z):  # finite at z0 = 0, NaN from the first step on
        return torch.where(z == 0, torch.ones_like(z), torch.full_like(z, math.nan))

    z, stats = get_solver(name)(f, torch.zeros(2, 3), tol=1e-6, max_iter=10)
    assert stats.diverged and not stats.converged
    assert "non-finite" in stats.message
    assert torch.isfinite(z).all() and torch.isfinite(stats.sample_residuals).all()


def test_growing_residual_is_reported_as_divergence():
    # f ignores z and replays a script: the residual falls to ~1e-3, then explodes.
    script = iter([1.0, 1.001, 1.0, 1e-9, 1e-9, 1e-9])
    f = lambda z: torch.full_like(z, next(script))
    _, stats = forward_iteration(f, torch.zeros(1, 2), tol=1e-6, max_iter=6)
    assert stats.diverged
    assert f"{DIVERGENCE_FACTOR:g}x" in stats.message
    assert stats.residual < 1e-2  # best iterate kept


def test_max_iter_one_evaluates_once():
    f, z_star = linear_problem()
    for solver in SOLVERS.values():
        z, stats = solver(f, torch.zeros_like(z_star), tol=1e-3, max_iter=1)
        assert stats.n_evals == 1 and torch.equal(z, torch.zeros_like(z_star))


BAD_ARGS = [
    ("tol", 0.0), ("tol", -1e-3), ("tol", math.nan), ("tol", "1e-3"),
    ("max_iter", 0), ("max_iter", 2.5), ("max_iter", True),
    ("check_every", 0), ("callback", 3),
]  # fmt: skip
BAD_ANDERSON = [("m", 0), ("m", 1.5), ("beta", 0.0), ("beta", -1.0), ("beta", math.inf), ("lam", -1e-4)]


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("arg,value", BAD_ARGS)
def test_bad_arguments_raise_value_error_naming_them(name, arg, value):
    with pytest.raises(ValueError, match=arg):
        get_solver(name)(lambda z: z, torch.zeros(1, 2), **{arg: value})


@pytest.mark.parametrize("arg,value", BAD_ANDERSON)
def test_bad_anderson_arguments(arg, value):
    with pytest.raises(ValueError, match=arg):
        anderson(lambda z: z, torch.zeros(1, 2), **{arg: value})


def test_bad_z0_and_unknown_names():
    with pytest.raises(ValueError, match="z0"):
        broyden(lambda z: z, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="solver must be one of"):
        get_solver("newton")
    with pytest.raises(ValueError, match="unknown option"):
        check_solver_kwargs("forward", {"beta": 1.0})
    with pytest.raises(TypeError):
        forward_iteration(lambda z: z, torch.zeros(1, 2), beta=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_cuda(name):
    f, z_star = linear_problem()
    A_dev = lambda z: f(z.cpu()).cuda()
    z, stats = get_solver(name)(A_dev, torch.zeros_like(z_star).cuda(), tol=1e-10, max_iter=500)
    assert z.is_cuda and stats.converged
    torch.testing.assert_close(z.cpu(), z_star, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_sample_evals_equal_solving_each_sample_alone(name):
    """Per-sample f-evaluation counts: what each sample would need if solved on its own."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 20, 20, generator=g, dtype=torch.float64)
    rates = torch.tensor([0.2, 0.5, 0.8, 0.95], dtype=torch.float64)  # counts differ per sample
    A = rates[:, None, None] * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    b = torch.randn(4, 20, generator=g, dtype=torch.float64)

    def problem(rows: slice):
        return lambda z: torch.einsum("bij,bj->bi", A[rows], z) + b[rows]

    solve = get_solver(name)
    _, stats = solve(problem(slice(None)), torch.zeros_like(b), tol=1e-6, max_iter=300)
    alone = [
        int(solve(problem(slice(i, i + 1)), b[:1] * 0, tol=1e-6, max_iter=300)[1].sample_evals[0])
        for i in range(4)
    ]
    assert stats.sample_evals.tolist() == alone
    assert stats.n_evals == max(alone) and len(set(alone)) > 1


def test_sample_evals_of_a_sample_cut_short_by_a_divergence_is_max_iter():
    f, z_star = linear_problem(batch=2, norm=0.9)
    blow_up = torch.tensor([1.0, 0.0], dtype=torch.float64)[:, None]
    g = lambda z: f(z) + blow_up * 1e6 * z.abs().sum(1, keepdim=True) ** 2  # noqa: E731  (sample 0 explodes)
    _, stats = forward_iteration(g, torch.zeros_like(z_star), tol=1e-8, max_iter=300)
    assert stats.diverged and stats.n_evals < 300
    assert stats.sample_evals.tolist() == [300, 300]  # neither reached tol: counted as max_iter


def test_sample_evals_of_an_unconverged_sample_is_the_solve_length():
    f, z_star = linear_problem(batch=2, norm=0.99)
    _, stats = forward_iteration(f, torch.zeros_like(z_star), tol=1e-12, max_iter=7)
    assert stats.sample_evals.tolist() == [7, 7] and not stats.converged


@pytest.mark.parametrize("lam", [0.0, 1e-4])
def test_anderson_weights_in_python_match_the_batched_solve(monkeypatch, lam):
    """Small CPU batches solve Anderson's least-squares problems in Python floats."""
    f, z_star = linear_problem(batch=3, norm=0.95)
    z_host, host = anderson(f, torch.zeros_like(z_star), tol=1e-10, max_iter=300, lam=lam)
    monkeypatch.setattr(deq.solvers, "HOST_WEIGHTS_MAX_BATCH", 0)
    z_tensor, tensor = anderson(f, torch.zeros_like(z_star), tol=1e-10, max_iter=300, lam=lam)
    assert host.converged and tensor.converged
    assert torch.equal(host.sample_evals, tensor.sample_evals)
    torch.testing.assert_close(z_host, z_tensor, atol=1e-9, rtol=0)
    torch.testing.assert_close(z_host, z_star, atol=1e-8, rtol=0)
