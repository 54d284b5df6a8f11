"""The DEQ layer: z* = f(z*, x) by a root solver, gradients by implicit differentiation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .solvers import PerSample, SolverStats, check_early_exit, check_solver_kwargs, get_solver, lookup

__all__ = ["DEQFixedPoint", "DEQInfo", "BACKWARD_MODES", "spectral_radius"]

BACKWARD_MODES = ("implicit", "phantom")


@dataclass
class DEQInfo:
    """Stats of one forward call. ``backward`` is filled in when (and if) the implicit
    backward of that call runs; the object belongs to the call, so concurrent calls never
    see each other's stats."""

    forward: SolverStats
    backward: SolverStats | None = None
    #: Hutchinson estimate of ||df/dz||_F^2 / dim at z*, differentiable (only when asked for).
    jacobian_penalty: Tensor | None = None
    #: (B,) power-iteration estimate of each sample's spectral radius of df/dz at z*,
    #: differentiable (only when asked for).
    spectral_radius: Tensor | None = None


class DEQFixedPoint(nn.Module):
    """z* = f(z*, x), with f an nn.Module taking (z, x) and z of the same shape as x.

    Args:
        f: the cell.
        solver: forward solver, any name registered in ``deq.solvers.SOLVERS`` ("anderson",
            "forward", "broyden", or one added with ``register_solver``).
        backward: "implicit" (solve g = (df/dz)^T g + y with ``backward_solver``) or
            "phantom" (Jacobian-free: backprop through ``phantom_steps`` applications of f
            at z*, a cheap approximation of the implicit gradient).
        backward_solver / backward_kwargs: solver of the implicit backward; by default the
            forward solver with the forward options.
        phantom_steps: number of f applications the phantom gradient goes through.
        **solver_kwargs: options of the forward solver (tol, max_iter, m, beta, early_exit, ...).

    ``forward(x)`` returns (z*, DEQInfo). Under ``torch.no_grad()`` / ``inference_mode()``
    only the forward solve runs.

    Early exit: a forward solve of a batch stops iterating each sample once it has converged and
    evaluates f only on the rest (``early_exit``, for the solvers that take it). Unless set
    (True/False; None is automatic; a ModelConfig's solver_kwargs leave it out for automatic),
    it is on for batches of more than one sample on the CPU, in
    eval and training mode (measured there), and off on GPUs (not measured yet). It needs a cell
    whose samples do not interact: a BatchNorm that normalises with batch statistics (training
    mode, or no running statistics) turns it off, and ``early_exit=True`` then raises ValueError.
    The backward solve never uses it.
    """

    def __init__(
        self,
        f: nn.Module,
        solver: str = "anderson",
        backward: str = "implicit",
        backward_solver: str | None = None,
        backward_kwargs: dict | None = None,
        phantom_steps: int = 1,
        **solver_kwargs,
    ):
        super().__init__()
        if backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
        if not isinstance(phantom_steps, int) or phantom_steps < 1:
            raise ValueError(f"phantom_steps must be an integer >= 1, got {phantom_steps!r}")
        early_exit = solver_kwargs.pop("early_exit", None)
        check_solver_kwargs(solver, solver_kwargs, "solver_kwargs")
        try:
            _check_requested_early_exit(solver, early_exit)
        except ValueError as err:
            raise ValueError(f"solver_kwargs: {err}") from None
        backward_solver = backward_solver or solver
        if backward_kwargs is not None and backward_kwargs.get("early_exit"):
            raise ValueError("backward_kwargs: early_exit is for the forward solve only")
        backward_kwargs = dict(solver_kwargs if backward_kwargs is None else backward_kwargs)
        backward_kwargs.pop("callback", None)
        check_solver_kwargs(backward_solver, backward_kwargs, "backward_kwargs")
        self.f = f
        self.solver = solver
        self.solver_kwargs = dict(solver_kwargs)
        self.early_exit: bool | None = early_exit  # None: automatic (see the class docstring)
        self.backward_mode = backward
        self.backward_solver = backward_solver
        self.backward_kwargs = backward_kwargs
        self.phantom_steps = phantom_steps

    def solve(
        self,
        x: Tensor,
        z0: Tensor | None = None,
        solver: str | None = None,
        *,
        observe: Callable[[Tensor], None] | None = None,
        **overrides,
    ) -> tuple[Tensor, SolverStats]:
        """Forward solve only, without autograd. x: (B, C, H, W); returns z* (same shape).

        ``solver`` and ``overrides`` (tol, beta, callback, early_exit, ...) replace the layer's
        settings for this call only. ``observe(fz)``, if given, sees the output f(z) (B', C, H, W)
        of every f-evaluation, before the solver uses it (e.g. to decode the answer along the
        solve; with early exit B' is the number of samples still iterating, so early exit is off
        by default when ``observe`` is given).
        """
        if observe is not None and not callable(observe):
            raise ValueError(f"observe must be callable, got {type(observe).__name__}")
        name = solver or self.solver
        kwargs = {**self.solver_kwargs, **overrides} if name == self.solver else dict(overrides)
        # the layer's own setting goes with its own solver; another solver gets what the call asks
        requested = kwargs.pop("early_exit", self.early_exit if name == self.solver else None)
        check_solver_kwargs(name, kwargs, "solver options")
        _check_requested_early_exit(name, requested)
        if lookup(name).supports_early_exit:
            kwargs["early_exit"] = self._early_exit(requested, x.shape[0], x.device.type, observe)
        # Under autocast, f keeps the caller's mixed precision but the solver's own arithmetic
        # (iterates, Gram matrices, small solves) stays in at least float32.
        device = x.device.type
        amp = torch.is_autocast_enabled(device)
        state_dtype = torch.promote_types(x.dtype, torch.float32)
        z0 = torch.zeros_like(x, dtype=state_dtype) if z0 is None else z0.to(state_dtype)
        amp_dtype = torch.get_autocast_dtype(device)

        def cell(z: Tensor, x: Tensor) -> Tensor:
            with torch.autocast(device, dtype=amp_dtype, enabled=amp):
                fz = self.f(z, x).to(state_dtype)
            if observe is not None:
                observe(fz)
            return fz

        with torch.no_grad(), torch.autocast(device, enabled=False):
            return get_solver(name)(PerSample(cell, x), z0, **kwargs)

    def _early_exit(self, requested: bool | None, batch: int, device_type: str, observe) -> bool:
        """Whether this forward solve retires converged samples (see the class docstring)."""
        mixing = [  # batch statistics: in training mode, or always without running statistics
            type(m).__name__ for m in self.f.modules()
            if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)
        ]  # fmt: skip
        if requested and mixing:
            raise ValueError(
                f"early_exit=True: the cell's {mixing[0]} normalises with batch statistics, which mix the "
                "samples of a batch, so a sample's f(z) would change as others leave it "
                "(use running statistics in eval mode, or early_exit=False)"
            )
        if requested is not None:
            return requested
        # off on GPUs until measured there (``python -m bench.solvers --device cuda`` prints it)
        return batch > 1 and observe is None and not mixing and device_type == "cpu"

    def forward(
        self,
        x: Tensor,
        z0: Tensor | None = None,
        jacobian_penalty: bool = False,
        spectral_radius_iters: int = 0,
    ) -> tuple[Tensor, DEQInfo]:
        """z* (same shape as x) and this call's stats. ``jacobian_penalty``: also return, in
        ``info.jacobian_penalty``, the Jacobian regulariser of Bai et al. (2021) to add to the
        loss: it keeps f contractive, so the equilibrium exists and solvers converge.
        ``spectral_radius_iters`` > 0: also return, in ``info.spectral_radius``, each sample's
        spectral radius of df/dz at z* estimated with that many power iterations (the rate at
        which forward iteration converges), differentiable for a regulariser."""
        if (
            isinstance(spectral_radius_iters, bool)
            or not isinstance(spectral_radius_iters, int)
            or spectral_radius_iters < 0
        ):
            raise ValueError(f"spectral_radius_iters must be an integer >= 0, got {spectral_radius_iters!r}")
        z_star, fstats = self.solve(x, z0)
        info = DEQInfo(forward=fstats)
        if not torch.is_grad_enabled():
            return z_star, info
        fz = None
        if jacobian_penalty or spectral_radius_iters:
            # its own graph: the loss's backward frees it, the hook's f0 must outlive that
            z_leaf = z_star.detach().requires_grad_()
            fz = self.f(z_leaf, x)
            if spectral_radius_iters:
                info.spectral_radius = spectral_radius(fz, z_leaf, spectral_radius_iters)
            if jacobian_penalty:
                info.jacobian_penalty = _jacobian_penalty(fz, z_leaf)
        if self.backward_mode == "phantom":
            # The regulariser's f(z*) is also the phantom's first step: z* carries no gradient,
            # so f(z*) and f(z_leaf) give the same value and the same gradients to x and the
            # parameters, and sharing it saves one f-evaluation and its backward per step.
            z = self.f(z_star, x) if fz is None else fz
            for _ in range(self.phantom_steps - 1):
                z = self.f(z, x)
            return z, info

        # Implicit backward: one re-engaging call of f gives the (df/dparams)^T and
        # (df/dx)^T products; the hook replaces the incoming gradient y by the solution g of
        # g = (df/dz)^T g + y, computed with VJPs of a separate f(z0, x) graph.
        z = self.f(z_star, x)
        if not z.requires_grad:  # nothing to differentiate (no grad-requiring inputs/params)
            return z, info
        z0 = z.detach().requires_grad_()
        f0 = self.f(z0, x)
        solve = get_solver(self.backward_solver)
        kwargs = self.backward_kwargs

        def implicit_backward(y: Tensor | None) -> Tensor | None:
            if y is None:  # undefined gradient: nothing flows back
                return None

            def vjp_fixed_point(g: Tensor) -> Tensor:
                return torch.autograd.grad(f0, z0, g, retain_graph=True)[0] + y

            g, bstats = solve(vjp_fixed_point, y, **kwargs)
            info.backward = bstats
            return g

        z.register_hook(implicit_backward)
        return z, info

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, solver_kwargs={self.solver_kwargs}, backward={self.backward_mode!r}"


