"""Solver benchmark: wall time against f-evaluations, side by side, and per-sample early exit.

    python -m bench.solvers                                  # CPU: both cases, then early exit
    python -m bench.solvers --device cuda
    python -m bench.solvers --early-exit-images 0            # the two solver cases only

Two cases, each a seed-style cell with random weights, tol 1e-4, z0 = 0:

- "batch 10": 10 x 64 x 32 x 32, cell 64/128, 2 torch threads;
- "batch 1": 1 x 48 x 32 x 32, cell 48/64, 1 torch thread (as the app runs).

Contenders: every registered solver, the plain Anderson loop of the implicit-layers tutorial
(Kolter, Duvenaud, Johnson: "textbook") and, when installed (``pip install torchdeq==0.1.0``),
TorchDEQ's ``anderson_solver`` with the same m, lam and mixing. Each time is the median of
--repeats rounds after a warm-up call; the contenders run round robin, so machine drift hits all
alike. "f-only" is the time the same number of chained f-evaluations takes on their own, and
"wall/f-only" the ratio: 1.00 is a solver that costs nothing beyond its f-evaluations.
"history read" is the time one read of Anderson's history (its m residuals and m iterates,
2 m D floats per sample) takes right after an f-evaluation, as a fraction of that
f-evaluation: a bound no Anderson iteration can go below, as it reads both once.

Early exit: the shipped model (``--model``) on the first --early-exit-images test images
(``--data``), batch 100, Anderson tol 1e-4, max_iter 100: images/s with and without (each batch
solved both ways, alternating which goes first), the f-evaluations actually done per image, and
whether every prediction is the same.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deq import SOLVERS, ModelConfig, ResNetCell

try:  # an optional contender
    from torchdeq.solver.anderson import anderson_solver as torchdeq_anderson
except ImportError:
    torchdeq_anderson = None

#: (label, batch, channels, inner channels, torch threads)
CASES = (("batch 10", 10, 64, 128, 2), ("batch 1", 1, 48, 64, 1))
ANDERSON = {"m": 5, "lam": 1e-4}


def textbook_anderson(f, x0, m=5, lam=1e-4, max_iter=50, tol=1e-2, beta=1.0):
    """The tutorial's Anderson loop (batched, per-sample alpha, one .item() per iteration)."""
    bsz, d, H, W = x0.shape
    X = torch.zeros(bsz, m, d * H * W, dtype=x0.dtype, device=x0.device)
    F = torch.zeros(bsz, m, d * H * W, dtype=x0.dtype, device=x0.device)
    X[:, 0], F[:, 0] = x0.view(bsz, -1), f(x0).view(bsz, -1)
    X[:, 1], F[:, 1] = F[:, 0], f(F[:, 0].view_as(x0)).view(bsz, -1)
    Hm = torch.zeros(bsz, m + 1, m + 1, dtype=x0.dtype, device=x0.device)
    Hm[:, 0, 1:] = Hm[:, 1:, 0] = 1
    y = torch.zeros(bsz, m + 1, 1, dtype=x0.dtype, device=x0.device)
    y[:, 0] = 1
    n_evals = 2
    for k in range(2, max_iter):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        Hm[:, 1 : n + 1, 1 : n + 1] = (
            torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n, dtype=x0.dtype, device=x0.device)[None]
        )
        alpha = torch.linalg.solve(Hm[:, : n + 1, : n + 1], y[:, : n + 1])[:, 1 : n + 1, 0]
        X[:, k % m] = (
            beta * (alpha[:, None] @ F[:, :n])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        )
        F[:, k % m] = f(X[:, k % m].view_as(x0)).view(bsz, -1)
        n_evals += 1
        res = (F[:, k % m] - X[:, k % m]).norm().item() / (1e-5 + F[:, k % m].norm().item())
        if res < tol:
            break
    return X[:, k % m].view_as(x0), n_evals


