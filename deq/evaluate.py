"""Evaluate a classifier on a labelled set, optionally with other solver settings than it was
trained with (e.g. solved to the equilibrium rather than for a fixed budget).

    python -m deq.evaluate checkpoints/seed-cpu --data data --tol 1e-4 --max-iter 100
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import batches, load_cifar10
from .model import DEQClassifier
from .solvers import SolverStats

__all__ = ["predict", "evaluate"]


def predict(model: DEQClassifier, images: Tensor, **solver_overrides) -> tuple[Tensor, SolverStats]:
    """Logits (B, n_classes) and the forward solve's stats; overrides as in ``DEQFixedPoint.solve``."""
    z, stats = model.deq.solve(model.inject(images), **solver_overrides)
    return model.head(z), stats


@torch.inference_mode()
def evaluate(
    model: DEQClassifier,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 100,
    amp: bool = False,
    flip: bool = False,
    **solver_overrides,
) -> dict:
    """Sums over the set: loss, correct, n, forward residual and f-evaluations (per image),
    converged images. ``flip`` averages the logits of each image and its mirror."""
    model.eval()
    device = images.device.type
    sums = {"loss": 0.0, "correct": 0, "n": 0, "f_res": 0.0, "f_evals": 0, "converged": 0}
    tol = solver_overrides.get("tol", model.deq.solver_kwargs.get("tol", 1e-2))
    for x, y in batches(images, labels, batch_size):
        with torch.autocast(device, torch.bfloat16, enabled=amp):
            logits, stats = predict(model, x, **solver_overrides)
            if flip:
                logits = (logits.float() + predict(model, x.flip(3), **solver_overrides)[0].float()) / 2
        sums["loss"] += F.cross_entropy(logits.float(), y, reduction="sum").item()
        sums["correct"] += int((logits.argmax(1) == y).sum())
        sums["n"] += len(y)
        sums["f_res"] += float(stats.sample_residuals.sum())
        sums["f_evals"] += stats.n_evals * len(y)
        sums["converged"] += int((stats.sample_residuals < tol).sum())
    return sums


def main(argv: list[str] | None = None) -> None:
    from .checkpoint import load_model, update_card

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="data")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--solver", default=None, choices=["anderson", "forward", "broyden"])
    parser.add_argument("--tol", type=float, default=None)
    parser.add_argument("--max-iter", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--record", action="store_true", help="add the result to the checkpoint's card")
    args = parser.parse_args(argv)
    model = load_model(args.checkpoint, args.device)
    images, labels = (t.to(args.device) for t in load_cifar10(args.data, args.split))
    own = model.deq.solver_kwargs
    overrides = {
        "solver": args.solver or model.deq.solver,
        "tol": args.tol or own.get("tol", 1e-2),
        "max_iter": args.max_iter or own.get("max_iter", 50),
    }
    s = evaluate(model, images, labels, batch_size=args.batch_size, **overrides)
    report = {
        "split": args.split, "images": s["n"], "solver": overrides,
        "accuracy": s["correct"] / s["n"], "loss": s["loss"] / s["n"],
        "mean_residual": s["f_res"] / s["n"], "mean_f_evals": s["f_evals"] / s["n"],
        "converged_fraction": s["converged"] / s["n"],
        "command": " ".join(["python -m deq.evaluate", *(sys.argv[1:] if argv is None else argv)]),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.record:
        evaluations = [e for e in model.card.get("evaluations", []) if e.get("solver") != overrides]
        update_card(args.checkpoint, evaluations=[*evaluations, report])


if __name__ == "__main__":
    main()
