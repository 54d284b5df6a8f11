"""The logic behind the Gradio demo (``app.py`` only lays it out): inference, the live solver
stream, the Plotly figures, the results table, and the checkpoints/model cards on offer.

Nothing here imports gradio, so all of it is unit-tested without a server or a browser.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import torch
from torch import Tensor

from .checkpoint import CONFIG_NAME, LOG_NAME, WEIGHTS_NAME, load_model, resolve_checkpoint
from .images import PreparedImage
from .model import CIFAR10_CLASSES, DEQClassifier

__all__ = [
    "SOLVER_NAMES",
    "SolveSettings",
    "SolverResult",
    "Frame",
    "solve",
    "classify",
    "stream_solve",
    "warm_up",
    "top_classes",
    "residual_figure",
    "results_table",
    "find_checkpoints",
    "model_sources",
    "load_models",
    "default_device",
    "card_markdown",
    "read_train_log",
    "training_figures",
    "trustworthy",
    "TRUSTED_RESIDUAL",
]

log = logging.getLogger(__name__)

SOLVER_NAMES = {"anderson": "Anderson", "forward": "forward iteration"}
COLORS = {"anderson": "#d62728", "forward": "#1f77b4"}
#: Seconds between streamed frames: the browser re-renders the plot on each (~0.1 s on 2 cores).
FRAME_INTERVAL = 0.15
#: Accepted range of each solver setting: keeps the cost of any request bounded.
SETTING_BOUNDS = {
    "beta": (0.01, 10.0),
    "tol": (1e-12, 0.5),
    "m": (1, 20),
    "lam": (0.0, 10.0),
    "max_iter": (1, 1000),
}


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SolveSettings:
    """Solver options of one request (ranges: SETTING_BOUNDS)."""

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
        """Options of ``model.deq.solve`` for ``solver`` (forward iteration takes fewer)."""
        if solver == "anderson":
            return {
                "tol": self.tol,
                "max_iter": self.max_iter,
                "m": self.m,
                "lam": self.lam,
                "beta": self.beta,
            }
        return {"tol": self.tol, "max_iter": self.max_iter}


# ----------------------------------------------------------------------------- inference


@dataclass
class SolverResult:
    """One solver's run on one image. probs: the 10 class probabilities, None if not finite."""

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
    def prediction(self) -> str | None:
        if self.probs is None:
            return None
        return CIFAR10_CLASSES[max(range(len(self.probs)), key=self.probs.__getitem__)]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def solve(
    model: DEQClassifier,
    x: Tensor,
    solver: str,
    settings: SolveSettings,
    callback: Callable[[int, float], None] | None = None,
) -> SolverResult:
    """Solve the equilibrium of the injection x (1, C, H, W) from z0 = 0 and classify z*.

    Call under ``torch.inference_mode()``; ``callback(iteration, residual)`` sees every
    f-evaluation.
    """
    start = time.perf_counter()
    z_star, stats = model.deq.solve(x, solver=solver, callback=callback, **settings.solver_kwargs(solver))
    if x.is_cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    logits = model.head(z_star)[0].double()
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
        x = model.inject(image.to(_device(model)))
        return solve(model, x, solver, settings)


def top_classes(probs: list[float] | None, k: int = 5) -> dict[str, float] | None:
    """The k most likely classes as {name: probability} (what gr.Label shows); None stays None."""
    if probs is None:
        return None
    ranked = sorted(zip(CIFAR10_CLASSES, probs, strict=True), key=lambda item: -item[1])[:k]
    return {name: float(p) for name, p in ranked}


# ----------------------------------------------------------------------------- figures


#: Plain white styling without a Plotly template: templates cost ~25 ms to build and 6 kB per
#: streamed frame.
_AXIS = {"showgrid": True, "gridcolor": "#e6e6e6", "showline": True, "linecolor": "#999", "zeroline": False}
_LAYOUT = {"template": "none", "plot_bgcolor": "white", "paper_bgcolor": "white", "hovermode": "x"}


