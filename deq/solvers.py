"""Fixed-point solvers: find z* with z* = f(z*), and the registry that names them.

Every solver has the same signature::

    z_star, stats = solver(f, z0, *, tol=1e-2, max_iter=50, callback=None, check_every=None, ...)

- ``f`` maps a tensor of shape (B, ...) to the same shape; sample b of the output depends only
  on sample b of the input (true of DEQ cells with per-sample norms).
- The residual of sample b is the relative residual ||f(z)_b - z_b|| / ||f(z)_b||.
- A solve stops when every sample's best residual is below ``tol``, after ``max_iter``
  f-evaluations (z0 counts as the first iterate), on a non-finite value, or when the residual
  blows up (see ``DIVERGENCE_FACTOR``).
- The returned ``z_star`` is, per sample, the best iterate seen (lowest residual), not
  merely the last one.
- ``callback(iteration, residual)`` is called once per iteration with the batch residual
  (max over samples) as a float. Giving one makes every iteration synchronise with the device.
- ``check_every``: iterations between host-side convergence checks. Each check is one
  host-device synchronisation; on CUDA the default (4) keeps the loop mostly sync-free, on
  CPU the default is 1 (a check costs nothing there).

All bookkeeping (residuals, best iterate) lives on the tensor's device; the residual trace is
copied to the host once, at the end.

Solvers are chosen by name from one registry, ``SOLVERS``. ``register_solver(name, fn, validate)``
adds one: it then works in ``DEQFixedPoint``, ``train.py --solver/--backward-solver``,
``python -m deq.evaluate --solver`` and the demo's race.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

__all__ = [
    "SolverStats",
    "Solver",
    "Monitor",
    "anderson",
    "forward_iteration",
    "broyden",
    "SOLVERS",
    "register_solver",
    "unregister_solver",
    "lookup",
    "get_solver",
    "check_solver_kwargs",
    "COMMON_OPTIONS",
]

Callback = Callable[[int, float], None]

#: A residual more than this many times the best one seen (for a sample not yet converged)
#: is reported as divergence and stops the solve.
DIVERGENCE_FACTOR = 1e3
_EPS = 1e-12  # guards ||f(z)|| = 0 in the relative residual


@dataclass
class SolverStats:
    """What one solve did. Created per call: safe to use from concurrent requests.

    trace: batch residual (max over samples) of each iterate, trace[0] being that of z0;
        one entry per f-evaluation.
    sample_residuals: (B,) residual of the returned (best) iterate of each sample.
    sample_evals: (B,) int64, per sample the f-evaluations it needed to reach ``tol`` (what it
        needs solved alone: samples never interact), or ``max_iter`` where it did not converge,
        also when the batch's solve stopped early (a divergence elsewhere cut it short).
    """

    solver: str
    trace: list[float]
    sample_residuals: Tensor
    sample_evals: Tensor
    n_evals: int
    converged: bool
    diverged: bool
    message: str

    @property
    def residual(self) -> float:
        """Largest per-sample residual of the returned iterate."""
        return float(self.sample_residuals.max()) if self.sample_residuals.numel() else 0.0


def _validate(tol: float, max_iter: int, check_every: int | None, callback) -> None:
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable, got {type(callback).__name__}")


def _validate_anderson(m: int, lam: float, beta: float) -> None:
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {m!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")


def _check_z0(z0: Tensor) -> None:
    if not isinstance(z0, Tensor) or not z0.is_floating_point() or z0.dim() < 1:
        raise ValueError("z0 must be a floating-point tensor of shape (B, ...)")


class Monitor:
    """Residuals, best iterate, stopping rules and stats: the part every solver shares, and
    what a new solver builds on::

        mon = Monitor(z0, tol, max_iter, callback, check_every)
        z = mon.z0                                   # (B, D), flattened
        for n in range(1, max_iter + 1):
            fz = f(z.view(mon.shape)).reshape(z.shape)
            if mon.observe(z, fz) or n == max_iter:  # True: converged or diverged
                break
            z = ...                                  # the solver's own step
        return mon.finish("name", n)                 # (z* of z0's shape, SolverStats)
    """

    def __init__(self, z0: Tensor, tol: float, max_iter: int, callback, check_every):
        """Validates the common arguments; z0: (B, ...), kept flattened as ``self.z0`` (B, D)."""
        _check_z0(z0)
        _validate(tol, max_iter, check_every, callback)
        self.shape = z0.shape
        batch = z0.shape[0]
        z0 = self.z0 = z0.reshape(batch, -1)
        self.tol = tol
        self.callback = callback
        if check_every is None:
            check_every = 4 if z0.is_cuda else 1
        self.check_every = 1 if callback is not None else check_every
        # Per-sample residual history (max_iter, B): one row copy per iteration; the batch
        # trace and the per-sample f-evaluation counts are read off it once, at the end.
        self.history = torch.empty(max_iter, batch, dtype=z0.dtype, device=z0.device)
        self.on_cpu = z0.device.type == "cpu"
        self.best_z = z0
        self.best_res = torch.full((batch,), math.inf, dtype=z0.dtype, device=z0.device)
        self.count = 0
        self.converged = False
        self.diverged = False
        self.message = ""

    def observe(self, z: Tensor, fz: Tensor, gz: Tensor | None = None) -> bool:
        """Record iterate z (B, D) with f(z) and g = f(z) - z; return True to stop."""
        if gz is None:
            gz = fz - z
        res = gz.norm(dim=1).div_(fz.norm(dim=1).clamp_min_(_EPS)).nan_to_num_(nan=math.inf)
        improved = res < self.best_res
        self.best_res = torch.minimum(res, self.best_res)
        if self.on_cpu and bool(improved.all()):
            self.best_z = z  # no copy: solvers never modify an iterate in place
        else:
            self.best_z = torch.where(improved.unsqueeze(1), z, self.best_z)
        self.history[self.count] = res
        self.count += 1
        if self.callback is not None:
            self.callback(self.count - 1, float(res.max()))
        if self.count % self.check_every:
            return False
        return self._check(res)

    def _check(self, res: Tensor) -> bool:
        """The only place the loop waits for the device: one small copy to the host."""
        current, best = torch.stack((res, self.best_res)).tolist()
        if all(b < self.tol for b in best):
            self.converged = True
            self.message = f"converged: residual < tol={self.tol:g}"
        elif not all(math.isfinite(r) for r in current):
            self.diverged = True
            self.message = f"diverged: non-finite residual at iteration {self.count - 1}"
        elif any(r > DIVERGENCE_FACTOR * b and b >= self.tol for r, b in zip(current, best, strict=True)):
            self.diverged = True
            self.message = (
                f"diverged: residual grew over {DIVERGENCE_FACTOR:g}x its best at iteration {self.count - 1}"
            )
        return self.converged or self.diverged

    def finish(self, name: str, n_evals: int) -> tuple[Tensor, SolverStats]:
        history = self.history[: self.count]
        trace = history.amax(1).tolist()  # the one host copy of the loop
        below = history < self.tol
        first = below.to(torch.int8).argmax(0) + 1  # f-evaluations to the first iterate below tol
        sample_evals = torch.where(below.any(0), first, len(self.history)).to(torch.int64)
        if not self.message:
            self.converged = bool((self.best_res < self.tol).all())
            if self.converged:
                self.message = f"converged: residual < tol={self.tol:g}"
            else:
                self.message = (
                    f"not converged in {self.count} f-evaluations: "
                    f"residual {float(self.best_res.max()):.3g} > tol={self.tol:g}"
                )
        stats = SolverStats(
            solver=name,
            trace=trace,
            sample_residuals=self.best_res.detach(),
            sample_evals=sample_evals,
            n_evals=n_evals,
            converged=self.converged,
            diverged=self.diverged,
            message=self.message,
        )
        return self.best_z.reshape(self.shape), stats


def forward_iteration(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-2,
    max_iter: int = 50,
    callback: Callback | None = None,
    check_every: int | None = None,
) -> tuple[Tensor, SolverStats]:
    """Plain fixed-point iteration z_{k+1} = f(z_k). z0: (B, ...); returns z* of the same shape."""
    mon = Monitor(z0, tol, max_iter, callback, check_every)
    z, shape = mon.z0, mon.shape
    n_evals = 0
    for _ in range(max_iter):
        fz = f(z.view(shape)).reshape(z.shape)
        n_evals += 1
        if mon.observe(z, fz) or n_evals == max_iter:
            break
        z = fz
    return mon.finish("forward", n_evals)


def anderson(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-2,
    max_iter: int = 50,
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
    callback: Callback | None = None,
    check_every: int | None = None,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration with memory m, regulariser lam and mixing beta.

    Keeps the last m iterates z_i and residuals g_i = f(z_i) - z_i (B, m, D) and, per sample,
    picks alpha minimising ||G alpha||^2 + lam' ||alpha||^2 subject to sum(alpha) = 1; then
    z = sum alpha_i (z_i + beta g_i) = beta sum alpha_i f(z_i) + (1 - beta) sum alpha_i z_i.
    lam is relative to the newest squared residual (lam' = lam * ||g_k||^2), so the step does
    not depend on the scale of z and tight float64 solves are not stalled by the regulariser.
    The Gram matrix G G^T is updated one row per iteration, not recomputed.
    """
    _validate_anderson(m, lam, beta)
    mon = Monitor(z0, tol, max_iter, callback, check_every)
    z, shape = mon.z0, mon.shape
    (batch, dim), kw = z.shape, {"dtype": z.dtype, "device": z.device}
    G = torch.zeros(batch, m, dim, **kw)  # residuals g_i = f(z_i) - z_i
    Y = torch.zeros(batch, m, dim, **kw)  # z_i + beta * g_i: the next z is sum_i alpha_i Y_i
    gram = torch.zeros(batch, m, m, **kw)  # G G^T, one row/column updated per iteration
    ones = torch.ones(batch, m, 1, **kw)

    n_evals = 0
    for k in range(max_iter):
        fz = f(z.view(shape)).reshape(z.shape)
        n_evals += 1
        slot, n = k % m, min(k + 1, m)
        g = torch.sub(fz, z, out=G[:, slot])
        if mon.observe(z, fz, g) or n_evals == max_iter:
            break
        torch.add(z, g, alpha=beta, out=Y[:, slot])
        # g^T G^T rather than G g: the same numbers, several times faster on CPU.
        row = torch.bmm(g.unsqueeze(1), G[:, :n].transpose(1, 2)).squeeze(1)  # (B, n)
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        # The bordered least-squares system [[0, 1^T], [1, H]] has the closed form
        # alpha = H^-1 1 / (1^T H^-1 1).
        H = gram[:, :n, :n] / row[:, slot, None, None].clamp_min(_EPS)
        H.diagonal(dim1=1, dim2=2).add_(lam)
        w = torch.linalg.solve_ex(H, ones[:, :n])[0]  # (B, n, 1); no host sync
        alpha = (w / w.sum(1, keepdim=True)).transpose(1, 2)  # (B, 1, n)
        z = torch.bmm(alpha, Y[:, :n]).squeeze(1)
    return mon.finish("anderson", n_evals)