def _check_requested_early_exit(solver: str, requested) -> None:
    """ValueError unless ``requested`` is True, False or None (automatic), and True only for a
    solver that takes ``early_exit``."""
    check_early_exit(requested, automatic=True)
    if requested and not lookup(solver).supports_early_exit:
        raise ValueError(f"early_exit: solver {solver!r} does not take it")


def _jacobian_penalty(fz: Tensor, z: Tensor) -> Tensor:
    """||J||_F^2 / dim for J = dfz/dz, estimated with one random projection (E[||v^T J||^2] = ||J||_F^2)."""
    v = torch.randn_like(fz)
    (vjp,) = torch.autograd.grad(fz, z, v, create_graph=True)
    return vjp.float().pow(2).sum() / v.numel()


def spectral_radius(
    fz: Tensor,
    z: Tensor,
    iters: int,
    *,
    average: int = 1,
    differentiable: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B,) estimate of each sample's spectral radius of J = dfz/dz (fz, z: (B, ...), fz computed
    from z with a graph; samples must not interact in f), by power iteration on J^T (same
    eigenvalues) from a random start (drawn with ``generator``): ``iters`` normalised
    vector-Jacobian products, the estimate being the geometric mean of the last ``average``
    growth factors ||v^T J|| / ||v|| (steadier when the top eigenvalues are a complex pair or
    close together). ``differentiable``: the last product has a graph, so the estimate is
    differentiable in f's parameters (then ``average`` must be 1)."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    if isinstance(average, bool) or not isinstance(average, int) or not 1 <= average <= iters:
        raise ValueError(f"average must be an integer in [1, iters], got {average!r}")
    if differentiable and average != 1:
        raise ValueError("average must be 1 when differentiable (only the last step has a graph)")

    def per_sample_norm(t: Tensor) -> Tensor:
        return t.float().flatten(1).norm(dim=1).clamp_min(1e-12)

    v = torch.randn(fz.shape, generator=generator, device=fz.device, dtype=fz.dtype)
    v = v / per_sample_norm(v).to(v.dtype).view(-1, *[1] * (v.dim() - 1))
    log_growth = []
    for step in range(iters):
        last = step == iters - 1
        (u,) = torch.autograd.grad(fz, z, v.detach(), retain_graph=True, create_graph=last and differentiable)
        growth = per_sample_norm(u)  # ||v|| = 1
        if last and differentiable:
            return growth
        if step >= iters - average:
            log_growth.append(growth.log())
        v = u / growth.to(u.dtype).view(-1, *[1] * (u.dim() - 1))
    return torch.stack(log_growth).mean(0).exp()


def unroll(f: Callable[[Tensor, Tensor], Tensor], x: Tensor, n_iter: int) -> Tensor:
    """n_iter forward iterations from z0 = 0 with ordinary autograd through all of them
    (the explicit, memory-hungry baseline a DEQ replaces)."""
    z = torch.zeros_like(x)
    for _ in range(n_iter):
        z = f(z, x)
    return z