def _finite_or_none(values: list[float]) -> list[float | None]:
    """Log axes cannot show 0, inf or NaN: leave a gap instead."""
    return [v if math.isfinite(v) and v > 0 else None for v in values]


def residual_figure(settings: SolveSettings) -> go.Figure:
    """The empty residual chart of one request: one (empty) trace per solver, log-y, tol line.

    Built in one constructor call: each update_layout/add_* call re-validates (~10 ms apiece).
    """
    names = {
        "anderson": f"Anderson (m={settings.m}, beta={settings.beta:g})",
        "forward": SOLVER_NAMES["forward"],
    }
    traces = [
        {"type": "scatter", "x": [], "y": [], "name": names[solver], "mode": "lines+markers",
         "line": {"color": COLORS[solver], "width": 2}, "marker": {"size": 4}}
        for solver in SOLVER_NAMES
    ]  # fmt: skip
    tol = settings.tol
    tol_line = {
        "type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": tol, "y1": tol,
        "line": {"color": "#555", "dash": "dash", "width": 1.5},
    }  # fmt: skip
    tol_label = {  # an annotation's y on a log axis is log10 of the value
        "xref": "paper", "x": 0.01, "xanchor": "left", "yref": "y", "y": math.log10(tol), "yanchor": "bottom",
        "text": f"tol = {tol:.0e}", "showarrow": False, "font": {"color": "#555"},
    }  # fmt: skip
    layout = {
        **_LAYOUT,
        "height": 420,
        "margin": {"l": 70, "r": 20, "t": 20, "b": 55},
        "xaxis": {**_AXIS, "title": {"text": "iteration (one f-evaluation each)"}, "rangemode": "tozero"},
        "yaxis": {**_AXIS, "title": {"text": "relative residual ‖f(z) − z‖ / ‖f(z)‖"}, "type": "log",
                  "exponentformat": "power"},
        "legend": {"x": 0.99, "y": 0.99, "xanchor": "right", "bgcolor": "rgba(255,255,255,0.8)"},
        "shapes": [tol_line],
        "annotations": [tol_label],
    }  # fmt: skip
    return go.Figure(data=traces, layout=layout)


def _mark_divergence(fig: go.Figure, result: SolverResult) -> None:
    points = [(i, v) for i, v in enumerate(result.trace) if math.isfinite(v) and v > 0]
    if not points:
        return
    i, v = points[-1]
    color = COLORS[result.solver]
    fig.add_annotation(
        x=i, y=math.log10(v), text=f"{SOLVER_NAMES[result.solver]} diverged", showarrow=True, ax=-40, ay=-30,
        arrowcolor=color, font={"color": color},
    )  # fmt: skip


# ----------------------------------------------------------------------------- tables and messages


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _outcome(r: SolverResult) -> str:
    if r.diverged:
        return "**diverged**"
    return "converged" if r.converged else "not converged"


