"""The Plotly figures: the live residual chart of a request and the training charts of a model.

The only module of the project that builds plots (with ``deq.demo.stream``, which fills the
residual chart in as the solvers report).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import attrgetter

import plotly.graph_objects as go

from ..checkpoint import EpochRecord
from .inference import RACE, SolverResult, SolveSettings, solver_label

__all__ = ["solver_color", "residual_figure", "update_traces", "mark_divergence", "training_figures"]

#: Colours of the race's solvers, in race order (Anderson red, forward iteration blue).
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")

#: Plain white styling without a Plotly template: templates cost ~25 ms to build and 6 kB per
#: streamed frame.
_AXIS = {"showgrid": True, "gridcolor": "#e6e6e6", "showline": True, "linecolor": "#999", "zeroline": False}
_LAYOUT = {"template": "none", "plot_bgcolor": "white", "paper_bgcolor": "white", "hovermode": "x"}


def solver_color(solver: str, race: tuple[str, ...] = RACE) -> str:
    """The line colour of ``solver``: by its place in the race."""
    return PALETTE[race.index(solver) % len(PALETTE)] if solver in race else "#7f7f7f"


def _legend_name(solver: str, settings: SolveSettings) -> str:
    """ "Anderson (m=5, lam=0.0001, beta=1)": the label and the settings of the solver's own."""
    own = {k: v for k, v in settings.solver_kwargs(solver).items() if k not in ("tol", "max_iter")}
    details = ", ".join(f"{k}={v:g}" for k, v in own.items())
    return f"{solver_label(solver)} ({details})" if details else solver_label(solver)


def _finite_or_none(values: list[float]) -> list[float | None]:
    """Log axes cannot show 0, inf or NaN: leave a gap instead."""
    return [v if math.isfinite(v) and v > 0 else None for v in values]


def residual_figure(settings: SolveSettings, race: tuple[str, ...] = RACE) -> go.Figure:
    """The empty residual chart of one request: one (empty) trace per solver of the race, log-y,
    the tolerance as a dashed line.

    Built in one constructor call: each update_layout/add_* call re-validates (~10 ms apiece).
    """
    traces = [
        {"type": "scatter", "x": [], "y": [], "name": _legend_name(solver, settings), "mode": "lines+markers",
         "line": {"color": solver_color(solver, race), "width": 2}, "marker": {"size": 4}}
        for solver in race
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


def update_traces(fig: go.Figure, traces: list[list[float]]) -> None:
    """Show each solver's residuals so far (in race order) on ``residual_figure``'s chart."""
    with fig.batch_update():
        for line, ys in zip(fig.data, traces, strict=True):
            line.x = list(range(len(ys)))
            line.y = _finite_or_none(ys)


def mark_divergence(fig: go.Figure, result: SolverResult, race: tuple[str, ...] = RACE) -> None:
    """An arrow at the last finite residual of a solve that diverged."""
    points = [(i, v) for i, v in enumerate(result.trace) if math.isfinite(v) and v > 0]
    if not points:
        return
    i, v = points[-1]
    color = solver_color(result.solver, race)
    fig.add_annotation(
        x=i, y=math.log10(v), text=f"{result.label} diverged", showarrow=True, ax=-40, ay=-30,
        arrowcolor=color, font={"color": color},
    )  # fmt: skip


# ----------------------------------------------------------------------------- training charts


def _series(
    records: list[EpochRecord], value: Callable[[EpochRecord], float | None]
) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = value(r)
        if v is not None and math.isfinite(v):
            xs.append(r.epoch)
            ys.append(v)
    return xs, ys


def _curves(
    records: list[EpochRecord],
    curves: list[tuple[str, str, Callable[[EpochRecord], float | None]]],
    y_title: str,
    log_y: bool = False,
) -> go.Figure:
    """One chart: a line per (legend name, colour, value of a record)."""
    traces = []
    for name, color, value in curves:
        xs, ys = _series(records, value)
        if xs:
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


_TRAIN, _BACKWARD, _EVAL = "#1f77b4", "#2ca02c", {"val": "#ff7f0e", "test": "#d62728"}
_SPLIT_NAMES = {"val": "validation", "test": "test"}


def training_figures(records: list[EpochRecord]) -> tuple[go.Figure, go.Figure, go.Figure]:
    """(accuracy, residuals, solver steps) per epoch of a training log."""
    split = records[0].eval_split if records else "val"
    held_out, eval_color = _SPLIT_NAMES[split], _EVAL[split]
    accuracy = _curves(
        records,
        [
            (f"{held_out} accuracy", eval_color, lambda r: 100.0 * (1.0 - r.eval_error)),
            ("train accuracy", _TRAIN, lambda r: 100.0 * (1.0 - r.train_error)),
        ],
        "accuracy (%)",
    )
    solves = [("forward solve (train)", _TRAIN, "forward"), ("backward solve (train)", _BACKWARD, "backward"),
              (f"forward solve ({held_out})", eval_color, "eval_forward")]  # fmt: skip
    residuals = _curves(
        records,
        [(name, color, attrgetter(f"{solve}_residual")) for name, color, solve in solves],
        "mean final relative residual",
        log_y=True,
    )
    steps = _curves(
        records,
        [(name, color, attrgetter(f"{solve}_iters")) for name, color, solve in solves],
        "mean solver steps (f-evaluations)",
    )
    return accuracy, residuals, steps