def f_only(f, z0, n: int):
    """n chained f-evaluations and nothing else: the floor a solver's wall time is held to."""
    z = z0
    for _ in range(n):
        z = f(z)
    return z


def contenders(f, z0, tol: float, max_iter: int) -> tuple[dict[str, Callable[[], int]], list[float]]:
    """name -> a run returning its f-evaluation count (counted by wrapping f, for all alike), and
    a list whose one entry is the seconds the last run spent inside f (a CPU clock: on a GPU it
    only measures the launches)."""
    calls, inside = [0], [0.0]

    def counted(z):
        calls[0] += 1
        t0 = time.perf_counter()
        fz = f(z)
        inside[0] += time.perf_counter() - t0
        return fz

    def run(solve) -> Callable[[], int]:
        def go() -> int:
            calls[0], inside[0] = 0, 0.0
            solve()
            return calls[0]

        return go

    limits = {"tol": tol, "max_iter": max_iter}
    runs = {name: run(lambda s=solver: s(counted, z0, **limits)) for name, solver in SOLVERS.items()}
    runs["anderson (textbook)"] = run(lambda: textbook_anderson(counted, z0, **limits, **ANDERSON))
    if torchdeq_anderson is not None:  # its relative residual, mixing tau = beta = 1
        runs["anderson (TorchDEQ)"] = run(
            lambda: torchdeq_anderson(counted, z0, **limits, stop_mode="rel", tau=1.0, **ANDERSON)
        )
    return runs, inside


