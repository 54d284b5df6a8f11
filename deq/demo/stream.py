"""The live stream of one request: the race's solvers run in a worker thread and report every
f-evaluation; ``stream_solve`` replays the reports side by side at a human pace, at most one UI
``Frame`` per interval.

    image -> worker thread: inference.solve per solver (traced: residual, time, answer per
             f-evaluation), then repeated untraced solves for honest wall times -> events
          -> stream_solve: both solvers' curves advance one f-evaluation at a time together,
             over ``replay_s`` seconds whatever the compute took -> Frame ... final Frame
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
from .figures import (
    answer_figure,
    mark_divergence,
    residual_figure,
    set_title,
    update_answers,
    update_traces,
)
from .images import PreparedImage
from .inference import SolverResult, SolveSettings, Step, report, solve, time_solve, top_classes, trustworthy
from .text import results_table, status, verdict, warnings

__all__ = ["Frame", "stream_solve", "warm_up", "FRAME_INTERVAL", "REPLAY_S", "TIMING_ROUNDS"]

#: Seconds between streamed frames: the browser re-renders the plot on each (~0.1 s on 2 cores).
FRAME_INTERVAL = 0.15
#: Seconds over which the race is drawn: the solves themselves often take a few ms, too fast to
#: watch. Both solvers' curves advance together, one f-evaluation per tick of this clock.
REPLAY_S = 1.5
#: Untraced solves per solver for the wall-time comparison (a median; fewer if they take long).
TIMING_ROUNDS = 5
TIMING_BUDGET_S = 1.0


@dataclass
class Frame:
    """One update of the UI. figure and answers are the same objects in every frame of a request
    (updated in place); label is None until a solver's answer is shown; final marks the last frame."""

    figure: go.Figure
    answers: go.Figure
    label: dict[str, float] | None
    table: str
    status: str
    warnings: list[str] = field(default_factory=list)
    results: dict[str, SolverResult] = field(default_factory=dict)
    final: bool = False
    report: dict | None = None  # the final frame's JSON report (inference.report)


class _Cancelled(Exception):
    pass