def broyden(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-2,
    max_iter: int = 50,
    callback: Callback | None = None,
    check_every: int | None = None,
) -> tuple[Tensor, SolverStats]:
    """Broyden's ("good") method on g(z) = f(z) - z, per sample, without line search.

    The inverse Jacobian of g is kept as -I + sum_i u_i v_i^T (rank grows by one per
    iteration, up to max_iter - 1; memory 2 * B * max_iter * D).
    """
    mon = Monitor(z0, tol, max_iter, callback, check_every)
    z, shape = mon.z0, mon.shape
    # Rank-r update vectors, in buffers that double when full (max_iter can be large).
    U = z.new_zeros(z.shape[0], min(max_iter, 8), z.shape[1])
    V = torch.zeros_like(U)

    def inv_jac(x: Tensor, r: int) -> Tensor:  # (-I + U^T V) x, as row vectors (fast bmm form)
        return x.unsqueeze(1).bmm(V[:, :r].transpose(1, 2)).bmm(U[:, :r]).squeeze(1) - x

    def inv_jac_t(x: Tensor, r: int) -> Tensor:  # (-I + V^T U) x
        return x.unsqueeze(1).bmm(U[:, :r].transpose(1, 2)).bmm(V[:, :r]).squeeze(1) - x

    fz = f(z.view(shape)).reshape(z.shape)
    n_evals = 1
    g = fz - z
    if not (mon.observe(z, fz, g) or max_iter == 1):
        step = g  # -(-I) g
        for r in range(max_iter - 1):
            z = z + step
            fz = f(z.view(shape)).reshape(z.shape)
            n_evals += 1
            g_new = fz - z
            if mon.observe(z, fz, g_new) or n_evals == max_iter:
                break
            dg, g = g_new - g, g_new
            v = inv_jac_t(step, r)
            denom = (v * dg).sum(1, keepdim=True)
            safe = denom.abs() > _EPS
            u = (step - inv_jac(dg, r)) / torch.where(safe, denom, torch.ones_like(denom))
            if r == U.shape[1]:
                U = torch.cat((U, torch.zeros_like(U)), 1)
                V = torch.cat((V, torch.zeros_like(V)), 1)
            U[:, r] = u * safe
            V[:, r] = v * safe
            step = -inv_jac(g, r + 1)
    return mon.finish("broyden", n_evals)


