"""The Plotly figures: the live residual chart of a request and the training charts of a model.

The only module of the project that builds plots (with ``deq.demo.stream``, which fills the
residual chart in as the solvers report).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import attrgetter

import plotly.graph_objects as go

from ..card import budget_curve
from ..checkpoint import EpochRecord
from ..data import CIFAR10_CLASSES
from .inference import RACE, SolverResult, SolveSettings, Step, solver_label

__all__ = [
    "X_AXES", "solver_color", "residual_figure", "set_title", "update_traces", "answer_figure",
    "update_answers", "mark_divergence", "training_figures", "budget_figure",
]  # fmt: skip

#: Colours of the race's solvers, in race order (Anderson red, forward iteration blue).
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")

#: Styling without a Plotly template (templates cost ~25 ms to build and 6 kB per streamed
#: frame): transparent backgrounds and mid-grey text and grid, legible in the page's light and
#: dark themes alike.
_INK = "#777777"
_AXIS = {"showgrid": True, "gridcolor": "rgba(128,128,128,0.25)", "showline": True, "linecolor": _INK,
         "zeroline": False, "tickfont": {"color": _INK}}  # fmt: skip
_LAYOUT = {"template": "none", "plot_bgcolor": "rgba(0,0,0,0)", "paper_bgcolor": "rgba(0,0,0,0)",
           "font": {"color": _INK}, "hovermode": "x"}  # fmt: skip
#: Legends above the plotting area, in a row (wrapping on a phone): they never cover a curve.
_LEGEND = {"orientation": "h", "x": 0, "xanchor": "left", "y": 1.02, "yanchor": "bottom",
           "bgcolor": "rgba(0,0,0,0)"}  # fmt: skip


def _axis(title: str, **settings) -> dict:
    """An axis in the house style, titled ``title``; ``settings`` add to or override it."""
    return {**_AXIS, "title": {"text": title, "font": {"color": _INK}}, **settings}


def _title(text: str, size: int = 14) -> dict:
    """A chart's title at its top left, above the legend (the page shows no component label)."""
    return {"text": text, "x": 0.01, "xanchor": "left", "yref": "container", "y": 0.97, "yanchor": "top",
            "font": {"size": size}}  # fmt: skip


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


#: The x axis of a request's charts: f-evaluations, or milliseconds into the solve (the traced
#: run's clock, scaled to the median untraced solve: ``deq.demo.stream``).
X_AXES = {"evals": "f-evaluation", "ms": "milliseconds into the solve (scaled to the median untraced solve)"}


def _x_axis(x_axis: str) -> dict:
    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {sorted(X_AXES)}, got {x_axis!r}")
    return _axis(X_AXES[x_axis], rangemode="tozero")


def residual_figure(
    settings: SolveSettings, race: tuple[str, ...] = RACE, x_axis: str = "evals"
) -> go.Figure:
    """The empty residual chart of one request: one (empty) trace per solver of the race, log-y,
    the tolerance as a dashed line, the race's verdict as its title (``set_title``).

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
        "line": {"color": _INK, "dash": "dash", "width": 1.5},
    }  # fmt: skip
    tol_label = {  # an annotation's y on a log axis is log10 of the value
        "xref": "paper", "x": 0.01, "xanchor": "left", "yref": "y", "y": math.log10(tol), "yanchor": "bottom",
        "text": f"tol = {tol:.0e}", "showarrow": False, "font": {"color": _INK},
    }  # fmt: skip
    layout = {
        **_LAYOUT,
        "height": 420,
        "title": _title("", size=15),
        "margin": {"l": 70, "r": 20, "t": 110, "b": 55},
        "xaxis": _x_axis(x_axis),
        "yaxis": _axis("relative residual ‖f(z) − z‖ / ‖f(z)‖", type="log", exponentformat="power",
                       minorloglabels="none"),
        "legend": _LEGEND,
        "shapes": [tol_line],
        "annotations": [tol_label],
    }  # fmt: skip
    return go.Figure(data=traces, layout=layout)


def set_title(fig: go.Figure, text: str) -> None:
    """The chart's title line (the race's progress, then its verdict)."""
    fig.layout.title.text = text


def update_traces(fig: go.Figure, traces: list[list[Step]], xs: list[list[float]]) -> None:
    """Show each solver's f-evaluations so far (in race order, at x positions ``xs``) on
    ``residual_figure``'s chart."""
    with fig.batch_update():
        for line, steps, x in zip(fig.data, traces, xs, strict=True):
            line.x = x
            line.y = _finite_or_none([s.residual for s in steps])