def history_read(f, z0, m: int, repeats: int, sync) -> float:
    """Median seconds of one read of a (B, 2m, D) buffer right after an f-evaluation."""
    history = torch.randn(z0.shape[0], 2 * m, z0[0].numel(), device=z0.device)
    times = []
    for _ in range(repeats):
        f(z0)
        sync()
        t0 = time.perf_counter()
        history.sum()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_case(label: str, batch: int, channels: int, inner: int, threads: int, args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    cell = ResNetCell(channels, inner, 8, ModelConfig().init_std).to(device).eval()
    x = torch.randn(batch, channels, 32, 32, device=device)
    f = lambda z: cell(z, x)  # noqa: E731
    z0 = torch.zeros_like(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    where = f"torch threads {torch.get_num_threads()}" if device.type == "cpu" else str(device)
    print(
        f"\n{label}: {batch} x {channels} x 32 x 32, cell {channels}/{inner}, tol {args.tol:g}, "
        f"device {device}, {where}"
    )
    with torch.inference_mode():
        runs, inside = contenders(f, z0, args.tol, args.max_iter)
        evals = {name: run() for name, run in runs.items()}  # warm-up, and the counts
        every = dict(runs)
        for name, n in evals.items():
            every[f"f-only {name}"] = lambda n=n: f_only(f, z0, n)
        times = {name: [] for name in every}
        f_inside = []  # seconds Anderson's runs spent inside f
        for _ in range(args.repeats):  # round robin: machine drift hits every contender alike
            for name, run in every.items():
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                times[name].append(time.perf_counter() - t0)
                if name == "anderson":
                    f_inside.append(inside[0])
        one_f = statistics.median(times["f-only forward"]) / evals["forward"]
        read = history_read(f, z0, ANDERSON["m"], args.repeats * 3, sync)
    wall = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"{'solver':<20} {'f-evals':>7} {'wall ms':>8} {'f-only ms':>9} {'wall/f-only':>11} "
        f"{'evals vs fwd':>12} {'speed vs fwd':>12}"
    )
    for name in runs:
        n, t, t_f = evals[name], wall[name], wall[f"f-only {name}"]
        print(
            f"{name:<20} {n:>7} {t * 1e3:>8.1f} {t_f * 1e3:>9.1f} {t / t_f:>11.3f} "
            f"{evals['forward'] / n:>11.2f}x {wall['forward'] / t:>11.2f}x"
        )
    for other in ("anderson (TorchDEQ)", "anderson (textbook)"):
        if other in wall:
            print(f"anderson vs {other}: {wall[other] / wall['anderson']:.2f}x faster wall time")
    if device.type == "cpu":
        extra = wall["anderson"] - wall["f-only anderson"]
        slower_f = statistics.median(f_inside) - wall["f-only anderson"]
        per_iteration = extra / evals["anderson"]
        print(
            f"anderson beyond its f-evaluations: {extra * 1e3:.2f} ms = {per_iteration * 1e6:.0f} us per "
            f"iteration, of which f itself running slower inside the solve: {slower_f * 1e3:.2f} ms"
        )
    if torchdeq_anderson is None:
        print("anderson (TorchDEQ): not installed (pip install torchdeq==0.1.0 --no-deps to compare)")
    print(
        f"history read (2 x {ANDERSON['m']} x D floats per sample, after an f-evaluation): "
        f"{read * 1e3:.2f} ms = {read / one_f:.1%} of one f-evaluation ({one_f * 1e3:.2f} ms)"
    )
    return wall


def bench_early_exit(args) -> None:
    from deq.checkpoint import load_model
    from deq.data import batches, load_cifar10

    if args.device == "cpu":
        torch.set_num_threads(args.early_exit_threads)
    images, _ = load_cifar10(args.data, "test")
    model = load_model(args.model, args.device).eval()
    batch = [x for x, _ in batches(images[: args.early_exit_images].to(args.device), None, 100)]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    where = f"torch threads {torch.get_num_threads()}" if args.device == "cpu" else args.device
    shown = min(args.early_exit_images, len(images))
    print(
        f"\nearly exit: {args.model} on {shown} test images, batch 100, Anderson tol 1e-4, "
        f"max_iter 100, device {args.device}, {where}"
    )
    seconds, answers, work = {False: 0.0, True: 0.0}, {False: [], True: []}, {False: 0, True: 0}
    with torch.inference_mode():
        for early_exit in (False, True):  # warm-up
            model.predict(batch[0][:10], tol=1e-4, max_iter=100, early_exit=early_exit)
        for x in batch:  # each batch in both modes, alternating, so machine drift hits both
            for early_exit in (False, True) if len(answers[True]) % 2 else (True, False):
                sync()
                t0 = time.perf_counter()
                logits, stats = model.predict(x, tol=1e-4, max_iter=100, early_exit=early_exit)
                sync()
                seconds[early_exit] += time.perf_counter() - t0
                answers[early_exit].append(logits.argmax(1))
                work[early_exit] += stats.f_work
    answers = {early_exit: torch.cat(a) for early_exit, a in answers.items()}
    n = len(answers[True])
    same = int((answers[True] == answers[False]).sum())
    print(f"{'early exit':<12} {'images/s':>9} {'f-evaluations per image':>24}")
    for early_exit in (False, True):
        mode = "on" if early_exit else "off"
        print(f"{mode:<12} {n / seconds[early_exit]:>9.1f} {work[early_exit] / n:>24.1f}")
    print(
        f"early exit: {seconds[False] / seconds[True]:.2f}x the images/s; "
        f"same prediction on {same} of {n} images"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default="checkpoints/cpu", help="shipped model of the early-exit figure")
    parser.add_argument("--data", default="data", help="CIFAR-10 folder of the early-exit figure")
    parser.add_argument("--early-exit-images", type=int, default=1000, help="0: skip the early-exit figure")
    parser.add_argument(
        "--early-exit-threads", type=int, default=2, help="torch threads of the early-exit figure"
    )
    args = parser.parse_args()
    if args.early_exit_images < 0 or args.repeats < 1:
        parser.error("--early-exit-images must be >= 0 and --repeats >= 1")
    for case in CASES:
        bench_case(*case, args)
    if args.early_exit_images:
        if not Path(args.data).is_dir():
            print(f"\nearly exit: skipped, no CIFAR-10 folder at {args.data} (pass --data)")
        else:
            bench_early_exit(args)


if __name__ == "__main__":
    main()
