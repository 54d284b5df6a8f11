"""What the page says in words: the results table, the status line and warnings of a request,
what was done to an input image, and the training-log note of a model. Markdown strings only.

The model card itself is ``deq.card.card_markdown`` (the Hub's model README shows it too).
"""

from __future__ import annotations

from .images import PreparedImage
from .inference import RACE, SolverResult, SolveSettings, solver_label, trustworthy

__all__ = ["results_table", "warnings", "status", "input_summary", "train_log_note"]


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _outcome(r: SolverResult) -> str:
    if r.diverged:
        return "**diverged**"
    return "converged" if r.converged else "not converged"


def results_table(results: dict[str, SolverResult], race: tuple[str, ...] = RACE) -> str:
    """Markdown: iterations, f-evaluations, final residual, wall time per solver of the race;
    once all have finished, each one's speed-up over the baseline (the race's last solver)
    and whether they reach the same prediction."""
    if not results:
        return ""
    lines = [
        "| solver | iterations | f-evals | residual | wall time | result | prediction |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for solver in race:
        r = results.get(solver)
        if r is None:
            lines.append(f"| {solver_label(solver)} | … | | | | running | |")
            continue
        pred = f"{r.prediction} ({max(r.probs):.0%})" if r.probs is not None else "–"
        lines.append(
            f"| {r.label} | {max(len(r.trace) - 1, 0)} | {r.n_evals} | {r.residual:.2e} | "
            f"{_fmt_time(r.wall_s)} | {_outcome(r)} | {pred} |"
        )
    if not all(solver in results for solver in race):
        return "\n".join(lines)
    baseline = results[race[-1]]
    speedups = [_speedup(results[solver], baseline) for solver in race[:-1]]
    return "\n\n".join(["\n".join(lines), *speedups, _agreement([results[s] for s in race])])


def _speedup(a: SolverResult, base: SolverResult) -> str:
    if not a.converged:
        return f"**Speed-up:** none to report, {a.label} did not reach tol."
    at_least = "" if base.converged else "at least "  # the baseline stopped at max_iter
    evals = base.n_evals / max(a.n_evals, 1)
    wall = base.wall_s / a.wall_s if a.wall_s > 0 else float("inf")
    return (
        f"**Speed-up of {a.label} over {base.label}:** {at_least}{evals:.1f}x fewer f-evaluations, "
        f"{at_least}{wall:.1f}x less wall time"
        + ("" if base.converged else f" ({base.label} did not reach tol)")
    )


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
    results: dict[str, SolverResult], running: tuple[str, int, float] | None, settings: SolveSettings
) -> str:
    """The status line: which solver is at which iteration, or what stopped short and why."""
    parts = []
    if running is not None:
        solver, it, res = running
        parts.append(f"Solving… {solver_label(solver)}: iteration {it}, residual {res:.2e}")
    else:
        parts.append("Done.")
    for r in results.values():
        if not r.converged and not r.diverged:
            parts.append(f"{r.label} stopped at max_iter={settings.max_iter} above tol.")
    if running is None and settings.tol < 1e-6:
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