def _worker(
    model: DEQClassifier,
    image: Tensor,
    settings: SolveSettings,
    race: tuple[str, ...],
    timing_rounds: int,
    events: queue.Queue,
    cancel: threading.Event,
) -> None:
    """Runs the solves in its own threads (a callback cannot yield) and reports through ``events``:
    ("step", solver, Step), ("done", SolverResult), ("timing", {solver: [seconds]}),
    ("error", exc), ("end",)."""
    failures: list[BaseException] = []

    def traced(solver: str) -> None:
        def callback(step: Step) -> None:
            if cancel.is_set():
                raise _Cancelled
            events.put(("step", solver, step))

        try:
            with torch.inference_mode():  # grad mode is per thread: enter it here
                events.put(("done", solve(model, image, solver, settings, callback)))
        except BaseException as err:  # noqa: BLE001 (handed to the consumer below)
            failures.append(err)
            cancel.set()  # one solver failing ends the race

    try:
        # The traced solves run concurrently, one thread per solver, so that the race is drawn
        # side by side as it is computed; their times include the tracing, so the wall times
        # reported come from the untraced solves after them.
        threads = [threading.Thread(target=traced, args=(s,), name=f"deq-{s}", daemon=True) for s in race]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        real = [err for err in failures if not isinstance(err, _Cancelled)]
        if real:
            raise real[0]
        if failures:
            raise _Cancelled
        with torch.inference_mode():
            walls: dict[str, list[float]] = {solver: [] for solver in race}
            start = time.perf_counter()
            for _ in range(timing_rounds):  # interleaved, one at a time: like for like
                for solver in race:
                    if cancel.is_set():
                        raise _Cancelled
                    walls[solver].append(time_solve(model, image, solver, settings))
                if time.perf_counter() - start > TIMING_BUDGET_S:
                    break
        if timing_rounds > 0:
            events.put(("timing", walls))
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
    x_axis: str = "evals",
    interval: float = FRAME_INTERVAL,
    replay_s: float = REPLAY_S,
    timing_rounds: int = TIMING_ROUNDS,
) -> Iterator[Frame]:
    """Solve the image's equilibrium with each solver of ``race``, yielding Frames as it goes.

    image: (1, 3, 32, 32) in [0, 1] (or a PreparedImage); race: registered solver names, by
    default ``inference.RACE``; x_axis: "evals" or "ms". The first frame comes with the first
    residual; then the solvers' curves advance together, f-evaluation by f-evaluation, so that
    the longest takes ``replay_s`` seconds to draw (0: as fast as they are computed), at most one
    frame per ``interval``. A solver's row, and the label, appear when its curve is complete. The
    last frame (final=True) holds the complete curves, the verdict, the label, the table (wall
    times from ``timing_rounds`` untraced solves each) and any warnings. Closing the generator
    early stops the solves.
    """
    settings.validate()
    tensor = image.tensor if isinstance(image, PreparedImage) else image
    race = tuple(inference.RACE if race is None else race)  # read per call: the app's race is that one list
    if not race:
        raise ValueError("race must name at least one solver")
    for solver in race:
        lookup(solver)  # ValueError naming the registered solvers, before any work
    if replay_s < 0 or not math.isfinite(replay_s):
        raise ValueError(f"replay_s must be a finite number >= 0, got {replay_s!r}")
    progress = _Progress({s: [] for s in race})
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    thread = threading.Thread(
        target=_worker,
        args=(model, tensor, settings, race, timing_rounds, events, cancel),
        name="deq-solve",
        daemon=True,
    )
    thread.start()
    view = _View(residual_figure(settings, race, x_axis), answer_figure(race, x_axis), race, settings, x_axis)
    replay = _Replay(replay_s)
    last_yield, shown_before, dirty = -math.inf, 0, False
    try:
        while True:
            now = time.perf_counter()
            if dirty:  # something new to show: as soon as the throttle allows
                wake = last_yield + interval
            elif replay.started and replay.shown(progress) < progress.horizon:  # the replay's next step
                wake = max(last_yield + interval, replay.next_step(progress))
            else:  # nothing to draw until the worker reports
                wake = now + 1.0
            batch = _drain(events, max(0.0, wake - now))
            if not batch and not thread.is_alive() and events.empty() and not progress.ended:
                break  # cannot happen (the worker always sends "end"), but never hang
            for event in batch:
                dirty |= progress.apply(event)
            dirty = dirty and progress.horizon > 0  # nothing to draw before the first f-evaluation
            # On the milliseconds axis the replay waits for the untraced timings that scale it.
            timed = x_axis != "ms" or progress.timed or progress.ended
            if progress.horizon and timed and not replay.started:
                replay.start()
            shown = replay.shown(progress)
            if progress.ended and shown >= progress.horizon:
                break
            now = time.perf_counter()
            if (dirty or shown != shown_before) and progress.horizon and now - last_yield >= interval:
                yield view.frame(progress, shown)
                last_yield, shown_before, dirty = now, shown, False
        thread.join()  # it has sent "end"; a thread still in torch at interpreter exit aborts it
        if progress.error is not None:
            raise progress.error
        yield view.frame(progress, progress.horizon, final=True)
    finally:
        cancel.set()  # stops the solve at its next f-evaluation if the consumer left early
        thread.join(timeout=10)


def warm_up(model: DEQClassifier) -> None:
    """One tiny request, so that the first real one does not pay for lazy initialisation
    (plotly imports its validators on the first figure, ~0.2-0.5 s; torch sets up its kernels)."""
    blank = torch.full((1, 3, model.config.image_size, model.config.image_size), 0.5)
    for _ in stream_solve(model, blank, SolveSettings(max_iter=2), replay_s=0, timing_rounds=1):
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

    steps: dict[str, list[Step]]
    results: dict[str, SolverResult] = field(default_factory=dict)
    error: Exception | None = None
    timed: bool = False  # the untraced timings are in
    ended: bool = False

    @property
    def horizon(self) -> int:
        """The longest solve's f-evaluations so far: the replay's length."""
        return max(len(s) for s in self.steps.values())

    def apply(self, event: tuple) -> bool:
        """Take in one worker event; True when the picture changed."""
        kind = event[0]
        if kind == "step":
            self.steps[event[1]].append(event[2])
            return True
        if kind == "done":
            self.results[event[1].solver] = event[1]
            return True
        if kind == "timing":
            for solver, walls in event[1].items():
                self.results[solver].timing_s = walls
            self.timed = True
            return True
        if kind == "error":
            self.error = event[1]
        else:  # "end"
            self.ended = True
        return False