def answer_figure(race: tuple[str, ...] = RACE, x_axis: str = "evals") -> go.Figure:
    """The empty "answer settling" chart of one request: per solver of the race, the probability
    of the top-1 class the head gives at each f-evaluation, the class named where it changes."""
    traces = [
        {"type": "scatter", "x": [], "y": [], "name": solver_label(solver), "mode": "lines+markers+text",
         "line": {"color": solver_color(solver, race), "width": 2, "shape": "hv"}, "marker": {"size": 4},
         "textposition": "top right", "textfont": {"color": solver_color(solver, race), "size": 11},
         "cliponaxis": False}
        for solver in race
    ]  # fmt: skip
    layout = {
        **_LAYOUT,
        "height": 320,
        "title": _title("The answer along the solve"),
        "margin": {"l": 70, "r": 20, "t": 90, "b": 50},
        "xaxis": _x_axis(x_axis),
        "yaxis": _axis("top-1 probability", range=[0, 1.1], tickformat=".0%"),
        "legend": _LEGEND,
    }  # fmt: skip
    return go.Figure(data=traces, layout=layout)


def update_answers(
    fig: go.Figure, traces: list[list[Step]], xs: list[list[float]], settled: list[int | None] | None = None
) -> None:
    """Show each solver's answers so far on ``answer_figure``'s chart; ``settled`` (per solver,
    once known): the f-evaluation from which its answer was final, named in the legend."""
    with fig.batch_update():
        for i, (line, steps, x) in enumerate(zip(fig.data, traces, xs, strict=True)):
            names = [CIFAR10_CLASSES[s.answer] if s.answer >= 0 else "–" for s in steps]
            line.x = x
            line.y = [s.probability if math.isfinite(s.probability) else None for s in steps]
            line.text = [n if j == 0 or n != names[j - 1] else "" for j, n in enumerate(names)]
            line.hovertext = names
            base = line.name.split(" (")[0]
            k = settled[i] if settled is not None else None
            line.name = f"{base} (final from f-eval {k})" if k is not None else base


def mark_divergence(
    fig: go.Figure, result: SolverResult, xs: list[float], race: tuple[str, ...] = RACE
) -> None:
    """An arrow at the last finite residual of a solve that diverged (``xs``: the x position of
    each of its f-evaluations on the chart)."""
    points = [(i, v) for i, v in enumerate(result.trace) if math.isfinite(v) and v > 0 and i < len(xs)]
    if not points:
        return
    i, v = points[-1]
    x = xs[i]
    color = solver_color(result.solver, race)
    fig.add_annotation(
        x=x, y=math.log10(v), text=f"{result.label} diverged", showarrow=True, ax=-50, ay=35,
        arrowcolor=color, font={"color": color},
    )  # fmt: skip


def budget_figure(curve) -> go.Figure | None:
    """A card's accuracy by solver budget (``deq.evaluate --curve``): accuracy (%) against the
    f-evaluations a solve may spend, one line per solver; None when the card has no curve."""
    parsed = budget_curve(curve)
    if parsed is None:
        return None
    budgets, accuracies = parsed
    traces = [
        {"type": "scatter", "x": budgets, "y": [100.0 * a for a in accs], "name": solver_label(name),
         "mode": "lines+markers", "line": {"color": solver_color(name)}}
        for name, accs in accuracies.items()
    ]  # fmt: skip
    layout = {
        **_LAYOUT,
        "height": 380,
        "title": _title("How deep the network needs to be: accuracy by solver budget"),
        "margin": {"l": 70, "r": 20, "t": 100, "b": 50},
        "xaxis": _axis("f-evaluations the solve may spend (k)", type="log", tickvals=budgets),
        "yaxis": _axis("test accuracy (%)"),
        "legend": _LEGEND,
    }  # fmt: skip
    return go.Figure(data=traces, layout=layout)


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
    title: str,
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
        "height": 360,
        "title": _title(title),
        "margin": {"l": 70, "r": 20, "t": 100, "b": 50},
        "xaxis": _axis("epoch", tick0=0, dtick=max(1, round(len(records) / 10))),
        "legend": _LEGEND,
        "yaxis": _axis(y_title, **y_scale),
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
        "Accuracy per epoch",
    )
    solves = [("forward solve (train)", _TRAIN, "forward"), ("backward solve (train)", _BACKWARD, "backward"),
              (f"forward solve ({held_out})", eval_color, "eval_forward")]  # fmt: skip
    residuals = _curves(
        records,
        [(name, color, attrgetter(f"{solve}_residual")) for name, color, solve in solves],
        "mean final relative residual",
        "Final relative residual of the solves per epoch",
        log_y=True,
    )
    steps = _curves(
        records,
        [(name, color, attrgetter(f"{solve}_iters")) for name, color, solve in solves],
        "mean solver steps (f-evaluations)",
        "Solver steps per epoch",
    )
    return accuracy, residuals, steps
