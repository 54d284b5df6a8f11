"""The live stream of one request: the race's solvers run in a worker thread and report every
f-evaluation; ``stream_solve`` turns the reports into at most one UI ``Frame`` per interval.

    image -> worker thread: inference.solve per solver, callback per f-evaluation -> events
          -> stream_solve: figures.update_traces + text -> Frame ... final Frame
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
from torch import Tensor

from ..model import DEQClassifier
from ..solvers import lookup
from . import inference
from .figures import mark_divergence, residual_figure, update_traces
from .images import PreparedImage
from .inference import SolverResult, SolveSettings, solve, top_classes, trustworthy
from .text import results_table, status, warnings

__all__ = ["Frame", "stream_solve", "warm_up", "FRAME_INTERVAL"]

#: Seconds between streamed frames: the browser re-renders the plot on each (~0.1 s on 2 cores).
FRAME_INTERVAL = 0.15


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
    race: tuple[str, ...],
    events: queue.Queue,
    cancel: threading.Event,
) -> None:
    """Runs the solves in its own thread (a callback cannot yield) and reports through ``events``:
    ("step", solver, iteration, residual), ("done", SolverResult), ("error", exc), ("end",)."""
    try:
        with torch.inference_mode():  # grad mode is per thread: enter it here
            for solver in race:  # one after the other, in race order

                def callback(iteration: int, residual: float, solver: str = solver) -> None:
                    if cancel.is_set():
                        raise _Cancelled
                    events.put(("step", solver, iteration, residual))

                events.put(("done", solve(model, image, solver, settings, callback)))
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
    race: tuple[str, ...] | None = None,
    interval: float = FRAME_INTERVAL,
) -> Iterator[Frame]:
    """Solve the image's equilibrium with each solver of ``race`` in turn, yielding Frames as it goes.

    image: (1, 3, 32, 32) in [0, 1] (or a PreparedImage); race: registered solver names, by
    default ``inference.RACE``. The first frame comes with the first
    residual, then at most one per ``interval`` seconds; the last frame (final=True) holds the
    complete curves, the label, the table and any warnings. Closing the generator early stops
    the solves.
    """
    settings.validate()
    tensor = image.tensor if isinstance(image, PreparedImage) else image
    race = tuple(inference.RACE if race is None else race)  # read per call: the app's race is that one list
    if not race:
        raise ValueError("race must name at least one solver")
    for solver in race:
        lookup(solver)  # ValueError naming the registered solvers, before any work
    progress = _Progress({s: [] for s in race})
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    thread = threading.Thread(
        target=_worker, args=(model, tensor, settings, race, events, cancel), name="deq-solve", daemon=True
    )
    thread.start()
    fig = residual_figure(settings, race)  # while the solve starts
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
                yield _frame(fig, progress, settings, race)
                last_yield, dirty = time.perf_counter(), False
        thread.join()  # it has sent "end"; a thread still in torch at interpreter exit aborts it
        if progress.error is not None:
            raise progress.error
        yield _frame(fig, progress, settings, race, final=True)
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


def _frame(
    fig: go.Figure, progress: _Progress, settings: SolveSettings, race: tuple[str, ...], final: bool = False
) -> Frame:
    results = progress.results
    update_traces(fig, [progress.traces[solver] for solver in race])
    if final:
        for r in results.values():
            if r.diverged or not all(math.isfinite(v) for v in r.trace):
                mark_divergence(fig, r, race)
    # The label: the first solver whose answer can be trusted, preferring one that converged.
    answered = [r for s in race if (r := results.get(s)) is not None and trustworthy(r)]
    answered.sort(key=lambda r: not r.converged)
    return Frame(
        figure=fig,
        label=top_classes(answered[0].probs) if answered else None,
        table=results_table(results, race),
        status=status(results, None if final else progress.running, settings),
        warnings=warnings(results, settings) if final else [],
        results=dict(results),
        final=final,
    )