# ----------------------------------------------------------------------------- the registry

SolverFn = Callable[..., tuple[Tensor, SolverStats]]
#: Options every solver takes; the layer and the apps set them per call. The rest of a solver's
#: keyword-only options are its own (Anderson's m, lam, beta).
COMMON_OPTIONS = ("tol", "max_iter", "callback", "check_every")


@dataclass(frozen=True)
class Solver:
    """A registered solver: ``fn`` with the common signature, a display ``label``, and
    ``validate(**own_options)`` that raises ValueError naming a bad option of its own."""

    name: str
    fn: SolverFn
    label: str
    validate: Callable[..., None] | None = None

    def __call__(self, f: Callable[[Tensor], Tensor], z0: Tensor, **options) -> tuple[Tensor, SolverStats]:
        return self.fn(f, z0, **options)

    @functools.cached_property  # read on every solve: the signature is inspected once
    def defaults(self) -> Mapping[str, object]:
        """Every keyword-only option with its default, the COMMON_OPTIONS included (read-only)."""
        params = inspect.signature(self.fn).parameters.values()
        keyword_only = (p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        return MappingProxyType({p.name: p.default for p in keyword_only})

    @property
    def own_defaults(self) -> dict:
        """The options this solver takes beyond COMMON_OPTIONS, with their defaults."""
        return {k: v for k, v in self.defaults.items() if k not in COMMON_OPTIONS}

    @property
    def own_options(self) -> tuple[str, ...]:
        """The names of ``own_defaults``."""
        return tuple(self.own_defaults)

    def check(self, options: dict, argument: str = "solver options") -> None:
        """Raise ValueError if ``options`` holds a key this solver does not take, or a bad value
        (so a layer rejects bad options when it is built, not at its first solve)."""
        accepted = self.defaults
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"{argument}: unknown option(s) {unknown} for solver {self.name!r}; "
                f"accepted: {sorted(accepted)}"
            )
        opts = {**accepted, **options}
        try:
            _validate(opts["tol"], opts["max_iter"], opts["check_every"], opts["callback"])
            if self.validate is not None:
                self.validate(**{k: opts[k] for k in self.own_options})
        except ValueError as err:
            raise ValueError(f"{argument}: {err}") from None

    def select(self, settings: dict) -> dict:
        """The entries of ``settings`` this solver takes (a UI's settings cover every solver)."""
        accepted = self.defaults
        return {k: v for k, v in settings.items() if k in accepted}