def results_table(results: dict[str, SolverResult]) -> str:
    """Markdown: iterations, f-evaluations, final residual, wall time per solver, the speed-up of
    Anderson over forward iteration and whether both reach the same prediction."""
    if not results:
        return ""
    lines = [
        "| solver | iterations | f-evals | residual | wall time | result | prediction |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for solver in SOLVER_NAMES:
        r = results.get(solver)
        if r is None:
            lines.append(f"| {SOLVER_NAMES[solver]} | … | | | | running | |")
            continue
        pred = f"{r.prediction} ({max(r.probs):.0%})" if r.probs is not None else "–"
        lines.append(
            f"| {SOLVER_NAMES[solver]} | {max(len(r.trace) - 1, 0)} | {r.n_evals} | {r.residual:.2e} | "
            f"{_fmt_time(r.wall_s)} | {_outcome(r)} | {pred} |"
        )
    a, f = results.get("anderson"), results.get("forward")
    if a is not None and f is not None:
        return "\n".join(lines) + "\n\n" + _speedup(a, f) + "\n\n" + _agreement(a, f)
    return "\n".join(lines)


def _speedup(a: SolverResult, f: SolverResult) -> str:
    if not a.converged:
        return "**Speed-up:** none to report, Anderson did not reach tol."
    at_least = "" if f.converged else "at least "  # forward iteration stopped at max_iter
    evals = f.n_evals / max(a.n_evals, 1)
    wall = f.wall_s / a.wall_s if a.wall_s > 0 else float("inf")
    return (
        f"**Speed-up of Anderson over forward iteration:** {at_least}{evals:.1f}x fewer f-evaluations, "
        f"{at_least}{wall:.1f}x less wall time"
        + ("" if f.converged else " (forward iteration did not reach tol)")
    )


def _agreement(a: SolverResult, f: SolverResult) -> str:
    if a.prediction is None or f.prediction is None:
        return "**Same prediction:** cannot tell, a solver gave no finite answer."
    if a.prediction == f.prediction:
        return f"**Same prediction:** yes, both say *{a.prediction}*."
    return f"**Same prediction:** no: Anderson says *{a.prediction}*, forward iteration *{f.prediction}*."


#: A solve whose returned iterate is farther than this from a fixed point (relative residual)
#: has not found the equilibrium the classifier was trained on: its label is not shown.
TRUSTED_RESIDUAL = 0.1


def trustworthy(r: SolverResult) -> bool:
    """Whether a solver's answer may be shown as the prediction: finite, not diverged, and
    its iterate within TRUSTED_RESIDUAL of a fixed point (or converged to the user's tol)."""
    return r.probs is not None and not r.diverged and (r.converged or r.residual <= TRUSTED_RESIDUAL)


def _warnings(results: dict[str, SolverResult], settings: SolveSettings) -> list[str]:
    out = []
    for r in results.values():
        name = SOLVER_NAMES[r.solver]
        if r.diverged:
            hint = " (try a smaller beta)" if r.solver == "anderson" and settings.beta > 1 else ""
            reason = r.message.removeprefix("diverged: ")
            out.append(f"{name} diverged ({reason}){hint}: its answer is not trustworthy.")
        elif r.probs is None:
            out.append(f"{name} gave a non-finite output: no prediction from it.")
        elif not trustworthy(r):
            out.append(f"{name} stopped at residual {r.residual:.1e}, far from the equilibrium: "
                       "its answer is not trustworthy.")  # fmt: skip
    if results and not any(trustworthy(r) for r in results.values()):
        out.append("No solver reached a usable equilibrium for these settings: no prediction is shown.")
    return out


def _status(
    results: dict[str, SolverResult], running: tuple[str, int, float] | None, settings: SolveSettings
) -> str:
    parts = []
    if running is not None:
        solver, it, res = running
        parts.append(f"Solving… {SOLVER_NAMES[solver]}: iteration {it}, residual {res:.2e}")
    else:
        parts.append("Done.")
    for r in results.values():
        if not r.converged and not r.diverged:
            parts.append(f"{SOLVER_NAMES[r.solver]} stopped at max_iter={settings.max_iter} above tol.")
    if running is None and settings.tol < 1e-6:
        parts.append("Residuals bottom out near 1e-7 in float32: a smaller tol may not be reachable.")
    parts += [f"⚠️ {w}" for w in _warnings(results, settings)]
    return "  \n".join(parts)


# ----------------------------------------------------------------------------- the live stream


@dataclass
class Frame:
    """One update of the UI. figure is the same object in every frame of a request (updated in
    place); label is None until a solver has a finite answer; final marks the last frame."""

    figure: go.Figure
    label: dict[str, float] | None
    table: str
    status: str
    warnings: list[str] = field(default_factory=list)
    results: dict[str, SolverResult] = field(default_factory=dict)
    final: bool = False


class _Cancelled(Exception):
    pass


def _worker(
    model: DEQClassifier,
    image: Tensor,
    settings: SolveSettings,
    events: queue.Queue,
    cancel: threading.Event,
) -> None:
    """Runs the solves in its own thread (a callback cannot yield) and reports through ``events``:
    ("step", solver, iteration, residual), ("done", SolverResult), ("error", exc), ("end",)."""
    try:
        with torch.inference_mode():  # grad mode is per thread: enter it here
            x = model.inject(image.to(_device(model)))
            for solver in SOLVER_NAMES:  # Anderson first, then forward iteration

                def callback(iteration: int, residual: float, solver: str = solver) -> None:
                    if cancel.is_set():
                        raise _Cancelled
                    events.put(("step", solver, iteration, residual))

                events.put(("done", solve(model, x, solver, settings, callback)))
    except _Cancelled:
        pass
    except Exception as err:
        events.put(("error", err))
    finally:
        events.put(("end",))


def stream_solve(
    model: DEQClassifier,
    image: Tensor | PreparedImage,
    settings: SolveSettings,
    *,
    interval: float = FRAME_INTERVAL,
) -> Iterator[Frame]:
    """Solve the image's equilibrium with each solver in turn, yielding Frames as it goes.

    image: (1, 3, 32, 32) in [0, 1] (or a PreparedImage). The first frame comes with the first
    residual, then at most one per ``interval`` seconds; the last frame (final=True) holds the
    complete curves, the label, the table and any warnings. Closing the generator early stops
    the solves.
    """
    settings.validate()
    tensor = image.tensor if isinstance(image, PreparedImage) else image
    progress = _Progress({s: [] for s in SOLVER_NAMES})
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    thread = threading.Thread(
        target=_worker, args=(model, tensor, settings, events, cancel), name="deq-solve", daemon=True
    )
    thread.start()
    fig = residual_figure(settings)  # while the solve starts
    last_yield, dirty = -math.inf, False
    try:
        while not progress.ended:
            wait = max(0.0, last_yield + interval - time.perf_counter()) if dirty else 1.0
            batch = _drain(events, wait)
            if not batch and not thread.is_alive() and events.empty():
                break  # cannot happen (the worker always sends "end"), but never hang
            for event in batch:
                dirty |= progress.apply(event)
            if dirty and not progress.ended and time.perf_counter() - last_yield >= interval:
                yield _frame(fig, progress, settings)
                last_yield, dirty = time.perf_counter(), False
        thread.join()  # it has sent "end"; a thread still in torch at interpreter exit aborts it
        if progress.error is not None:
            raise progress.error
        yield _frame(fig, progress, settings, final=True)
    finally:
        cancel.set()  # stops the solve at its next f-evaluation if the consumer left early
        thread.join(timeout=10)


def warm_up(model: DEQClassifier) -> None:
    """One tiny request, so that the first real one does not pay for lazy initialisation
    (plotly imports its validators on the first figure, ~0.2-0.5 s; torch sets up its kernels)."""
    blank = torch.full((1, 3, model.config.image_size, model.config.image_size), 0.5)
    for _ in stream_solve(model, blank, SolveSettings(max_iter=2)):
        pass


def _drain(events: queue.Queue, timeout: float) -> list[tuple]:
    """Every event queued now, waiting up to ``timeout`` seconds for the first one."""
    try:
        batch = [events.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            batch.append(events.get_nowait())
        except queue.Empty:
            return batch


@dataclass
class _Progress:
    """What the worker has reported so far."""

    traces: dict[str, list[float]]
    results: dict[str, SolverResult] = field(default_factory=dict)
    running: tuple[str, int, float] | None = None  # solver, iteration, residual
    error: Exception | None = None
    ended: bool = False

    def apply(self, event: tuple) -> bool:
        """Take in one worker event; True when the picture changed."""
        kind = event[0]
        if kind == "step":
            _, solver, iteration, residual = event
            self.traces[solver].append(residual)
            self.running = (solver, iteration, residual)
            return True
        if kind == "done":
            result = event[1]
            self.results[result.solver] = result
            self.traces[result.solver] = result.trace
            return True
        if kind == "error":
            self.error = event[1]
        else:  # "end"
            self.ended = True
        return False


def _frame(fig: go.Figure, progress: _Progress, settings: SolveSettings, final: bool = False) -> Frame:
    results = progress.results
    with fig.batch_update():
        for i, solver in enumerate(SOLVER_NAMES):
            ys = progress.traces[solver]
            fig.data[i].x = list(range(len(ys)))
            fig.data[i].y = _finite_or_none(ys)
    if final:
        for r in results.values():
            if r.diverged or not all(math.isfinite(v) for v in r.trace):
                _mark_divergence(fig, r)
    # The label: the first solver whose answer can be trusted, preferring one that converged.
    answered = [r for s in SOLVER_NAMES if (r := results.get(s)) is not None and trustworthy(r)]
    answered.sort(key=lambda r: not r.converged)
    return Frame(
        figure=fig,
        label=top_classes(answered[0].probs) if answered else None,
        table=results_table(results),
        status=_status(results, None if final else progress.running, settings),
        warnings=_warnings(results, settings) if final else [],
        results=dict(results),
        final=final,
    )


# ----------------------------------------------------------------------------- models on offer


def find_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories directly under ``root`` (holding config.json and weights), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file())


#: The app's default model: the first of these present in the checkpoint directory. The rule
#: (README, "Shipped checkpoints"): the most accurate checkpoint that is a real equilibrium on
#: which Anderson needs >= 1.5x fewer f-evaluations than forward iteration, within 300 ms p50.
DEFAULT_CHECKPOINTS = ("seed", "cpu")


def model_sources(root: str | Path, env_model: str | None = None) -> tuple[dict[str, str], str]:
    """({label: path or Hub repo id}, default label) of the models the app offers.

    Default: ``env_model`` (DEQ_MODEL) if given, else the first of ``DEFAULT_CHECKPOINTS`` under
    ``root``, else the first directory.
    Raises FileNotFoundError when there is nothing to offer.
    """
    sources = {p.name: str(p) for p in find_checkpoints(root)}
    if env_model:
        same = Path(env_model).expanduser().resolve()
        others = {k: v for k, v in sources.items() if Path(v).resolve() != same}
        return {env_model: env_model, **others}, env_model
    if not sources:
        raise FileNotFoundError(
            f"No model to serve: no checkpoint directory (config.json + {WEIGHTS_NAME}) under {Path(root)} "
            "and DEQ_MODEL is not set. Train one (python train.py --out checkpoints/seed) or set DEQ_MODEL "
            "to a checkpoint directory or a Hugging Face Hub repo id."
        )
    return sources, next((name for name in DEFAULT_CHECKPOINTS if name in sources), next(iter(sources)))


def load_models(
    sources: dict[str, str], default: str, device: str | torch.device = "cpu", fallback: bool = False
) -> dict[str, DEQClassifier]:
    """Load every model once. A model that does not load is left out with a logged warning,
    except the default one: its error propagates (with a clear message) unless ``fallback``
    (the default was not asked for by name), when the others still serve. Raises the default's
    error when nothing loads."""
    models: dict[str, DEQClassifier] = {}
    default_error: Exception | None = None
    for label in [default, *(label for label in sources if label != default)]:
        try:
            models[label] = load_model(sources[label], device)
        except (FileNotFoundError, ValueError) as err:
            if label == default:
                if not fallback:
                    raise
                default_error = err
            log.warning("left out checkpoint %s: %s", sources[label], err)
    if not models and default_error is not None:  # with fallback only: else the default raised
        raise default_error
    return {label: models[label] for label in sources if label in models}


def default_device() -> str:
    """DEQ_DEVICE if set, else cuda when available, else cpu."""
    return os.environ.get("DEQ_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- model card and training log


def _fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def card_markdown(model: DEQClassifier, label: str = "") -> str:
    """The model card facts (accuracy, how and where it was trained) as Markdown."""
    card = getattr(model, "card", None) or {}
    cfg = model.config
    n_params = card.get("parameters") or sum(p.numel() for p in model.parameters())
    lines = [f"### Model card{f': `{label}`' if label else ''}"]
    if "test_accuracy" not in card and "val_accuracy" in card:
        lines.append(
            f"- **{100 * card['val_accuracy']:.1f}%** validation accuracy ({card.get('val_images', 0):,} "
            "images held out of the training set; not yet evaluated on the test set)"
        )
    if "test_accuracy" in card:
        acc = f"**{100 * card['test_accuracy']:.1f}%** CIFAR-10 test accuracy"
        if card.get("test_images"):
            acc += f" ({card['test_images']:,} test images)"
        lines.append(f"- {acc}")
    train_cfg = card.get("train_config") or {}
    if "epochs" in card:
        total, budget = train_cfg.get("epochs"), train_cfg.get("time_budget_s")
        done = f"{card['epochs']:.3g} epochs"
        if budget:
            done += f" (a {budget:g} s wall-clock budget)"
        elif total and total != card["epochs"]:
            done += f" of {total}"
        where = f" on {card['device']}" if card.get("device") else ""
        took = f" in {_fmt_duration(card['train_wall_time_s'])}" if card.get("train_wall_time_s") else ""
        data = f", {card['train_images']:,} training images" if card.get("train_images") else ""
        lines.append(f"- Trained {done}{where}{took}{data}")
        if card.get("finished") is False:
            lines.append("- ⚠️ training had not finished when this checkpoint was written")
    if card.get("command"):
        commit = f" at commit `{card['git_commit'][:10]}`" if card.get("git_commit") else ""
        lines.append(f"- Command: `{card['command']}`{commit}")
    if card.get("dataset"):
        lines.append(f"- Data: {card['dataset']}")
    solver_opts = ", ".join(f"{k}={v}" for k, v in cfg.solver_kwargs.items())
    lines.append(
        f"- {cfg.arch} architecture, {n_params:,} parameters, equilibrium width {cfg.n_channels} channels; "
        f"trained with the {cfg.solver} solver ({solver_opts}), {cfg.backward} backward"
    )
    for e in card.get("evaluations") or []:
        lines.extend(_evaluation_line(e))
    if card.get("notes"):
        lines.append(f"- Notes: {card['notes']}")
    if card.get("torch"):
        lines.append(f"- torch {card['torch']}")
    lines.extend(_curve_table(card.get("budget_curve")))
    if not card:
        lines.append("- This checkpoint carries no model card.")
    return "\n".join(lines)


def _percent(fraction: float) -> str:
    """One decimal, two where one would round a near-miss up to 100.0%."""
    return f"{100 * fraction:.2f}%" if 0.9995 <= fraction < 1 else f"{100 * fraction:.1f}%"


def _evaluation_line(e: dict) -> list[str]:
    """One recorded test-set equilibrium evaluation (``deq.evaluate --record``) as a bullet."""
    solver = e.get("solver") if isinstance(e, dict) else None
    if not isinstance(solver, dict):
        return []
    try:
        if e.get("split", "test") != "test" or solver.get("tol", 1) > 1e-3:
            return []  # validation runs and the training budget's own solve are not headline facts
        median = e.get("median_f_evals", e.get("mean_f_evals"))
        what = "median" if "median_f_evals" in e else "mean"
        where = f" on {e['device']}" if e.get("device") else ""
        flips = " (with test-time flips)" if e.get("flip") else ""
        how = f"tol {solver['tol']:g} (max_iter {solver['max_iter']}) with {solver['solver']}{where}"
        return [f"- Solved to {how}: "
                f"{_percent(e['converged_fraction'])} of {e['images']:,} test images converge, "
                f"{what} {median:g} f-evaluations, accuracy {100 * e['accuracy']:.1f}%{flips}"]  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return []  # a card from elsewhere with other fields: show nothing rather than fail


def _curve_table(curve) -> list[str]:
    """``deq.evaluate --curve --record``'s accuracy-by-budget as a Markdown table ([] if absent)."""
    if not isinstance(curve, dict):
        return []
    try:
        budgets = [int(k) for k in curve["budgets"]]
        rows = [(name, [float(a) for a in curve[key]]) for key, name in
                (("anderson", "Anderson"), ("forward", "forward iteration")) if key in curve]  # fmt: skip
        if not rows or any(len(accs) != len(budgets) for _, accs in rows):
            return []
        where = f" on {curve['device']}" if curve.get("device") else ""
        head = (f"\n**Accuracy by solver budget** ({curve['images']:,} {curve.get('split', 'test')} images, "
                f"solves stopped after k f-evaluations or at tol {curve['tol']:g}{where}):\n")  # fmt: skip
        table = ["| f-evaluations k | " + " | ".join(map(str, budgets)) + " |",
                 "|---" * (len(budgets) + 1) + "|"]  # fmt: skip
        table += [f"| {name} | " + " | ".join(f"{100 * a:.1f}%" for a in accs) + " |" for name, accs in rows]
        return [head, *table]
    except (KeyError, TypeError, ValueError):
        return []  # a card from elsewhere with other fields: show nothing rather than fail


def read_train_log(source: str | Path) -> list[dict]:
    """The per-epoch records of a checkpoint's train_log.jsonl ([] when it has none); lines
    that are not JSON objects are skipped."""
    try:
        path = resolve_checkpoint(source) / LOG_NAME
        text = path.read_text()
    except (FileNotFoundError, ValueError, OSError):
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), (int, float)):
            records.append(record)
    return records


