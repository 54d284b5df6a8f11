"""Solver benchmark on the seed cell (random weights): iterations, f-evaluations, wall time.

    python -m bench.solvers                 # both cases from the issue, CPU
    python -m bench.solvers --device cuda

Each time is the median of --repeats rounds after a warm-up call; the contenders run round
robin, so machine drift hits all alike. "f-only" is the time the same number of chained
f-evaluations takes on their own, so "overhead" is the solver's own bookkeeping.
"textbook" is the plain Anderson loop of the implicit-layers tutorial (Kolter, Duvenaud,
Johnson), used as the reference point for Anderson's overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deq import SOLVERS, ModelConfig, ResNetCell


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


def bench_case(label: str, batch: int, channels: int, inner: int, args) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    cell = ResNetCell(channels, inner, 8, ModelConfig().init_std).to(device).eval()
    x = torch.randn(batch, channels, 32, 32, device=device)
    f = lambda z: cell(z, x)  # noqa: E731
    z0 = torch.zeros_like(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opts = {"tol": args.tol, "max_iter": args.max_iter}
    print(
        f"\n{label}: batch {batch} x {channels} x 32 x 32, cell {channels}/{inner}, "
        f"tol {args.tol:g}, device {device}, torch threads {torch.get_num_threads()}"
    )
    with torch.inference_mode():
        runs = {name: (lambda s=solver: s(f, z0, **opts)) for name, solver in SOLVERS.items()}
        runs["anderson (textbook)"] = lambda: textbook_anderson(f, z0, **opts)
        evals = {}
        for name, run in runs.items():  # warm-up, and the f-evaluation counts
            out = run()
            evals[name] = out[1].n_evals if name in SOLVERS else out[1]
            stats = out[1] if name in SOLVERS else None
            evals[name] = (evals[name], stats)
        contenders = dict(runs)
        for name, (n, _) in evals.items():
            contenders[f"f-only {name}"] = lambda n=n: f_only(f, z0, n)
        times = {name: [] for name in contenders}
        for _ in range(args.repeats):  # round robin: machine drift hits every contender alike
            for name, run in contenders.items():
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                times[name].append(time.perf_counter() - t0)
    wall = {name: statistics.median(ts) for name, ts in times.items()}
    fwd_evals, fwd_time = evals["forward"][0], wall["forward"]
    print(
        f"{'solver':<20} {'f-evals':>7} {'conv':>5} {'residual':>9} {'wall ms':>8} "
        f"{'f-only ms':>9} {'overhead':>8} {'evals vs fwd':>12} {'speed vs fwd':>12}"
    )
    for name in runs:
        n, stats = evals[name]
        conv = str(stats.converged) if stats else "-"
        res = stats.residual if stats else float("nan")
        t, t_f = wall[name], wall[f"f-only {name}"]
        print(
            f"{name:<20} {n:>7} {conv:>5} {res:>9.2e} {t * 1e3:>8.1f} {t_f * 1e3:>9.1f} "
            f"{t / t_f - 1:>+8.1%} {fwd_evals / n:>11.2f}x {fwd_time / t:>11.2f}x"
        )
    print(
        f"anderson vs textbook anderson: "
        f"{wall['anderson (textbook)'] / wall['anderson']:.2f}x faster wall time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    bench_case("reference batch", 10, 64, 128, args)
    bench_case("single image (seed cell)", 1, 48, 64, args)


if __name__ == "__main__":
    main()
