"""One request's solver settings and the solve of one image by each solver of the race.

    image (1, 3, 32, 32) -> DEQClassifier.predict(solver=..., **settings) -> SolverResult

``RACE`` is the one list of solvers the demo runs side by side: any solver registered in
``deq.solvers`` can join it. The last one is the baseline the others are compared with.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..data import CIFAR10_CLASSES
from ..model import DEQClassifier
from ..solvers import SolverStats, lookup

__all__ = [
    "RACE",
    "SETTING_BOUNDS",
    "FLOAT64_BELOW_TOL",
    "SolveSettings",
    "SolverResult",
    "Step",
    "solve",
    "time_solve",
    "report",
    "classify",
    "top_classes",
    "trustworthy",
    "TRUSTED_RESIDUAL",
    "solver_label",
]

#: The solvers the demo races, in order; the last is the baseline (plain forward iteration).
RACE: tuple[str, ...] = ("anderson", "forward")

#: Tolerances below this are solved in float64: float32 residuals bottom out near 1e-7, where
#: both solvers would stall above the tolerance line as if it were reachable.
FLOAT64_BELOW_TOL = 1e-6

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


@dataclass(frozen=True)
class Step:
    """One f-evaluation of a traced solve: its 0-based iteration, the batch's relative residual,
    milliseconds since the solve started, and the answer of the head applied to f(z) there
    (class index and its probability; -1 and nan if the logits were not finite)."""

    iteration: int
    residual: float
    ms: float
    answer: int
    probability: float


@dataclass
class SolverResult:
    """One solver's run on one image. probs: the class probabilities, None if not finite.

    trace, times_ms and answers have one entry per f-evaluation of the traced run (the one drawn);
    wall_s is that run's time, callbacks included. timing_s holds the times of repeated solves
    of the same image without callbacks, when they were measured (``stream_solve`` does)."""

    solver: str
    trace: list[float]
    n_evals: int
    residual: float
    converged: bool
    diverged: bool
    message: str
    wall_s: float
    probs: list[float] | None
    times_ms: list[float] = field(default_factory=list)
    answers: list[tuple[int, float]] = field(default_factory=list)
    timing_s: list[float] = field(default_factory=list)
    dtype: str = "float32"  # the arithmetic of the solve

    @property
    def label(self) -> str:
        return solver_label(self.solver)

    @property
    def prediction(self) -> str | None:
        if self.probs is None:
            return None
        return CIFAR10_CLASSES[self.predicted_index]

    @property
    def predicted_index(self) -> int:
        return max(range(len(self.probs)), key=self.probs.__getitem__) if self.probs is not None else -1

    @property
    def settled_at(self) -> int | None:
        """The f-evaluation (1-based) from which every answer along the solve was the final
        prediction; None without answers or a finite prediction, or if the last one differs."""
        final = self.predicted_index
        if final < 0 or not self.answers or self.answers[-1][0] != final:
            return None
        k = len(self.answers)
        while k > 0 and self.answers[k - 1][0] == final:
            k -= 1
        return k + 1

    @property
    def timed_wall_s(self) -> float:
        """The wall time to report: the median of the repeated solves if there are at least
        three, else the first repeated solve, else the traced run's."""
        if len(self.timing_s) >= 3:
            return statistics.median(self.timing_s)
        return self.timing_s[0] if self.timing_s else self.wall_s

    @property
    def timing_note(self) -> str:
        """How ``timed_wall_s`` was measured, in words."""
        n = len(self.timing_s)
        if n >= 3:
            return f"median of {n} untraced solves"
        return "a single untraced solve (noisy)" if n else "the traced run (with its tracing: noisy)"


def _timed_predict(
    model: DEQClassifier, image: Tensor, solver: str, settings: SolveSettings, **hooks
) -> tuple[Tensor, SolverStats, float]:
    """(logits, stats, seconds) of one solve of ``image`` on the model's device and in its
    precision (float64 copies solve in float64); ``hooks``: predict's callback and on_logits."""
    weight = next(model.parameters())
    image = image.to(device=weight.device, dtype=weight.dtype)
    start = time.perf_counter()
    logits, stats = model.predict(image, solver=solver, **hooks, **settings.solver_kwargs(solver))
    if logits.is_cuda:
        torch.cuda.synchronize()
    return logits, stats, time.perf_counter() - start


