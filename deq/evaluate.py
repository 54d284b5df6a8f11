"""Evaluate a classifier on a labelled set, optionally with other solver settings than it was
trained with (e.g. solved to the equilibrium rather than for a fixed budget).

    python -m deq.evaluate checkpoints/cpu --data data --tol 1e-4 --max-iter 100
    python -m deq.evaluate runs/seed --data data --split val --solver forward   # held-out 5,000
    python -m deq.evaluate checkpoints/cpu --data data --curve --record       # accuracy vs budget
    python -m deq.evaluate checkpoints/cpu --data data --spectral-radius      # of df/dz at z*

The f-evaluation counts are per image, as if each image were solved alone (samples of a
batch never interact): the report gives their mean, median and 90th percentile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_model, update_card
from .data import batches, load_cifar10, random_subset, split_validation
from .layer import spectral_radius
from .model import DEQClassifier
from .solvers import SOLVERS

__all__ = [
    "evaluate", "evaluate_checkpoint", "budget_curve", "spectral_radii", "report", "load_split",
    "device_label",
]  # fmt: skip

#: f-evaluation budgets of ``budget_curve``: how deep the weight-tied network has to be unrolled.
CURVE_BUDGETS = (1, 2, 3, 4, 6, 8, 12, 16, 25, 50)
#: Power iterations of ``spectral_radii``, and how many of the last growth factors it averages
#: (geometric mean): fewer vary more from one random start to another, image by image.
SPECTRAL_RADIUS_ITERS = 50
SPECTRAL_RADIUS_AVERAGE = 20


def device_label(device: str | torch.device) -> str:
    """ "NVIDIA H200" / "CPU (<model>, N cores, T torch threads)": where a figure was measured."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        names = []
    model = f"{names[0]}, {len(names)} cores" if names else (platform.processor() or platform.machine())
    return f"CPU ({model}, {torch.get_num_threads()} torch threads)"


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
    converged images, ``f_work`` (f-evaluations done, summed over images: each batch's solve
    length times its size without early exit), ``solve_s`` (wall time of the model calls, data
    cutting excluded) and
    ``early_exit`` (whether the solves retired converged images); and ``sample_evals``, each
    image's f-evaluations (N,) int64 on the CPU, and ``predictions`` (N,) int64 on the CPU.
    ``flip`` averages the logits of each image and its mirror (the counts are the plain view's)."""
    model.eval()
    device = images.device.type
    sums = {"loss": 0.0, "correct": 0, "n": 0, "f_res": 0.0, "f_evals": 0, "converged": 0, "solve_s": 0.0,
            "f_work": 0}  # fmt: skip
    per_image, predictions, early_exit = [], [], False
    tol = solver_overrides.get("tol", model.deq.solver_kwargs.get("tol", 1e-2))
    for x, y in batches(images, labels, batch_size):
        _synchronize(images.device)
        start = time.perf_counter()
        with torch.autocast(device, torch.bfloat16, enabled=amp):
            logits, stats = model.predict(x, **solver_overrides)
            if flip:
                logits = (logits.float() + model.predict(x.flip(3), **solver_overrides)[0].float()) / 2
        _synchronize(images.device)
        sums["solve_s"] += time.perf_counter() - start
        early_exit |= stats.early_exit
        sums["f_work"] += stats.f_work
        predictions.append(logits.argmax(1).cpu())
        sums["loss"] += F.cross_entropy(logits.float(), y, reduction="sum").item()
        sums["correct"] += int((logits.argmax(1) == y).sum())
        sums["n"] += len(y)
        sums["f_res"] += float(stats.sample_residuals.sum())
        sums["f_evals"] += int(stats.sample_evals.sum())
        sums["converged"] += int((stats.sample_residuals < tol).sum())
        per_image.append(stats.sample_evals.cpu())
    empty = torch.zeros(0, dtype=torch.int64)
    sums["sample_evals"] = torch.cat(per_image) if per_image else empty
    sums["predictions"] = torch.cat(predictions) if predictions else empty
    sums["early_exit"] = early_exit
    return sums


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(sums: dict) -> dict:
    """The headline figures of ``evaluate``'s sums (accuracy, loss, residual, f-evaluations)."""
    n, evals = sums["n"], sums["sample_evals"].double()
    return {
        "images": n,
        "accuracy": sums["correct"] / n,
        "loss": sums["loss"] / n,
        "mean_residual": sums["f_res"] / n,
        "mean_f_evals": sums["f_evals"] / n,
        "median_f_evals": float(evals.median()),
        "p90_f_evals": float(evals.quantile(0.9)),
        "converged_fraction": sums["converged"] / n,
        "early_exit": sums["early_exit"],
        "f_work_per_image": sums["f_work"] / n,  # f-evaluations done (the plain view's)
        "images_per_s": n / sums["solve_s"] if sums["solve_s"] > 0 else None,
        # two runs predicted the same class for every image iff their digests are equal
        "predictions_digest": hashlib.sha256(sums["predictions"].numpy().tobytes()).hexdigest()[:16],
    }


def load_split(root: str, split: str, val_images: int) -> tuple[Tensor, Tensor]:
    """ "train" (less the held-out images), "val" (the ``val_images`` held out) or "test"."""
    if split == "test":
        return load_cifar10(root, "test")
    train, val = split_validation(*load_cifar10(root, "train"), val_images)
    return val if split == "val" else train


def evaluate_checkpoint(
    checkpoint: str,
    model: DEQClassifier,
    images: Tensor,
    labels: Tensor,
    *,
    split: str,
    command: str,
    solver: str | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    flip: bool | None = None,
    early_exit: bool | None = None,
    batch_size: int = 100,
    record: bool = False,
    headline: bool = False,
) -> dict:
    """Evaluate a loaded checkpoint on (images, labels) and report it; with ``record``, the report
    goes into the checkpoint's card (``headline``: also as the card's test accuracy).
    Unset solver options are the model's own; ``flip`` defaults to how it was trained;
    ``early_exit`` None leaves it to the layer (on for CPU batches, off on GPUs)."""
    own = model.deq.solver_kwargs
    overrides = {
        "solver": solver or model.deq.solver,
        "tol": tol or own.get("tol", 1e-2),
        "max_iter": max_iter or own.get("max_iter", 50),
    }
    flip = flip if flip is not None else bool(model.card.get("train_config", {}).get("test_flip"))
    if len(labels) == 0:
        raise ValueError(f"no images to evaluate in split {split!r}")
    exit_option = {} if early_exit is None else {"early_exit": early_exit}
    s = evaluate(model, images, labels, batch_size=batch_size, flip=flip, **overrides, **exit_option)
    result = {"split": split, "solver": overrides, "flip": flip, "batch_size": batch_size, **report(s),
              "device": device_label(images.device), "command": command}  # fmt: skip
    if record:  # a new report replaces the one made the same way (same settings, data, device)
        same = ("split", "solver", "flip", "images", "device", "early_exit")
        older = {"early_exit": False}  # reports older than early exit ran without it
        evaluations = [
            e for e in model.card.get("evaluations", [])
            if tuple(e.get(k, older.get(k)) for k in same) != tuple(result[k] for k in same)
        ]  # fmt: skip
        headline_fields = {"test_accuracy": result["accuracy"], "test_images": s["n"]} if headline else {}
        model.card = update_card(checkpoint, evaluations=[*evaluations, result], **headline_fields)
    return result


def budget_curve(
    model: DEQClassifier,
    images: Tensor,
    labels: Tensor,
    *,
    budgets: tuple[int, ...] = CURVE_BUDGETS,
    solvers: tuple[str, ...] = ("anderson", "forward"),
    tol: float = 1e-4,
    batch_size: int = 100,
) -> dict:
    """Accuracy as a function of the solver budget: for each solver and each budget k, the
    accuracy with ``max_iter=k`` (a solve still stops earlier at ``tol``). Images (N, 3, 32, 32)
    in [0, 1], labels (N,). Returns {"budgets": [...], solver: [accuracy per budget], ...}."""
    if not budgets or any(not isinstance(k, int) or k < 1 for k in budgets):
        raise ValueError(f"budgets must be integers >= 1, got {budgets!r}")
    if len(labels) == 0:
        raise ValueError("budget_curve needs at least one image")
    curve: dict = {"budgets": list(budgets), "tol": tol}
    for solver in solvers:
        curve[solver] = [
            evaluate(model, images, labels, batch_size=batch_size, solver=solver, tol=tol, max_iter=k)[
                "correct"
            ]
            / len(labels)
            for k in budgets
        ]
    return curve


def spectral_radii(
    model: DEQClassifier,
    images: Tensor,
    *,
    iters: int = SPECTRAL_RADIUS_ITERS,
    average: int = SPECTRAL_RADIUS_AVERAGE,
    tol: float = 1e-4,
    max_iter: int = 100,
    batch_size: int = 100,
    seed: int = 0,
) -> Tensor:
    """(N,) each image's spectral radius of df/dz at its equilibrium z* (Anderson to ``tol``),
    estimated with ``iters`` power iterations from seeded random starts, the geometric mean of the
    last ``average`` growth factors: near z*, forward iteration multiplies the residual by about
    this factor per f-evaluation (below 1 it converges). Images (N, 3, 32, 32) in [0, 1]."""
    if len(images) == 0:
        raise ValueError("spectral_radii needs at least one image")
    generator = torch.Generator(images.device).manual_seed(seed)
    model.eval()
    radii = []
    for x_images, _ in batches(images, None, batch_size):
        with torch.no_grad():
            x = model.inject(x_images)
            z_star, _ = model.deq.solve(x, solver="anderson", tol=tol, max_iter=max_iter)
        with torch.enable_grad():
            z = z_star.requires_grad_()
            fz = model.deq.f(z, x)
            estimate = spectral_radius(
                fz, z, iters, average=average, differentiable=False, generator=generator
            )
            radii.append(estimate.cpu())
    return torch.cat(radii)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="data")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument(
        "--val-images",
        type=int,
        default=None,
        help="size of the validation split held out of the training set "
        "(default: the checkpoint's own, from its card)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=0,
        help="evaluate on this many images of the split, a fixed random subset (0: all)",
    )
    parser.add_argument(
        "--solver", default=None, choices=sorted(SOLVERS), help="default: the one the model was trained with"
    )
    parser.add_argument("--tol", type=float, default=None)
    parser.add_argument("--max-iter", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average each image's logits with its mirror's (default: as in training)",
    )
    parser.add_argument(
        "--early-exit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stop iterating each image once it has converged (default: the layer's choice, on for "
        "CPU batches, off on GPUs; the report's images_per_s is the solves' throughput, f_work_per_image the "
        "f-evaluations done per image, predictions_digest compares two runs' answers)",
    )
    parser.add_argument(
        "--curve",
        action="store_true",
        help="instead of one evaluation: accuracy at each solver budget "
        f"{', '.join(map(str, CURVE_BUDGETS))} for Anderson and forward iteration (tol 1e-4 unless --tol)",
    )
    parser.add_argument(
        "--spectral-radius",
        action="store_true",
        help="instead of one evaluation: each image's spectral radius of df/dz at its equilibrium "
        f"(Anderson to tol 1e-4 unless --tol; {SPECTRAL_RADIUS_ITERS} power iterations, the last "
        f"{SPECTRAL_RADIUS_AVERAGE} averaged), median and percentiles",
    )
    parser.add_argument("--record", action="store_true", help="add the result to the checkpoint's card")
    parser.add_argument(
        "--headline",
        action="store_true",
        help="with --record on the test split: also make this the card's test accuracy",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.headline and not (args.record and args.split == "test"):
        parser.error("--headline needs --record and --split test")
    # true float32 on GPUs too (cuDNN's TF32 default can hold residuals above a tight tol)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model(args.checkpoint, args.device)
    trained_with = int((model.card.get("train_config") or {}).get("val_images") or 0)
    if args.split != "test" and args.val_images is None and not trained_with:
        parser.error(
            f"{args.checkpoint} was trained without a validation split: its 'val' images "
            "would be training images (pass --val-images to choose a split anyway)"
        )
    if args.split != "test" and trained_with and args.val_images not in (None, trained_with):
        parser.error(
            f"--val-images {args.val_images}: {args.checkpoint} held out {trained_with}; "
            "another split would mix its training images into 'val'"
        )
    val_images = trained_with if args.val_images is None else args.val_images
    images, labels = load_split(args.data, args.split, val_images)
    if args.images:
        images, labels = random_subset(images, labels, args.images)
    images, labels = images.to(args.device), labels.to(args.device)
    command = " ".join(["python -m deq.evaluate", *(sys.argv[1:] if argv is None else argv)])
    if args.spectral_radius:
        if args.curve or args.solver or args.headline or args.flip is not None or args.early_exit is not None:
            parser.error(
                "--spectral-radius solves with Anderson itself: "
                "drop --curve/--solver/--headline/--flip/--early-exit"
            )
        tol = 1e-4 if args.tol is None else args.tol
        max_iter = 100 if args.max_iter is None else args.max_iter
        radii = spectral_radii(model, images, tol=tol, max_iter=max_iter, batch_size=args.batch_size)
        result = {"split": args.split, "images": len(radii), "tol": tol, "max_iter": max_iter,
                  "power_iterations": SPECTRAL_RADIUS_ITERS, "averaged": SPECTRAL_RADIUS_AVERAGE, "seed": 0,
                  "median": float(radii.median()), "p10": float(radii.quantile(0.1)),
                  "p90": float(radii.quantile(0.9)), "max": float(radii.max()),
                  "at_least_one": float((radii >= 1).double().mean()),
                  "device": device_label(args.device), "command": command}  # fmt: skip
        if args.record:
            update_card(args.checkpoint, spectral_radius=result)
        print(json.dumps(result, indent=2))
        return
    if args.curve:
        if args.solver or args.max_iter or args.headline or args.early_exit is not None:
            parser.error(
                "--curve sets the solvers and budgets itself: "
                "drop --solver/--max-iter/--headline/--early-exit"
            )
        curve = budget_curve(model, images, labels, tol=args.tol or 1e-4, batch_size=args.batch_size)
        result = {"split": args.split, "images": len(labels), **curve,
                  "device": device_label(args.device), "command": command}  # fmt: skip
        if args.record:
            update_card(args.checkpoint, budget_curve=result)
        print(json.dumps(result, indent=2))
        return
    result = evaluate_checkpoint(
        args.checkpoint, model, images, labels, split=args.split,
        command=command, solver=args.solver, tol=args.tol, max_iter=args.max_iter, flip=args.flip,
        early_exit=args.early_exit, batch_size=args.batch_size, record=args.record, headline=args.headline,
    )  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
