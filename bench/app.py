"""Latency of the demo's request: time to the first streamed frame and to the final answer.

    python -m bench.app                          # model from checkpoints/ (as app.py picks it)
    python -m bench.app --model DIR_OR_REPO_ID --tol 1e-4 --threads 1

Runs ``deq.demo.stream.stream_solve`` (the race's solvers traced side by side, then the
untraced solves that time them) on the ten example images, after one warm-up request, and prints
p50/p90 over them. The replay that draws the race at a human pace (``REPLAY_S``) and the frame
throttle are switched off here (a frame per f-evaluation): "answer" is the time until both
solvers' results are in, "final" until the timing solves are done too. Per-solver wall times are
the medians of those untraced solves. Image decoding is included (it is part of a request); the
web server's own overhead is not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from deq.demo.catalogue import load_catalogue
from deq.demo.images import prepare_image
from deq.demo.inference import SolveSettings
from deq.demo.stream import stream_solve

ROOT = Path(__file__).resolve().parent.parent


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile, q in [0, 1]."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_request(model, path: Path, settings: SolveSettings) -> dict:
    """One request as the app serves it; times in seconds from its start."""
    start = time.perf_counter()
    prepared = prepare_image(path)
    first = answer = None
    frames = 0
    for frame in stream_solve(model, prepared, settings, replay_s=0, interval=0.0):
        frames += 1
        if first is None:
            first = time.perf_counter() - start
        if answer is None and len(frame.results) == 2:
            answer = time.perf_counter() - start
        if frame.final:
            total = time.perf_counter() - start
            results = frame.results
    return {
        "first": first,
        "answer": answer,
        "total": total,
        "frames": frames,
        "anderson_evals": results["anderson"].n_evals,
        "forward_evals": results["forward"].n_evals,
        "anderson_s": results["anderson"].timed_wall_s,
        "forward_s": results["forward"].timed_wall_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint directory or Hub repo id (default: as app.py chooses)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=SolveSettings.max_iter)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (app.py uses 1)")
    parser.add_argument("--examples", default=str(ROOT / "examples"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    environ = {**os.environ, "DEQ_DEVICE": "cpu", **({"DEQ_MODEL": args.model} if args.model else {})}
    try:
        catalogue = load_catalogue(environ)  # the model the app would serve by default
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    served = catalogue.get(catalogue.default)
    model, source = served.model, served.source
    settings = SolveSettings(beta=args.beta, tol=args.tol, max_iter=args.max_iter).validate()
    images = sorted(Path(args.examples).glob("*.jpg"))
    if not images:
        raise SystemExit(f"no example images in {args.examples}")
    run_request(model, images[0], settings)  # warm-up
    rows = [(p.stem, run_request(model, p, settings)) for p in images]

    print(f"model {source}; tol {args.tol:g}, beta {args.beta:g}, max_iter {args.max_iter}; "
          f"torch threads {args.threads}; {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'image':<11} {'first frame':>12} {'answer':>9} {'final':>9} {'frames':>6} {'Anderson':>15} "
          f"{'forward':>15}")  # fmt: skip
    for name, r in rows:
        print(
            f"{name:<11} {r['first'] * 1e3:>9.1f} ms {r['answer'] * 1e3:>6.0f} ms "
            f"{r['total'] * 1e3:>6.0f} ms {r['frames']:>6} "
            f"{r['anderson_evals']:>4} f {r['anderson_s'] * 1e3:>5.0f} ms {r['forward_evals']:>4} f "
            f"{r['forward_s'] * 1e3:>5.0f} ms"
        )
    print()
    print(f"{'':<15} {'p50':>9} {'p90':>9} {'target':>9}")
    rows_to_print = (("first", "first frame", "100 ms"), ("answer", "answer", "300 ms p50"),
                     ("total", "final (timed)", ""))  # fmt: skip
    for key, label, target in rows_to_print:
        values = [r[key] * 1e3 for _, r in rows]
        p50, p90 = quantile(values, 0.5), quantile(values, 0.9)
        print(f"{label:<15} {p50:>6.1f} ms {p90:>6.1f} ms {target:>9}")
    speedup = statistics.median(r["forward_s"] / r["anderson_s"] for _, r in rows)
    print(f"median wall-time ratio forward / Anderson (medians of untraced solves): {speedup:.2f}")


if __name__ == "__main__":
    main()
