"""DEQ layer: exact implicit gradients (gradcheck), phantom gradients, memory, modes, errors."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.func import functional_call

from deq import DEQFixedPoint, ResNetCell, spectral_radius, unroll


def small_cell(dtype=torch.float64, channels: int = 4, groups: int = 2, std: float = 0.1) -> ResNetCell:
    """A contractive cell small enough for finite differences."""
    torch.manual_seed(0)
    return ResNetCell(channels, channels, groups, std).to(dtype)


def tight(solver="anderson", **extra) -> dict:
    kw = {"tol": 1e-12, "max_iter": 500}
    return {"solver": solver, **kw, "backward_kwargs": dict(kw), **extra}


@pytest.mark.parametrize(
    "solver,channels,groups,fast_mode",
    [("anderson", 2, 1, False), ("broyden", 2, 1, False), ("anderson", 4, 2, True), ("forward", 4, 2, True)],
)
def test_gradcheck_input_and_parameters(solver, channels, groups, fast_mode):
    """Implicit gradient w.r.t. the input x and every parameter of f, against finite differences
    (fast_mode checks a random projection of the Jacobian: cheaper, for the bigger cell)."""
    layer = DEQFixedPoint(small_cell(channels=channels, groups=groups), **tight(solver))
    params = dict(layer.named_parameters())
    names = list(params)
    x = torch.randn(1, channels, 2, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, *weights):
        return functional_call(layer, dict(zip(names, weights, strict=True)), (x,))[0]

    inputs = (x, *(params[n].detach().clone().requires_grad_() for n in names))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode)


def grads(layer: DEQFixedPoint, x: torch.Tensor) -> torch.Tensor:
    layer.zero_grad()
    x = x.clone().requires_grad_()
    z, _ = layer(x)
    (z * torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z)).sum().backward()
    return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in layer.parameters()])


def test_phantom_gradient_approximates_implicit_gradient():
    cell = small_cell()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    exact = grads(DEQFixedPoint(cell, **tight()), x)
    one_step = grads(DEQFixedPoint(cell, **tight(), backward="phantom"), x)
    many = grads(DEQFixedPoint(cell, **tight(), backward="phantom", phantom_steps=200), x)
    cos = torch.nn.functional.cosine_similarity(exact, one_step, dim=0)
    assert 0.5 < cos < 1 - 1e-6  # a cheap approximation, not the exact gradient
    torch.testing.assert_close(many, exact, atol=1e-8, rtol=1e-6)  # k steps -> implicit as k grows


def count_saved_tensors(fn) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


def test_memory_does_not_grow_with_solver_iterations():
    cell = small_cell(torch.float32)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)

    def deq_forward(n):  # tol unreachable: exactly n iterations
        return lambda: DEQFixedPoint(cell, solver="forward", tol=1e-30, max_iter=n)(x)

    saved_deq = [count_saved_tensors(deq_forward(n)) for n in (10, 100)]
    saved_unrolled = [count_saved_tensors(lambda n=n: unroll(cell, x, n)) for n in (10, 100)]
    assert saved_deq[0] == saved_deq[1] > 0
    assert saved_unrolled[1] > 5 * saved_unrolled[0]  # what the implicit backward avoids


def test_no_grad_inference_mode_eval_and_train():
    layer = DEQFixedPoint(small_cell(torch.float32), tol=1e-4, max_iter=50)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            z, info = layer(x)
        assert not z.requires_grad and info.backward is None and info.forward.converged
    for mode in (layer.eval, layer.train):
        mode()
        z, info = layer(x)
        z.sum().backward()
        assert info.backward is not None and info.backward.converged
        assert x.grad is not None and torch.isfinite(x.grad).all()
        x.grad = None


def test_stats_belong_to_each_call():
    layer = DEQFixedPoint(small_cell(torch.float32), tol=1e-4, max_iter=50)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    z1, info1 = layer(x)
    z2, info2 = layer(2 * x)
    z2.sum().backward()
    assert info1.backward is None and info2.backward is not None
    assert info1.forward is not info2.forward


def test_concurrent_solves_with_different_options():
    layer = DEQFixedPoint(small_cell(torch.float32), tol=1e-2, max_iter=50)
    x = torch.randn(1, 4, 5, 5)
    results = {}

    def run(tol):
        with torch.inference_mode():
            results[tol] = layer.solve(x, tol=tol, max_iter=200)[1]

    threads = [threading.Thread(target=run, args=(tol,)) for tol in (1e-2, 1e-6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[1e-2].residual < 1e-2 and results[1e-6].residual < 1e-6
    assert results[1e-6].n_evals > results[1e-2].n_evals
    assert layer.solver_kwargs == {"tol": 1e-2, "max_iter": 50}  # nothing stored on the module


def test_solve_with_another_solver_and_callback():
    layer = DEQFixedPoint(small_cell(torch.float32), m=3, tol=1e-3)
    x = torch.randn(1, 4, 5, 5)
    seen = []
    _, stats = layer.solve(x, solver="forward", tol=1e-4, max_iter=300, callback=lambda k, r: seen.append(r))
    assert stats.solver == "forward" and stats.converged and len(seen) == stats.n_evals


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"solver": "newton"}, "solver must be one of"),
        ({"backward": "exact"}, "backward must be one of"),
        ({"tolerance": 1e-3}, "unknown option"),
        ({"solver": "forward", "m": 5}, "unknown option"),
        ({"backward_kwargs": {"beta": 2.0}, "backward_solver": "broyden"}, "backward_kwargs"),
        ({"phantom_steps": 0}, "phantom_steps"),
    ],
)
def test_bad_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DEQFixedPoint(small_cell(), **kwargs)


def test_bad_per_call_options():
    layer = DEQFixedPoint(small_cell(torch.float32))
    with pytest.raises(ValueError, match="unknown option"):
        layer.solve(torch.zeros(1, 4, 3, 3), solver="forward", beta=2.0)
    with pytest.raises(ValueError, match="beta"):
        layer.solve(torch.zeros(1, 4, 3, 3), beta=-1.0)


def test_autocast_bf16_keeps_solver_state_in_float32():
    layer = DEQFixedPoint(small_cell(torch.float32), tol=1e-2, max_iter=30)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        z, info = layer(x)
        z_star, stats = layer.solve(x)
    z.float().sum().backward()
    assert z_star.dtype == torch.float32 and stats.converged and info.forward.converged
    assert info.backward is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_jacobian_penalty_estimates_frobenius_norm_and_trains(backward):
    cell = small_cell(channels=2, groups=1, std=0.3)
    layer = DEQFixedPoint(cell, backward=backward, **{k: v for k, v in tight().items() if k != "solver"})
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    z_star, _ = layer.solve(x)
    exact = (
        torch.autograd.functional.jacobian(lambda z: cell(z, x.detach()), z_star).pow(2).sum()
        / z_star.numel()
    )
    estimates = torch.stack(
        [layer(x, jacobian_penalty=True)[1].jacobian_penalty.detach() for _ in range(400)]
    )
    assert estimates.mean().item() == pytest.approx(exact.item(), rel=0.15)
    z, info = layer(x, jacobian_penalty=True)
    (z.sum() + info.jacobian_penalty).backward()  # both graphs backpropagate, the hook included
    assert cell.conv1.weight.grad is not None and torch.isfinite(x.grad).all()
    assert (info.backward is not None) == (backward == "implicit")


@pytest.mark.parametrize("steps", [1, 3])
def test_phantom_shares_the_regularisers_f_evaluation(steps):
    """With the Jacobian penalty, the phantom's first step is the regulariser's f(z*): one f
    call fewer, and the same gradients as computing the two separately."""
    cell = small_cell(std=0.2)
    layer = DEQFixedPoint(cell, backward="phantom", phantom_steps=steps, **tight())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    handle = cell.register_forward_hook(count)
    layer.solve(x)
    solve_calls, calls = calls, 0
    torch.manual_seed(1)  # the penalty's random projection
    z, info = layer(x, jacobian_penalty=True)
    handle.remove()
    assert calls - solve_calls == steps  # the regulariser's f(z*), then steps - 1 more
    (z.square().sum() + info.jacobian_penalty).backward()
    shared = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in cell.parameters()])

    # the same loss, the penalty and the phantom steps built from separate f-evaluations
    x.grad = None
    cell.zero_grad()
    z_star, _ = layer.solve(x)
    torch.manual_seed(1)
    z_leaf = z_star.detach().requires_grad_()
    fz = cell(z_leaf, x)
    v = torch.randn_like(fz)
    (vjp,) = torch.autograd.grad(fz, z_leaf, v, create_graph=True)
    penalty = vjp.pow(2).sum() / v.numel()
    z_ref = z_star
    for _ in range(steps):
        z_ref = cell(z_ref, x)
    torch.testing.assert_close(z, z_ref)
    (z_ref.square().sum() + penalty).backward()
    separate = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in cell.parameters()])
    torch.testing.assert_close(shared, separate)


def test_spectral_radius_matches_the_eigenvalues_per_sample_and_is_differentiable():
    torch.manual_seed(0)
    n = 12
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    eigs = torch.linspace(0.1, 0.5, n, dtype=torch.float64)
    eigs[0] = 0.9  # one dominant eigenvalue: what forward iteration converges at
    a = (q @ torch.diag(eigs) @ torch.linalg.inv(q)).requires_grad_()
    scale = torch.tensor([1.0, 0.5], dtype=torch.float64)  # sample 2's map is half as steep
    z = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    fz = scale.view(2, 1) * (z @ a.T)
    rho = spectral_radius(fz, z, iters=60)
    assert rho.shape == (2,)
    assert rho.detach().tolist() == pytest.approx([0.9, 0.45], rel=1e-3)
    rho.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    averaged = spectral_radius(fz, z, iters=60, average=10, differentiable=False)
    assert not averaged.requires_grad and averaged.tolist() == pytest.approx([0.9, 0.45], rel=1e-3)
    seeded = [spectral_radius(fz, z, 3, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])  # a seeded start: the same estimate each time
    for bad in ({"iters": 0}, {"iters": True}, {"iters": 5, "average": 6, "differentiable": False},
                {"iters": 5, "average": 2}):  # fmt: skip
        with pytest.raises(ValueError, match="iters|average"):
            spectral_radius(fz, z, **bad)


def test_layer_returns_the_spectral_radius_when_asked():
    cell = small_cell(channels=2, groups=1, std=0.3)
    layer = DEQFixedPoint(cell, **{k: v for k, v in tight().items() if k != "solver"})
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    z_star, _ = layer.solve(x)
    jacobians = [
        torch.autograd.functional.jacobian(lambda z, x_i=x_i: cell(z, x_i), z_i).reshape(8, 8)
        for x_i, z_i in zip(x.detach().split(1), z_star.split(1), strict=True)
    ]
    exact = [torch.linalg.eigvals(j).abs().max().item() for j in jacobians]
    z, info = layer(x, spectral_radius_iters=200)
    assert info.spectral_radius.detach().tolist() == pytest.approx(exact, rel=0.02)
    (z.sum() + info.spectral_radius.sum()).backward()
    assert cell.conv1.weight.grad is not None and torch.isfinite(x.grad).all()
    assert layer(x)[1].spectral_radius is None
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="spectral_radius_iters"):
            layer(x, spectral_radius_iters=bad)
