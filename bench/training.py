"""Training-step benchmark of the seed model: throughput and memory, side by side in one run.

    python -m bench.training                 # CPU, batch 32
    python -m bench.training --device cuda --batch-size 100

1. Training images/s with the exact implicit backward vs the phantom (1-step) backward, same
   forward solve (Anderson, tol 1e-2, max_iter 25 as in SPEC; the same options backward).
2. Activation memory of the DEQ vs the same cell unrolled for n iterations with ordinary
   backprop, for growing n: bytes of tensors autograd saves for backward (exact, any device),
   plus the CUDA peak allocation when run on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from deq import DEQClassifier, DEQFixedPoint, ModelConfig, unroll


def step_time(model, x, y, opt, sync, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):  # first step is warm-up
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )

    print(
        f"\n1. training throughput (median step of {args.repeats} after warm-up, "
        "best of 2 alternating rounds)"
    )
    print(f"{'backward':<10} {'images/s':>9} {'step ms':>8} {'fwd evals':>9} {'bwd evals':>9}")
    models = {}
    for mode in ("implicit", "phantom"):
        torch.manual_seed(0)
        models[mode] = DEQClassifier(ModelConfig(backward=mode)).to(device)
    rows = {mode: [] for mode in models}
    for _ in range(2):  # alternate so machine drift hits both
        for mode, model in models.items():
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            rows[mode].append(step_time(model, x, y, opt, sync, args.repeats))
    for mode, model in models.items():
        _, info = model(x, return_info=True)
        loss = F.cross_entropy(_, y)
        loss.backward()
        t = min(rows[mode])
        bwd = info.backward.n_evals if info.backward else "-"
        print(f"{mode:<10} {args.batch_size / t:>9.1f} {t * 1e3:>8.1f} {info.forward.n_evals:>9} {bwd:>9}")
    print(f"phantom / implicit throughput: {min(rows['implicit']) / min(rows['phantom']):.2f}x")

    print("\n2. activation memory vs solver iterations (forward iteration, tol unreachable)")
    print(
        f"{'iterations':>10} {'DEQ saved MB':>13} {'unrolled saved MB':>18} "
        f"{'DEQ peak MB':>12} {'unrolled peak MB':>17}"
    )
    torch.manual_seed(0)
    model = DEQClassifier().to(device)
    inj = model.inject(x).detach().requires_grad_()
    for n in (5, 10, 20, 40):
        deq = DEQFixedPoint(
            model.deq.f,
            solver="forward",
            tol=1e-30,
            max_iter=n,
            backward_kwargs={"tol": 1e-30, "max_iter": n},
        )
        peaks = []
        for fn in (  # run at once, inside this iteration: late binding is harmless
            lambda: deq(inj)[0].sum().backward(),  # noqa: B023
            lambda: unroll(model.deq.f, inj, n).sum().backward(),  # noqa: B023
        ):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                fn()
                peaks.append(f"{(torch.cuda.max_memory_allocated(device) - base) / 2**20:>12.1f}")
            else:
                peaks.append(f"{'n/a (CPU)':>12}")
        deq_mb = saved_bytes(lambda: deq(inj)) / 2**20  # noqa: B023
        unrolled_mb = saved_bytes(lambda: unroll(model.deq.f, inj, n)) / 2**20  # noqa: B023
        print(f"{n:>10} {deq_mb:>13.1f} {unrolled_mb:>18.1f} {peaks[0]} {peaks[1]:>17}")


if __name__ == "__main__":
    main()
