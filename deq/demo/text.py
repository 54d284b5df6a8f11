"""What the page says in words: the results table, the status line and warnings of a request,
what was done to an input image, and the training-log note of a model. Markdown strings only.

The model card itself is ``deq.card.card_markdown`` (the Hub's model README shows it too).
"""

from __future__ import annotations

import math

from .images import PreparedImage
from .inference import FLOAT64_BELOW_TOL, RACE, SolverResult, SolveSettings, solver_label, trustworthy

__all__ = ["results_table", "verdict", "warnings", "status", "input_summary", "train_log_note"]


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _outcome(r: SolverResult) -> str:
    if r.diverged:
        return "**diverged**"
    return "converged" if r.converged else "not converged"


def results_table(results: dict[str, SolverResult], race: tuple[str, ...] = RACE) -> str:
    """Markdown: f-evaluations, final residual, wall time, outcome, the f-evaluation from which
    the answer was final and the prediction, per solver of the race, and how the wall times were
    measured; once all have finished, each one's speed-up over the baseline (the race's last
    solver) and whether they reach the same prediction."""
    if not results:
        return ""
    lines = [
        "| solver | f-evals | residual | wall time* | result | answer final at | prediction |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for solver in race:
        r = results.get(solver)
        if r is None:
            lines.append(f"| {solver_label(solver)} | … | | | running | | |")
            continue
        pred = f"{r.prediction} ({max(r.probs):.0%})" if r.probs is not None else "–"
        settled = f"f-eval {r.settled_at}" if r.settled_at is not None else "–"
        lines.append(
            f"| {r.label} | {r.n_evals} | {r.residual:.2e} | {_fmt_time(r.timed_wall_s)} | {_outcome(r)} | "
            f"{settled} | {pred} |"
        )
    note = f"\\* wall time: {next(iter(results.values())).timing_note}."
    if not all(solver in results for solver in race):
        return "\n\n".join(["\n".join(lines), note])
    baseline = results[race[-1]]
    speedups = [_speedup(results[solver], baseline) for solver in race[:-1]]
    return "\n\n".join(["\n".join(lines), note, *speedups, _agreement([results[s] for s in race])])


def _times(ratio: float, fewer: str, more: str, same: str) -> str:
    """ "2.1x fewer f-evaluations" or, for a ratio below 1, "1.3x more f-evaluations" (never "0.8x
    fewer"); ``same`` when the ratio rounds to 1.0x."""
    if not math.isfinite(ratio) or ratio <= 0:
        return f"no comparable {fewer.split(' ', 1)[-1]}"
    if round(ratio, 1) == 1.0 and round(1 / ratio, 1) == 1.0:
        return same
    return f"{ratio:.1f}x {fewer}" if ratio >= 1 else f"{1 / ratio:.1f}x {more}"


def _speedup(a: SolverResult, base: SolverResult) -> str:
    if not a.converged:
        return f"**Speed-up:** none to report, {a.label} did not reach tol."
    at_least = "" if base.converged else "at least "  # the baseline stopped at max_iter
    evals = base.n_evals / max(a.n_evals, 1)
    wall = base.timed_wall_s / a.timed_wall_s if a.timed_wall_s > 0 else float("inf")
    evals_text = _times(evals, "fewer f-evaluations", "more f-evaluations", "as many f-evaluations")
    wall_text = _times(wall, "less wall time", "more wall time", "about the same wall time")
    prefix = at_least if evals >= 1 else ""
    return (
        f"**Speed-up of {a.label} over {base.label}:** {prefix}{evals_text}, "
        f"{at_least if wall >= 1 else ''}{wall_text} ({a.timing_note})"
        + ("" if base.converged else f"; {base.label} did not reach tol")
        + "."
    )


def verdict(results: dict[str, SolverResult], race: tuple[str, ...] = RACE, sep: str = ", ") -> str:
    """The race's outcome (the residual chart's title), once every solver finished:
    "Anderson: 9 f-evaluations (2.1x fewer than forward iteration), forward iteration: 19", the
    solvers joined by ``sep``; the comparison is the first solver's against the baseline (the last)."""
    if not race or not all(s in results for s in race):
        return ""
    parts = []
    for solver in race:
        r = results[solver]
        what = f"{r.n_evals} f-evaluations"
        if r.diverged:
            what += " (diverged)"
        elif not r.converged:
            what += " (stopped at max_iter)"
        parts.append(f"{r.label}: {what}")
    first, base = results[race[0]], results[race[-1]]
    if len(race) > 1 and first.converged:
        ratio = base.n_evals / max(first.n_evals, 1)
        at_least = "≥ " if not base.converged and ratio >= 1 else ""
        than = base.label
        comparison = _times(ratio, f"fewer than {than}", f"more than {than}", f"as many as {than}")
        parts[0] += f" ({at_least}{comparison})"
    return sep.join(parts)


def _agreement(results: list[SolverResult]) -> str:
    if any(r.prediction is None for r in results):
        return "**Same prediction:** cannot tell, a solver gave no finite answer."
    predictions = {r.prediction for r in results}
    if len(predictions) == 1:
        both = "both" if len(results) == 2 else "all"
        return f"**Same prediction:** yes, {both} say *{results[0].prediction}*."
    first, *rest = results
    return (f"**Same prediction:** no: {first.label} says *{first.prediction}*, "
            + ", ".join(f"{r.label} *{r.prediction}*" for r in rest) + ".")  # fmt: skip


def warnings(results: dict[str, SolverResult], settings: SolveSettings) -> list[str]:
    """One sentence per solver whose answer cannot be trusted, and one if none can."""
    out = []
    for r in results.values():
        if r.diverged:
            damped = "beta" in settings.solver_kwargs(r.solver) and settings.beta > 1
            hint = " (try a smaller beta)" if damped else ""
            reason = r.message.removeprefix("diverged: ")
            out.append(f"{r.label} diverged ({reason}){hint}: its answer is not trustworthy.")
        elif r.probs is None:
            out.append(f"{r.label} gave a non-finite output: no prediction from it.")
        elif not trustworthy(r):
            out.append(f"{r.label} stopped at residual {r.residual:.1e}, far from the equilibrium: "
                       "its answer is not trustworthy.")  # fmt: skip
    if results and not any(trustworthy(r) for r in results.values()):
        out.append("No solver reached a usable equilibrium for these settings: no prediction is shown.")
    return out


def status(
    results: dict[str, SolverResult],
    running: dict[str, tuple[int, float]] | None,
    settings: SolveSettings,
) -> str:
    """The status line: each running solver's iteration and residual ({solver: (iteration,
    residual)}), or what stopped short and why."""
    parts = []
    if running:
        positions = [f"{solver_label(s)}: iteration {i}, residual {r:.2e}" for s, (i, r) in running.items()]
        parts.append("Solving… " + "; ".join(positions))
    else:
        parts.append("Done.")
    for r in results.values():
        if not r.converged and not r.diverged:
            parts.append(f"{r.label} stopped at max_iter={settings.max_iter} above tol.")
    if not running and results and settings.tol < FLOAT64_BELOW_TOL:
        if all(r.dtype == "float64" for r in results.values()):
            floor = f"{FLOAT64_BELOW_TOL:.0e}"
            parts.append(f"tol below {floor}: solved in float64 (float32 residuals bottom out near 1e-7).")
        else:
            parts.append("Residuals bottom out near 1e-7 in float32: a smaller tol may not be reachable.")
    parts += [f"⚠️ {w}" for w in warnings(results, settings)]
    return "  \n".join(parts)


def input_summary(prepared: PreparedImage) -> str:
    """ "Input: JPEG 640x480 (RGB); centre-cropped ...": what the upload was and what was done."""
    w, h = prepared.original_size
    return f"Input: {prepared.format} {w}x{h} ({prepared.mode})" + "".join(f"; {n}" for n in prepared.notes)


def train_log_note(label: str, n_records: int, problem: str | None) -> str:
    """The line above a model's training charts."""
    if problem is not None:
        return f"`{label}` shows no training curves: {problem}"
    return f"Training curves of `{label}`: {n_records} epochs, from its `train_log.jsonl`."