#: name -> Solver. Add to it with ``register_solver`` only: the layer, ``train.py --solver``,
#: ``deq.evaluate --solver`` and the demo's race all look solvers up here.
SOLVERS: dict[str, Solver] = {}


def register_solver(
    name: str,
    fn: SolverFn,
    validate: Callable[..., None] | None = None,
    *,
    label: str | None = None,
    replace: bool = False,
) -> Solver:
    """Make ``fn`` available by ``name`` everywhere a solver is chosen; returns its entry.

    ``fn(f, z0, *, tol, max_iter, callback, check_every, **own)`` must return (z*, SolverStats)
    (see this module's docstring); ``validate(**own)`` checks its own options (ValueError).
    Registering a taken name raises ValueError unless ``replace``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier-like string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if validate is not None and not callable(validate):
        raise ValueError(f"validate must be callable or None, got {type(validate).__name__}")
    if name in SOLVERS and not replace:
        raise ValueError(f"solver {name!r} is already registered (pass replace=True to replace it)")
    params = inspect.signature(fn).parameters
    keyword_only = {p: v for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    missing = [p for p in COMMON_OPTIONS if p not in keyword_only]
    if missing:
        raise ValueError(
            f"fn must take the keyword-only options {list(COMMON_OPTIONS)}; {name!r} lacks {missing}"
        )
    no_default = [p for p, v in keyword_only.items() if v.default is inspect.Parameter.empty]
    if no_default:  # a model config states every option: each needs a value to state
        raise ValueError(f"every keyword-only option of {name!r} needs a default; {no_default} have none")
    solver = Solver(name, fn, label or name, validate)
    SOLVERS[name] = solver
    return solver


def unregister_solver(name: str) -> None:
    """Remove a registered solver (tests, plug-ins that clean up after themselves)."""
    SOLVERS.pop(name, None)


def lookup(name: str) -> Solver:
    """The registered solver ``name``; ValueError listing the registered ones otherwise."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"solver must be one of {sorted(SOLVERS)}, got {name!r} (a solver of your own must be "
            "registered with register_solver, in this process, before it is used)"
        ) from None


def get_solver(name: str) -> SolverFn:
    """The solver function registered as ``name`` ("anderson", "forward", "broyden", ...)."""
    return lookup(name).fn


def check_solver_kwargs(name: str, kwargs: dict, argument: str = "solver_kwargs") -> None:
    """Raise ValueError if ``kwargs`` holds a key the named solver does not take, or a bad value."""
    lookup(name).check(kwargs, argument)


register_solver("anderson", anderson, _validate_anderson, label="Anderson")
register_solver("forward", forward_iteration, label="forward iteration")
register_solver("broyden", broyden, label="Broyden")
