"""One request's solver settings and the solve of one image by each solver of the race.

    image (1, 3, 32, 32) -> DEQClassifier.predict(solver=..., **settings) -> SolverResult

``RACE`` is the one list of solvers the demo runs side by side: any solver registered in
``deq.solvers`` can join it. The last one is the baseline the others are compared with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..data import CIFAR10_CLASSES
from ..model import DEQClassifier
from ..solvers import lookup

__all__ = [
    "RACE",
    "SETTING_BOUNDS",
    "SolveSettings",
    "SolverResult",
    "solve",
    "classify",
    "top_classes",
    "trustworthy",
    "TRUSTED_RESIDUAL",
    "solver_label",
]

#: The solvers the demo races, in order; the last is the baseline (plain forward iteration).
RACE: tuple[str, ...] = ("anderson", "forward")

#: Accepted range of each solver setting: keeps the cost of any request bounded.
SETTING_BOUNDS = {
    "beta": (0.01, 10.0),
    "tol": (1e-12, 0.5),
    "m": (1, 20),
    "lam": (0.0, 10.0),
    "max_iter": (1, 1000),
}


@dataclass(frozen=True)
class SolveSettings:
    """Solver options of one request (ranges: SETTING_BOUNDS). Each solver takes the ones it
    accepts (forward iteration only tol and max_iter)."""

    beta: float = 1.0
    tol: float = 1e-4
    m: int = 5
    lam: float = 1e-4
    max_iter: int = 100

    @classmethod
    def from_ui(
        cls, beta: float, log10_tol: float, m: float, log10_lam: float, max_iter: float
    ) -> SolveSettings:
        """From the sliders (tol and lam as powers of ten); raises ValueError on bad values."""
        try:
            values = [float(v) for v in (beta, log10_tol, m, log10_lam, max_iter)]
        except OverflowError:  # an integer beyond float range, e.g. max_iter = 10**400
            raise ValueError("Solver settings are out of range.") from None
        except (TypeError, ValueError):
            raise ValueError("Solver settings must be numbers.") from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError("Solver settings must be finite numbers.")
        beta, log10_tol, m, log10_lam, max_iter = values
        if not (m.is_integer() and max_iter.is_integer()):
            raise ValueError("m and max_iter must be whole numbers.")
        try:
            tol, lam = 10.0**log10_tol, 10.0**log10_lam
        except OverflowError:
            raise ValueError("tol and lam must be between 1e-12 and 10.") from None
        return cls(beta, tol, int(m), lam, int(max_iter)).validate()

    def validate(self) -> SolveSettings:
        """Raise ValueError (a message for the user) unless every setting is in range; returns self."""
        for name, (lo, hi) in SETTING_BOUNDS.items():
            value = getattr(self, name)
            kind = int if name in ("m", "max_iter") else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(
                    f"{name} must be {'a whole number' if kind is int else 'a number'}, got {value!r}."
                )
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}.")
        return self

    def solver_kwargs(self, solver: str) -> dict:
        """The settings ``solver`` takes, as options of ``DEQClassifier.predict``."""
        return lookup(solver).select(asdict(self))


def solver_label(solver: str) -> str:
    """The solver's display name ("Anderson", "forward iteration", ...)."""
    return lookup(solver).label


@dataclass
class SolverResult:
    """One solver's run on one image. probs: the class probabilities, None if not finite."""

    solver: str
    trace: list[float]
    n_evals: int
    residual: float
    converged: bool
    diverged: bool
    message: str
    wall_s: float
    probs: list[float] | None

    @property
    def label(self) -> str:
        return solver_label(self.solver)

    @property
    def prediction(self) -> str | None:
        if self.probs is None:
            return None
        return CIFAR10_CLASSES[max(range(len(self.probs)), key=self.probs.__getitem__)]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def solve(
    model: DEQClassifier,
    image: Tensor,
    solver: str,
    settings: SolveSettings,
    callback: Callable[[int, float], None] | None = None,
) -> SolverResult:
    """Classify one image (1, 3, 32, 32) in [0, 1], solving its equilibrium from z0 = 0 with
    ``solver``; ``callback(iteration, residual)`` sees every f-evaluation."""
    start = time.perf_counter()
    logits, stats = model.predict(
        image.to(_device(model)), solver=solver, callback=callback, **settings.solver_kwargs(solver)
    )
    if logits.is_cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    logits = logits[0].double()
    probs = torch.softmax(logits, 0).tolist() if bool(torch.isfinite(logits).all()) else None
    return SolverResult(
        solver=solver,
        trace=list(stats.trace),
        n_evals=stats.n_evals,
        residual=stats.residual,
        converged=stats.converged,
        diverged=stats.diverged,
        message=stats.message,
        wall_s=wall,
        probs=probs,
    )


def classify(
    model: DEQClassifier, image: Tensor, settings: SolveSettings | None = None, solver: str = "anderson"
) -> SolverResult:
    """Classify one image (1, 3, 32, 32) in [0, 1] with the given solver."""
    settings = (settings or SolveSettings()).validate()
    with torch.inference_mode():
        return solve(model, image, solver, settings)


def top_classes(probs: list[float] | None, k: int = 5) -> dict[str, float] | None:
    """The k most likely classes as {name: probability} (what gr.Label shows); None stays None."""
    if probs is None:
        return None
    ranked = sorted(zip(CIFAR10_CLASSES, probs, strict=True), key=lambda item: -item[1])[:k]
    return {name: float(p) for name, p in ranked}


#: A solve whose returned iterate is farther than this from a fixed point (relative residual)
#: has not found the equilibrium the classifier was trained on: its label is not shown.
TRUSTED_RESIDUAL = 0.1


def trustworthy(r: SolverResult) -> bool:
    """Whether a solver's answer may be shown as the prediction: finite, not diverged, and
    its iterate within TRUSTED_RESIDUAL of a fixed point (or converged to the user's tol)."""
    return r.probs is not None and not r.diverged and (r.converged or r.residual <= TRUSTED_RESIDUAL)