class _Replay:
    """The replay clock: how many f-evaluations of each solver are on screen."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0: float | None = None

    @property
    def started(self) -> bool:
        return self.t0 is not None

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def shown(self, progress: _Progress) -> int:
        if self.t0 is None:
            return 0
        if self.seconds <= 0:
            return progress.horizon
        fraction = (time.perf_counter() - self.t0) / self.seconds
        return min(progress.horizon, max(1, math.ceil(fraction * progress.horizon)))

    def next_step(self, progress: _Progress) -> float:
        """When one more f-evaluation is due on screen (perf_counter seconds)."""
        if self.t0 is None or self.seconds <= 0 or not progress.horizon:
            return time.perf_counter()
        return self.t0 + self.shown(progress) / progress.horizon * self.seconds + 1e-4


@dataclass
class _View:
    """The figures of one request and how a frame is drawn from the progress."""

    figure: go.Figure
    answers: go.Figure
    race: tuple[str, ...]
    settings: SolveSettings
    x_axis: str

    def x_values(self, steps: list[Step], result: SolverResult | None) -> list[float]:
        """f-evaluations 1, 2, ...; or milliseconds: the traced run's clock (which pays for the
        tracing and shares the machine with the other solver) scaled so that its end is the
        median untraced solve, keeping how the time was spread over the iterations."""
        if self.x_axis != "ms":
            return [s.iteration + 1 for s in steps]
        scale = 1.0
        if result is not None and result.timing_s and result.times_ms and result.times_ms[-1] > 0:
            scale = result.timed_wall_s * 1e3 / result.times_ms[-1]
        return [round(s.ms * scale, 3) for s in steps]

    def frame(self, progress: _Progress, shown: int, final: bool = False) -> Frame:
        steps = [progress.steps[s][:shown] for s in self.race]
        # A solver's result shows once its whole curve is drawn.
        results = {
            s: r for s in self.race
            if (r := progress.results.get(s)) is not None and shown >= len(progress.steps[s])
        }  # fmt: skip
        xs = [self.x_values(steps[i], progress.results.get(s)) for i, s in enumerate(self.race)]
        update_traces(self.figure, steps, xs)
        update_answers(self.answers, steps, xs, [_settled(results.get(s)) for s in self.race])
        if final:
            for i, s in enumerate(self.race):
                r = results.get(s)
                if r is not None and (r.diverged or not all(math.isfinite(v) for v in r.trace)):
                    mark_divergence(self.figure, r, xs[i], self.race)
        if not shown:
            title = "Timing the solvers…" if self.x_axis == "ms" else "Racing…"
        else:  # one solver per line: a phone's width holds one
            title = verdict(results, self.race, sep="<br>") or f"Racing… f-evaluation {shown}"
        set_title(self.figure, title)
        running = {
            s: (steps[i][-1].iteration, steps[i][-1].residual)
            for i, s in enumerate(self.race) if s not in results and steps[i]
        }  # fmt: skip
        # The label: the first solver whose answer can be trusted, preferring one that converged.
        answered = [r for s in self.race if (r := results.get(s)) is not None and trustworthy(r)]
        answered.sort(key=lambda r: not r.converged)
        return Frame(
            figure=self.figure,
            answers=self.answers,
            label=top_classes(answered[0].probs) if answered else None,
            table=results_table(results, self.race),
            status=status(results, running or None, self.settings),
            warnings=warnings(results, self.settings) if final else [],
            results=dict(results),
            final=final,
            report=report(results, self.race, self.settings) if final else None,
        )


def _settled(result: SolverResult | None) -> int | None:
    return None if result is None else result.settled_at
