"""Fixed-point solvers: find z* with z* = f(z*), and the registry that names them.

Every solver has the same signature::

    z_star, stats = solver(f, z0, *, tol=1e-2, max_iter=50, callback=None, check_every=None, ...)

- ``f`` maps a tensor of shape (B, ...) to the same shape; sample b of the output depends only
  on sample b of the input (true of DEQ cells with per-sample norms).
- The residual of sample b is the relative residual ||f(z)_b - z_b|| / ||f(z)_b||.
- A solve stops when every sample's best residual is below ``tol``, after ``max_iter``
  f-evaluations (z0 counts as the first iterate), or when a sample not yet converged gets a
  non-finite residual or one that blows up (see ``DIVERGENCE_FACTOR``).
- The returned ``z_star`` is, per sample, the best iterate seen (lowest residual), not
  merely the last one, and a sample's first iterate below ``tol`` is final: what a sample
  returns does not depend on how long the rest of its batch kept iterating (nor on
  ``check_every`` or ``early_exit``).
- ``callback(iteration, residual)`` is called once per iteration with the batch residual
  (max over samples, a converged one counting with its final residual) as a float. Giving one
  makes every iteration synchronise with the device.
- ``check_every``: iterations between host-side convergence checks. Each check is one
  host-device synchronisation; on CUDA the default (4) keeps the loop mostly sync-free, on
  CPU the default is 1 (a check costs nothing there).

On GPUs all bookkeeping (residuals, best iterate) lives on the tensor's device and the residual
trace is copied to the host once, at the end; on the CPU it is kept on the host (see ``Monitor``).

``early_exit=True`` (the built-in solvers; f must be a ``PerSample``): samples that have
converged leave the solve at each check and f runs only on the rest. Answers and per-sample
counts are those of the whole-batch solve, up to how f rounds on a smaller batch.

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
    "PerSample",
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
    "OPTIONAL_OPTIONS",
    "check_early_exit",
]

Callback = Callable[[int, float], None]

#: A residual more than this many times the best one seen (for a sample not yet converged)
#: is reported as divergence and stops the solve.
DIVERGENCE_FACTOR = 1e3
_EPS = 1e-12  # guards ||f(z)|| = 0 in the relative residual
#: Device types whose per-sample bookkeeping ``Monitor`` keeps on the host (where a copy to
#: the host is free and a Python float beats a small tensor operation).
HOST_BOOKKEEPING = ("cpu",)


@dataclass
class SolverStats:
    """What one solve did. Created per call: safe to use from concurrent requests.

    trace: batch residual (max over samples) of each iterate, trace[0] being that of z0;
        one entry per f-evaluation. A sample that has converged counts with its final residual
        (whether it left the solve or not).
    sample_residuals: (B,) residual of the returned (best) iterate of each sample.
    sample_evals: (B,) int64, per sample the f-evaluations it needed to reach ``tol`` (what it
        needs solved alone: samples never interact), or ``max_iter`` where it did not converge,
        also when the batch's solve stopped early (a divergence elsewhere cut it short).
    early_exit: whether converged samples were retired from the solve (``Monitor``).
    f_work: samples f was evaluated on, summed over the f-evaluations (n_evals x B without
        early exit): the work the solve did.
    """

    solver: str
    trace: list[float]
    sample_residuals: Tensor
    sample_evals: Tensor
    n_evals: int
    converged: bool
    diverged: bool
    message: str
    early_exit: bool = False
    f_work: int = 0

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


class PerSample:
    """f(z) = fn(z, *inputs) for a function whose sample b depends only on sample b of z and of
    each input (all of shape (B, ...)): a solver may then evaluate it on a subset of the batch.
    Solvers stop iterating converged samples (``early_exit=True``) only for an f of this kind."""

    __slots__ = ("fn", "inputs")

    def __init__(self, fn: Callable[..., Tensor], *inputs: Tensor):
        self.fn = fn
        self.inputs = inputs

    def __call__(self, z: Tensor) -> Tensor:
        return self.fn(z, *self.inputs)

    def select(self, index: Tensor) -> PerSample:
        """The same function on the samples ``index`` (int64, (B',)) of the current batch."""
        return PerSample(self.fn, *(t.index_select(0, index) for t in self.inputs))


def check_early_exit(value, *, automatic: bool = False) -> None:
    """ValueError unless ``value`` is True or False (or None, meaning automatic, where allowed)."""
    if not (isinstance(value, bool) or (automatic and value is None)):
        allowed = "True, False or None (automatic)" if automatic else "True or False"
        raise ValueError(f"early_exit must be {allowed}, got {value!r}")


def _check_per_sample(f, early_exit: bool) -> None:
    """Early exit narrows f to a subset of the batch: only a PerSample can be narrowed.
    (``Monitor`` has already validated ``early_exit`` itself.)"""
    if early_exit and not isinstance(f, PerSample):
        raise ValueError(
            "early_exit=True needs f as deq.solvers.PerSample(fn, *inputs), so that the solver can "
            f"evaluate it on the samples not yet converged; got {type(f).__name__}"
        )


class Monitor:
    """Residuals, best iterate, stopping rules, early exit and stats: the part every solver
    shares, and what a new solver builds on::

        mon = Monitor(z0, tol, max_iter, callback, check_every)
        z = mon.z0                                   # (B, D), flattened
        for n in range(1, max_iter + 1):
            fz = f(z.view(mon.view_shape)).reshape(z.shape)
            if mon.observe(z, fz) or n == max_iter:  # True: converged or diverged
                break
            z = ...                                  # the solver's own step
        return mon.finish("name", n)                 # (z* of z0's shape, SolverStats)

    With ``early_exit=True`` a check may retire the samples that have converged: ``mon.keep``
    is then the int64 index of the samples that go on (else None), and the solver narrows its
    own state and f to them (``t.index_select(0, keep)``, ``f.select(keep)``) before its step.
    ``finish`` puts every sample back in its place.

    On the CPU the per-sample bookkeeping runs on the host (a copy to the host costs nothing
    there, and each small tensor operation saved is ~2 us); on other devices it stays on the
    device, and only ``check_every``-th iterations wait for it.
    """

    def __init__(self, z0: Tensor, tol: float, max_iter: int, callback, check_every, *, early_exit=False):
        """Validates the common arguments; z0: (B, ...), kept flattened as ``self.z0`` (B, D)."""
        _check_z0(z0)
        _validate(tol, max_iter, check_every, callback)
        check_early_exit(early_exit)
        self.shape = z0.shape
        self.view_shape = (-1, *z0.shape[1:])  # of the samples still iterating
        self.batch = batch = z0.shape[0]
        z0 = self.z0 = z0.reshape(batch, -1)
        self.tol = tol
        self.max_iter = max_iter
        self.callback = callback
        if check_every is None:
            check_every = 4 if z0.is_cuda else 1
        self.check_every = 1 if callback is not None else check_every
        self.early_exit = early_exit
        self.on_host = z0.device.type in HOST_BOOKKEEPING
        self.best_z = z0
        if self.on_host:  # the batch trace and per-sample counts, kept as they come
            self.best: list[float] = [math.inf] * batch
            self.trace: list[float] = []
            self.first_below = [0] * batch  # per sample: f-evaluations to its first iterate < tol
            self.ids = list(range(batch))  # the samples still iterating
            self.retired_max = -math.inf  # largest final residual of the samples set aside
        else:
            self.best_res = torch.full((batch,), math.inf, dtype=z0.dtype, device=z0.device)
        # Device: one (B',) residual row per iteration; the batch trace and the per-sample counts
        # are read off them once, at the end.
        self.rows: list[Tensor] = []
        self.segments: list[tuple[int, Tensor]] = []  # (first row, samples) after each retirement
        self.index: Tensor | None = None  # samples still iterating (None: all of them)
        self.keep: Tensor | None = None
        self.count = 0
        self.f_work = 0
        self.converged = False
        self.diverged = False
        self.message = ""

    def observe(
        self, z: Tensor, fz: Tensor, gz: Tensor | None = None, *, g_sqnorm: Tensor | None = None
    ) -> bool:
        """Record iterate z (B, D) with f(z) and g = f(z) - z (or just its squared norms
        ``g_sqnorm`` (B,), when the solver has them); return True to stop."""
        self.keep = None
        self.count += 1
        self.f_work += z.shape[0]
        fz_norm = torch.linalg.vector_norm(fz, dim=1)
        if g_sqnorm is None:
            g_size = torch.linalg.vector_norm(fz - z if gz is None else gz, dim=1)
        else:
            g_size = g_sqnorm
        if self.on_host:
            g_sizes, fz_norms = torch.stack((g_size, fz_norm)).tolist()
            current = _relative_residuals(g_sizes, fz_norms, squared=g_sqnorm is not None)
            tol = self.tol
            # the batch residual counts a converged sample with its final residual
            shown = [b if b < tol else r for r, b in zip(current, self.best, strict=True)]
            improved = [r < b and not b < tol for r, b in zip(current, self.best, strict=True)]
            if all(improved):
                self.best_z = z  # no copy: solvers never modify an iterate in place
                self.best = current
            elif any(improved):
                mask = torch.tensor(improved, device=z.device).unsqueeze(1)
                self.best_z = torch.where(mask, z, self.best_z)
                self.best = [r if i else b for r, b, i in zip(current, self.best, improved, strict=True)]
            largest = max(shown)
            if min(current) < tol:  # a sample's first iterate below tol is where it improves
                for i, (r, better) in enumerate(zip(current, improved, strict=True)):
                    if better and r < tol:
                        self.first_below[self.ids[i]] = self.count
            self.trace.append(max(largest, self.retired_max))
            if self.callback is not None:
                self.callback(self.count - 1, largest)
            if self.count % self.check_every:
                return False
            return self._check(current, self.best)
        g_norm = g_size if g_sqnorm is None else g_size.sqrt()
        res = g_norm.div_(fz_norm.clamp_min_(_EPS)).nan_to_num_(nan=math.inf)
        done = self.best_res < self.tol  # converged: final, and counted with its final residual
        self.rows.append(torch.where(done, self.best_res, res))
        improved = (res < self.best_res) & ~done
        self.best_res = torch.where(improved, res, self.best_res)
        self.best_z = torch.where(improved.unsqueeze(1), z, self.best_z)
        if self.callback is not None:
            self.callback(self.count - 1, float(self.rows[-1].max()))
        if self.count % self.check_every:
            return False
        current, best = torch.stack((res, self.best_res)).tolist()  # the loop's one wait
        return self._check(current, best)

    def _check(self, current: list[float], best: list[float]) -> bool:
        if all(b < self.tol for b in best):
            self.converged = True
            self.message = f"converged: residual < tol={self.tol:g}"
        elif not all(math.isfinite(r) or b < self.tol for r, b in zip(current, best, strict=True)):
            self.diverged = True
            self.message = f"diverged: non-finite residual at iteration {self.count - 1}"
        elif any(r > DIVERGENCE_FACTOR * b and b >= self.tol for r, b in zip(current, best, strict=True)):
            self.diverged = True
            self.message = (
                f"diverged: residual grew over {DIVERGENCE_FACTOR:g}x its best at iteration {self.count - 1}"
            )
        elif self.early_exit and any(b < self.tol for b in best):
            self._retire([i for i, b in enumerate(best) if not b < self.tol])
        return self.converged or self.diverged

    def _retire(self, going_on: list[int]) -> None:
        """Set aside the converged samples' results; the others (local indices) go on."""
        device = self.best_z.device
        staying = set(going_on)
        done = torch.tensor([i for i in range(self.best_z.shape[0]) if i not in staying], device=device)
        keep = torch.tensor(going_on, device=device)
        if self.index is None:
            self.index = torch.arange(self.batch, device=device)
            self.out_z = self.best_z.new_empty((self.batch, self.best_z.shape[1]))
            self.out_res = self.best_z.new_empty(self.batch)
        finished = self.index[done]
        self.out_z[finished] = self.best_z[done]
        self.out_res[finished] = self._best_tensor()[done]
        self.best_z = self.best_z[keep]
        if self.on_host:
            finals = (b for i, b in enumerate(self.best) if i not in staying)
            self.retired_max = max(self.retired_max, *finals)
            self.best = [self.best[i] for i in going_on]
            self.ids = [self.ids[i] for i in going_on]
        else:
            self.best_res = self.best_res[keep]
            self.segments.append((self.count, self.index[keep]))
        self.index = self.index[keep]
        self.keep = keep

    def _best_tensor(self) -> Tensor:
        if self.on_host:
            return torch.tensor(self.best, dtype=self.best_z.dtype)
        return self.best_res

    def _history(self, final_res: Tensor) -> Tensor:
        """(iterations, B) residuals on the device; a retired sample keeps its final residual
        from then on."""
        if not self.segments:
            return torch.stack(self.rows)
        history = final_res.expand(self.count, self.batch).clone()
        starts = [0, *(start for start, _ in self.segments)]
        ends = [*starts[1:], self.count]
        samples = [None, *(index for _, index in self.segments)]
        for start, end, index in zip(starts, ends, samples, strict=True):
            if end > start:
                block = torch.stack(self.rows[start:end])
                if index is None:
                    history[start:end] = block
                else:
                    history[start:end, index] = block
        return history

    def finish(self, name: str, n_evals: int) -> tuple[Tensor, SolverStats]:
        best_z, best_res = self.best_z, self._best_tensor()
        if self.index is not None:
            self.out_z[self.index] = best_z
            self.out_res[self.index] = best_res
            best_z, best_res = self.out_z, self.out_res
        if self.on_host:
            trace = self.trace
            sample_evals = torch.tensor([k or self.max_iter for k in self.first_below], dtype=torch.int64)
        else:
            history = self._history(best_res)
            trace = history.amax(1).tolist()  # the one host copy of the loop
            below = history < self.tol
            first = below.to(torch.int8).argmax(0) + 1  # f-evaluations to the first iterate below tol
            sample_evals = torch.where(below.any(0), first, self.max_iter).to(torch.int64)
        if not self.message:
            self.converged = bool((best_res < self.tol).all())
            if self.converged:
                self.message = f"converged: residual < tol={self.tol:g}"
            else:
                self.message = (
                    f"not converged in {self.count} f-evaluations: "
                    f"residual {float(best_res.max()):.3g} > tol={self.tol:g}"
                )
        stats = SolverStats(
            solver=name,
            trace=trace,
            sample_residuals=best_res.detach(),
            sample_evals=sample_evals,
            n_evals=n_evals,
            converged=self.converged,
            diverged=self.diverged,
            message=self.message,
            early_exit=self.early_exit,
            f_work=self.f_work,
        )
        return best_z.reshape(self.shape), stats


def _relative_residuals(g_sizes: list[float], fz_norms: list[float], squared: bool) -> list[float]:
    """||g|| / ||f(z)|| per sample from ||g|| (or ||g||^2) and ||f(z)||; non-finite -> inf."""
    out = []
    for g, norm in zip(g_sizes, fz_norms, strict=True):
        if squared:
            g = math.sqrt(g) if g >= 0 else math.nan
        r = g / max(norm, _EPS)
        out.append(r if math.isfinite(r) and math.isfinite(norm) else math.inf)
    return out


def forward_iteration(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-2,
    max_iter: int = 50,
    callback: Callback | None = None,
    check_every: int | None = None,
    early_exit: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Plain fixed-point iteration z_{k+1} = f(z_k). z0: (B, ...); returns z* of the same shape."""
    mon = Monitor(z0, tol, max_iter, callback, check_every, early_exit=early_exit)
    _check_per_sample(f, early_exit)
    z = mon.z0
    n_evals = 0
    for _ in range(max_iter):
        fz = f(z.view(mon.view_shape)).reshape(z.shape)
        n_evals += 1
        if mon.observe(z, fz) or n_evals == max_iter:
            break
        if (keep := mon.keep) is not None:
            f, fz = f.select(keep), fz.index_select(0, keep)
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
    early_exit: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration with memory m, regulariser lam and mixing beta.

    Keeps the last m iterates z_i and residuals g_i = f(z_i) - z_i (B, m, D) and, per sample,
    picks alpha minimising ||G alpha||^2 + lam' ||alpha||^2 subject to sum(alpha) = 1; then
    z = sum alpha_i (z_i + beta g_i) = beta sum alpha_i f(z_i) + (1 - beta) sum alpha_i z_i.
    lam is relative to the newest squared residual (lam' = lam * ||g_k||^2), so the step does
    not depend on the scale of z and tight float64 solves are not stalled by the regulariser.
    The Gram matrix G G^T is updated one row per iteration, not recomputed; its new diagonal
    entry ||g_k||^2 is also the residual's numerator.
    """
    _validate_anderson(m, lam, beta)
    mon = Monitor(z0, tol, max_iter, callback, check_every, early_exit=early_exit)
    _check_per_sample(f, early_exit)
    z = mon.z0
    G = z.new_empty(z.shape[0], m, z.shape[1])  # residuals g_i = f(z_i) - z_i
    Y = torch.empty_like(G)  # z_i + beta * g_i: the next z is sum_i alpha_i Y_i
    views = _AndersonViews(G, Y)
    small = mon.on_host and z.shape[0] <= HOST_WEIGHTS_MAX_BATCH
    weights = (_HostWeights if small else _DeviceWeights)(z, m, lam)

    n_evals = 0
    for k in range(max_iter):
        fz = f(z.view(mon.view_shape)).reshape(z.shape)
        n_evals += 1
        slot, n = k % m, min(k + 1, m)
        g = torch.sub(fz, z, out=views.G_slot[slot])
        # g^T G^T rather than G g: the same numbers, several times faster on CPU.
        row = torch.bmm(g.unsqueeze(1), views.Gt[n]).squeeze(1)  # (B, n); row[:, slot] = ||g||^2
        if mon.observe(z, fz, g_sqnorm=row[:, slot]) or n_evals == max_iter:
            break
        if (keep := mon.keep) is not None:
            f = f.select(keep)
            z, fz, row, G, Y = (t.index_select(0, keep) for t in (z, fz, row, G, Y))
            views = _AndersonViews(G, Y)
            weights.narrow(keep)
        if beta == 1:
            views.Y_slot[slot].copy_(fz)
        else:
            torch.add(z, views.G_slot[slot], alpha=beta, out=views.Y_slot[slot])
        z = torch.bmm(weights(row, slot, n), views.Y[n]).squeeze(1)
    return mon.finish("anderson", n_evals)


#: On the CPU, Anderson batches of up to this many samples solve their small least-squares
#: problems in Python floats: cheaper than a dozen small tensor operations per iteration.
HOST_WEIGHTS_MAX_BATCH = 8


class _AndersonViews:
    """Anderson's per-slot and first-n views of its buffers (B, m, D), made once per batch
    (slicing costs a dispatch per use, and the loop's own operations are few)."""

    def __init__(self, G: Tensor, Y: Tensor):
        m = G.shape[1]
        self.G_slot = [G[:, i] for i in range(m)]
        self.Y_slot = [Y[:, i] for i in range(m)]
        self.Gt = [None, *(G[:, :n].transpose(1, 2) for n in range(1, m + 1))]
        self.Y = [None, *(Y[:, :n] for n in range(1, m + 1))]


class _DeviceWeights:
    """Anderson's weights alpha (B, 1, n) from the Gram matrix G G^T (B, m, m), kept as a tensor
    on the iterates' device and updated one row and column per iteration; no host sync.

    Per sample, alpha minimises ||G alpha||^2 + lam' ||alpha||^2 subject to sum(alpha) = 1: the
    bordered least-squares system [[0, 1^T], [1, H]] has the closed form
    alpha = H^-1 1 / (1^T H^-1 1), with H = G G^T / ||g_k||^2 + lam I."""

    def __init__(self, z: Tensor, m: int, lam: float):
        self.lam_eye = [None, *(lam * torch.eye(n, dtype=z.dtype, device=z.device) for n in range(1, m + 1))]
        self.ones = [None, *(z.new_ones(1, n, 1) for n in range(1, m + 1))]
        self._set(z.new_zeros(z.shape[0], m, m))

    def _set(self, gram: Tensor) -> None:
        m = gram.shape[1]
        self.gram = gram
        self.block = [None, *(gram[:, :n, :n] for n in range(1, m + 1))]
        self.row = [[None, *(gram[:, i, :n] for n in range(1, m + 1))] for i in range(m)]
        self.col = [[None, *(gram[:, :n, i] for n in range(1, m + 1))] for i in range(m)]

    def narrow(self, keep: Tensor) -> None:
        self._set(self.gram.index_select(0, keep))

    def __call__(self, row: Tensor, slot: int, n: int) -> Tensor:
        """row (B, n): g_k . g_i of the newest residual, which goes into ``slot``."""
        self.row[slot][n].copy_(row)
        self.col[slot][n].copy_(row)
        scale = row[:, slot].clamp_min(_EPS).view(-1, 1, 1)
        H = torch.addcdiv(self.lam_eye[n], self.block[n], scale)
        w = torch.linalg.solve_ex(H, self.ones[n])[0]  # (B, n, 1)
        return w.div_(w.sum(1, keepdim=True)).transpose(1, 2)


class _HostWeights:
    """``_DeviceWeights`` in Python floats, for a few samples on the CPU (float64 arithmetic,
    Gaussian elimination with partial pivoting; a singular system gives NaN weights, as the
    batched solve does)."""

    def __init__(self, z: Tensor, m: int, lam: float):
        self.lam, self.dtype = lam, z.dtype
        self.gram = [[[0.0] * m for _ in range(m)] for _ in range(z.shape[0])]

    def narrow(self, keep: Tensor) -> None:
        self.gram = [self.gram[i] for i in keep.tolist()]

    def __call__(self, row: Tensor, slot: int, n: int) -> Tensor:
        alphas = []
        for gram, new in zip(self.gram, row.tolist(), strict=True):
            for i in range(n):
                gram[slot][i] = gram[i][slot] = new[i]
            scale = max(new[slot], _EPS)
            H = [[gram[i][j] / scale + (self.lam if i == j else 0.0) for j in range(n)] for i in range(n)]
            w = _solve_ones(H)
            total = sum(w)
            alphas.append([x / total if total else math.nan for x in w])
        return torch.tensor(alphas, dtype=self.dtype).unsqueeze(1)


def _solve_ones(H: list[list[float]]) -> list[float]:
    """w with H w = 1 (n x n): Gaussian elimination with partial pivoting; NaN if singular."""
    n = len(H)
    a = [[*row, 1.0] for row in H]
    for i in range(n):
        p = max(range(i, n), key=lambda r: abs(a[r][i]))
        a[i], a[p] = a[p], a[i]
        if a[i][i] == 0.0 or not math.isfinite(a[i][i]):
            return [math.nan] * n
        for j in range(i + 1, n):
            factor = a[j][i] / a[i][i]
            for c in range(i, n + 1):
                a[j][c] -= factor * a[i][c]
    w = [0.0] * n
    for i in reversed(range(n)):
        w[i] = (a[i][n] - sum(a[i][c] * w[c] for c in range(i + 1, n))) / a[i][i]
    return w


def broyden(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-2,
    max_iter: int = 50,
    callback: Callback | None = None,
    check_every: int | None = None,
    early_exit: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Broyden's ("good") method on g(z) = f(z) - z, per sample, without line search.

    The inverse Jacobian of g is kept as H = -I + sum_i u_i v_i^T (rank grows by one per
    iteration, up to max_iter - 1; memory 2 * B * max_iter * D). Each iteration applies H and
    H^T once (the next step reuses H g_k = -step_k: H g_{k+1} = -step_k + H (g_{k+1} - g_k)).
    """
    mon = Monitor(z0, tol, max_iter, callback, check_every, early_exit=early_exit)
    _check_per_sample(f, early_exit)
    z = mon.z0
    # Rank-r update vectors, in buffers that double when full (max_iter can be large).
    U = z.new_zeros(z.shape[0], min(max_iter, 8), z.shape[1])
    V = torch.zeros_like(U)

    def inv_jac(x: Tensor, r: int) -> Tensor:  # (-I + U^T V) x, as row vectors (fast bmm form)
        return x.unsqueeze(1).bmm(V[:, :r].transpose(1, 2)).bmm(U[:, :r]).squeeze(1) - x

    def inv_jac_t(x: Tensor, r: int) -> Tensor:  # (-I + V^T U) x
        return x.unsqueeze(1).bmm(U[:, :r].transpose(1, 2)).bmm(V[:, :r]).squeeze(1) - x

    fz = f(z.view(mon.view_shape)).reshape(z.shape)
    n_evals = 1
    g = fz - z
    if not (mon.observe(z, fz, g) or max_iter == 1):
        if (keep := mon.keep) is not None:
            f = f.select(keep)
            z, g, U, V = (t.index_select(0, keep) for t in (z, g, U, V))
        step = g  # -H_0 g = g
        for r in range(max_iter - 1):
            z = z + step
            fz = f(z.view(mon.view_shape)).reshape(z.shape)
            n_evals += 1
            g_new = fz - z
            if mon.observe(z, fz, g_new) or n_evals == max_iter:
                break
            if (keep := mon.keep) is not None:
                f = f.select(keep)
                z, g, g_new, step, U, V = (t.index_select(0, keep) for t in (z, g, g_new, step, U, V))
            h_dg = inv_jac(g_new - g, r)
            v = inv_jac_t(step, r)
            denom = torch.linalg.vecdot(v, g_new - g).unsqueeze(1)
            safe = denom.abs() > _EPS
            u = (step - h_dg) / torch.where(safe, denom, torch.ones_like(denom))
            if r == U.shape[1]:
                U = torch.cat((U, torch.zeros_like(U)), 1)
                V = torch.cat((V, torch.zeros_like(V)), 1)
            u, v = U[:, r].copy_(u * safe), V[:, r].copy_(v * safe)
            # -H_{r+1} g_new = -(H_r g + H_r dg) - u (v . g_new), with H_r g = -step
            step = step - h_dg - u * torch.linalg.vecdot(v, g_new).unsqueeze(1)
            g = g_new
    return mon.finish("broyden", n_evals)


# ----------------------------------------------------------------------------- the registry

SolverFn = Callable[..., tuple[Tensor, SolverStats]]
#: Options every solver takes; the layer and the apps set them per call. The rest of a solver's
#: keyword-only options are its own (Anderson's m, lam, beta).
COMMON_OPTIONS = ("tol", "max_iter", "callback", "check_every")
#: Options a solver may take, beyond its own: ``early_exit`` (stop iterating converged samples,
#: see ``Monitor``); the layer sets it per call for the solvers that take it.
OPTIONAL_OPTIONS = ("early_exit",)


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
        """The options this solver takes beyond COMMON_OPTIONS and OPTIONAL_OPTIONS, with their defaults."""
        return {k: v for k, v in self.defaults.items() if k not in COMMON_OPTIONS + OPTIONAL_OPTIONS}

    @property
    def supports_early_exit(self) -> bool:
        """Whether it takes ``early_exit`` (stops iterating the samples that have converged)."""
        return "early_exit" in self.defaults

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
            check_early_exit(opts.get("early_exit", False))
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
