"""The model card as Markdown: what a checkpoint's card says (accuracy, how, where and by which
command it was trained, its equilibrium evaluations, spectral radius and accuracy-by-budget
curve), for the app's model tab and the Hub model repo's README alike.
"""

from __future__ import annotations

from .model import DEQClassifier
from .solvers import SOLVERS

__all__ = ["budget_curve", "card_markdown", "lineage", "total_train_wall_time_s"]


def _short_commit(commit: str) -> str:
    """The first 10 hex digits, keeping train.py's "+dirty" (uncommitted changes) mark."""
    sha, dirty, _ = str(commit).partition("+dirty")
    return sha[:10] + ("+dirty" if dirty else "")


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
        n_stages = len(lineage(card))
        stage = f"Last of {n_stages} training stages: trained" if n_stages > 1 else "Trained"
        lines.append(f"- {stage} {done}{where}{took}{data}")
        if card.get("finished") is False:
            lines.append("- ⚠️ training had not finished when this checkpoint was written")
    if card.get("command"):
        commit = f" at commit `{_short_commit(card['git_commit'])}`" if card.get("git_commit") else ""
        lines.append(f"- Command: `{card['command']}`{commit}")
    lines.extend(_lineage_lines(card))
    if card.get("dataset"):
        lines.append(f"- Data: {card['dataset']}")
    solver_opts = ", ".join(f"{k}={v}" for k, v in cfg.solver_kwargs.items())
    lines.append(
        f"- {cfg.arch} architecture, {n_params:,} parameters, equilibrium width {cfg.n_channels} channels; "
        f"trained with the {cfg.solver} solver ({solver_opts}), {cfg.backward} backward"
        + (f" ({cfg.backward_solver} solver)" if cfg.backward == "implicit" and cfg.backward_solver else "")
    )
    for e in card.get("evaluations") or []:
        lines.extend(_evaluation_line(e))
    lines.extend(_spectral_radius_line(card.get("spectral_radius")))
    if card.get("notes"):
        lines.append(f"- Notes: {card['notes']}")
    if card.get("torch"):
        lines.append(f"- torch {card['torch']}")
    lines.extend(_curve_table(card.get("budget_curve")))
    if not card:
        lines.append("- This checkpoint carries no model card.")
    return "\n".join(lines)


def lineage(card: dict) -> list[dict]:
    """The cards of a fine-tuned model's training stages, the first (trained from scratch) first
    and ``card`` last; each stage started from the previous one's weights (``--init-from``)."""
    stages = []
    while isinstance(card, dict) and len(stages) < 100:
        stages.append(card)
        parent = card.get("init_from")
        card = parent.get("card") if isinstance(parent, dict) else None
    return stages[::-1]


def total_train_wall_time_s(card: dict) -> float:
    """Training wall time of all of a model's stages (``lineage``), in seconds."""
    return sum(float(stage.get("train_wall_time_s") or 0) for stage in lineage(card))


def _lineage_lines(card: dict) -> list[str]:
    """A fine-tuned model's stages, one numbered line each ([] for a model trained in one go)."""
    stages = lineage(card)
    if len(stages) < 2:
        return []
    try:
        total = total_train_wall_time_s(card)
        lines = [f"- Trained in {len(stages)} stages, each from the previous one's weights, "
                 f"{_fmt_duration(total)} ({total:,.0f} s) in all:"]  # fmt: skip
        for i, stage in enumerate(stages, 1):
            took = _fmt_duration(float(stage["train_wall_time_s"]))
            commit = f", commit `{_short_commit(stage['git_commit'])}`" if stage.get("git_commit") else ""
            lines.append(f"  {i}. `{stage['command']}`: {stage['epochs']:.3g} epochs, {took}{commit}")
        return lines
    except (KeyError, TypeError, ValueError):
        return []  # a card from elsewhere with other fields: show nothing rather than fail


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


def _spectral_radius_line(e) -> list[str]:
    """``deq.evaluate --spectral-radius --record``'s summary as a bullet ([] if absent)."""
    if not isinstance(e, dict):
        return []
    try:
        where = f" on {e['device']}" if e.get("device") else ""
        images = f"{e['images']:,} {e.get('split', 'test')} images"
        return [f"- Spectral radius of df/dz at the equilibrium ({images}, "
                f"{e['power_iterations']} power iterations{where}): median {e['median']:.2f}, "
                f"p90 {e['p90']:.2f}: near z*, forward iteration multiplies the residual by about this "
                "factor per f-evaluation (below 1 it converges)"]  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return []  # a card from elsewhere with other fields: show nothing rather than fail


def budget_curve(curve) -> tuple[list[int], dict[str, list[float]]] | None:
    """A card's ``budget_curve`` (``deq.evaluate --curve --record``) as (budgets, {solver name:
    accuracy per budget}); None if absent or not of that form."""
    if not isinstance(curve, dict):
        return None
    try:
        budgets = [int(k) for k in curve["budgets"]]
        rows = {name: [float(a) for a in curve[name]] for name in SOLVERS if name in curve}
    except (KeyError, TypeError, ValueError):
        return None
    if not rows or any(len(accs) != len(budgets) for accs in rows.values()):
        return None
    return budgets, rows


def _curve_table(curve) -> list[str]:
    """``deq.evaluate --curve --record``'s accuracy-by-budget as a Markdown table ([] if absent)."""
    parsed = budget_curve(curve)
    if parsed is None:
        return []
    budgets, accuracies = parsed
    rows = [(SOLVERS[name].label, accs) for name, accs in accuracies.items()]
    try:
        where = f" on {curve['device']}" if curve.get("device") else ""
        head = (f"\n**Accuracy by solver budget** ({curve['images']:,} {curve.get('split', 'test')} images, "
                f"solves stopped after k f-evaluations or at tol {curve['tol']:g}{where}):\n")  # fmt: skip
        table = ["| f-evaluations k | " + " | ".join(map(str, budgets)) + " |",
                 "|---" * (len(budgets) + 1) + "|"]  # fmt: skip
        table += [f"| {name} | " + " | ".join(f"{100 * a:.1f}%" for a in accs) + " |" for name, accs in rows]
        return [head, *table]
    except (KeyError, TypeError, ValueError):
        return []  # a card from elsewhere with other fields: show nothing rather than fail