def solve(
    model: DEQClassifier,
    image: Tensor,
    solver: str,
    settings: SolveSettings,
    callback: Callable[[Step], None] | None = None,
) -> SolverResult:
    """Classify one image (1, 3, 32, 32) in [0, 1], solving its equilibrium from z0 = 0 with
    ``solver``, traced: ``callback(step)`` sees every f-evaluation (residual, time, answer)."""
    answers: list[tuple[int, float]] = []
    times: list[float] = []

    def on_logits(logits: Tensor) -> None:
        probs = torch.softmax(logits[0].double(), 0)
        finite = bool(torch.isfinite(probs).all())
        answers.append((int(probs.argmax()), float(probs.max())) if finite else (-1, math.nan))

    def on_residual(iteration: int, residual: float) -> None:
        times.append((time.perf_counter() - start) * 1e3)
        if callback is not None:
            callback(Step(iteration, residual, times[-1], *(answers[-1] if answers else (-1, math.nan))))

    start = time.perf_counter()
    hooks = {"callback": on_residual, "on_logits": on_logits}
    logits, stats, wall = _timed_predict(model, image, solver, settings, **hooks)
    return SolverResult(
        solver=solver,
        trace=list(stats.trace),
        n_evals=stats.n_evals,
        residual=stats.residual,
        converged=stats.converged,
        diverged=stats.diverged,
        message=stats.message,
        wall_s=wall,
        probs=_probabilities(logits),
        times_ms=times,
        answers=answers,
        dtype=str(logits.dtype).removeprefix("torch."),
    )


def time_solve(model: DEQClassifier, image: Tensor, solver: str, settings: SolveSettings) -> float:
    """Seconds one untraced solve of ``image`` takes (no callbacks: the cost the solver has)."""
    return _timed_predict(model, image, solver, settings)[2]


def report(results: dict[str, SolverResult], race: tuple[str, ...], settings: SolveSettings) -> dict:
    """A request's outcome as plain JSON data (the API's result): the settings, and per solver of
    the race its per-f-evaluation residuals, times and answers, the f-evaluation count, whether it
    converged or diverged, its final residual, wall times and class probabilities."""

    def one(r: SolverResult) -> dict:
        finite = lambda v: v if math.isfinite(v) else None  # noqa: E731 (JSON has no inf/NaN)
        return {
            "solver": r.solver,
            "label": r.label,
            "f_evals": r.n_evals,
            "iterations": max(len(r.trace) - 1, 0),
            "converged": r.converged,
            "diverged": r.diverged,
            "message": r.message,
            "dtype": r.dtype,
            "residual": finite(r.residual),
            "wall_ms": round(r.timed_wall_s * 1e3, 3),
            "wall_ms_measured_as": r.timing_note,
            "wall_ms_runs": [round(t * 1e3, 3) for t in r.timing_s],
            "prediction": r.prediction,
            "answer_final_at_f_eval": r.settled_at,
            "probabilities": None if r.probs is None else dict(zip(CIFAR10_CLASSES, r.probs, strict=True)),
            "trace": {
                "residual": [finite(v) for v in r.trace],
                "ms": [round(t, 3) for t in r.times_ms],
                "answer": [CIFAR10_CLASSES[a] if a >= 0 else None for a, _ in r.answers],
                "probability": [finite(p) for _, p in r.answers],
            },
        }

    solvers = [one(results[s]) for s in race if s in results]
    return {"settings": asdict(settings), "race": list(race), "solvers": solvers}


def _probabilities(logits: Tensor) -> list[float] | None:
    logits = logits[0].double()
    return torch.softmax(logits, 0).tolist() if bool(torch.isfinite(logits).all()) else None


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