def _series(records: list[dict], key: str, transform: Callable[[float], float]) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["epoch"])
            ys.append(transform(v))
    return xs, ys


def _curves(
    records: list[dict], curves: list[tuple[str, str]], y_title: str, log_y: bool = False, transform=float
) -> go.Figure:
    """One chart: a line per (log key, legend name), coloured as train/test/backward."""
    traces = []
    for key, name in curves:
        xs, ys = _series(records, key, transform)
        if xs:
            color = ("#2ca02c" if "backward" in key else "#d62728" if "test" in key
                     else "#ff7f0e" if "val" in key else "#1f77b4")  # fmt: skip
            traces.append({"type": "scatter", "x": xs, "y": ys, "name": name, "mode": "lines+markers",
                           "line": {"color": color}})  # fmt: skip
    y_scale = {"type": "log", "exponentformat": "power"} if log_y else {}
    layout = {
        **_LAYOUT,
        "height": 320,
        "margin": {"l": 70, "r": 20, "t": 20, "b": 50},
        "xaxis": {**_AXIS, "title": {"text": "epoch"}, "tick0": 0, "dtick": max(1, round(len(records) / 10))},
        "yaxis": {**_AXIS, "title": {"text": y_title}, **y_scale},
    }
    return go.Figure(data=traces, layout=layout)


def training_figures(records: list[dict]) -> tuple[go.Figure, go.Figure, go.Figure]:
    """(accuracy, residuals, solver steps) per epoch, from train_log.jsonl records."""
    accuracy = _curves(
        records,
        [
            ("test_error", "test accuracy"),
            ("val_error", "validation accuracy"),
            ("train_error", "train accuracy"),
        ],
        "accuracy (%)",
        transform=lambda error: 100.0 * (1.0 - error),
    )
    solves = [("forward", "forward solve (train)"), ("backward", "backward solve (train)"),
              ("test_forward", "forward solve (test)"),
              ("val_forward", "forward solve (validation)")]  # fmt: skip
    residuals = _curves(
        records, [(f"{k}_residual", name) for k, name in solves], "mean final relative residual", log_y=True
    )
    steps = _curves(
        records, [(f"{k}_iters", name) for k, name in solves], "mean solver steps (f-evaluations)"
    )
    return accuracy, residuals, steps
