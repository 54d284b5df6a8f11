"""Training-step benchmark of the seed model: throughput and memory, side by side in one run.

    python -m bench.training                 # CPU, batch 32
    python -m bench.training --device cuda --batch-size 100
    python -m bench.training --recipes       # whole training recipes side by side (CPU: ~1 min)
    python -m bench.training --device cuda --recipes gpu   # the GPU presets' options side by side
    python -m bench.training --early-exit --batch-size 64   # early exit in training, shipped cpu model

1. Training images/s with the exact implicit backward vs the phantom (1-step) backward, same
   forward solve (Anderson, tol 1e-2, max_iter 25 as in the reference recipe; the same options backward).
2. Activation memory of the DEQ vs the same cell unrolled for n iterations with ordinary
   backprop, for growing n: bytes of tensors autograd saves for backward (exact, any device),
   plus the CUDA peak allocation when run on a GPU.
3. With --recipes instead: training images/s of whole train.py recipes (layout, widths, batch,
   backward, Jacobian regulariser, memory format), every solve running to its max_iter (tol
   unreachable), so the figures are each recipe's worst case and compare like with like.
   --recipes gpu: the GPU presets, implicit vs phantom gradient, with and without the regulariser.
4. With --early-exit instead: training steps (cross-entropy, implicit backward, no regulariser)
   of a shipped model (--model, its own solver settings) on real training images (--data),
   with the forward solve's per-sample early exit off and on, side by side.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from deq import DEQClassifier, DEQFixedPoint, ModelConfig, unroll
from deq.evaluate import device_label

#: (label, train.py options) of --recipes; "cpu (before)" is the 2-epoch CPU stand-in's recipe.
RECIPES = (
    ("cpu (before): seed 48/64, phantom, jac 5, f 8, batch 50",
     {"backward": "phantom", "jac_reg": 5.0, "f_max_iter": 8, "batch_size": 50}),
    ("seed 48/64, implicit, jac 3, f 15 / b 10, batch 64",
     {"jac_reg": 3.0, "f_max_iter": 15, "b_max_iter": 10, "batch_size": 64}),
    ("seed 48/64, same, channels_last", {"jac_reg": 3.0, "f_max_iter": 15, "b_max_iter": 10,
                                         "batch_size": 64, "channels_last": True}),
    ("cpu (now): large 64/128, implicit, jac 2, f 15 / b 10, batch 64", {"preset": "cpu"}),
    ("cpu (now), channels_last", {"preset": "cpu", "channels_last": True}),
    ("cpu (now), batch 32", {"preset": "cpu", "batch_size": 32}),
    ("cpu (now), batch 128", {"preset": "cpu", "batch_size": 128}),
    ("large 64/96 (cheaper cell), otherwise cpu (now)", {"preset": "cpu", "n_inner_channels": 96}),
    ("cpu-rho: cpu (now) + spectral-radius band (8 VJPs), f 20 / b 10", {"preset": "cpu-rho"}),
)  # fmt: skip

#: --recipes gpu: the GPU presets as run 3 trained them (H200, 2026-11-27) against the phantom
#: gradient at batch 512, with and without the Jacobian regulariser and with the spectral-radius
#: band (on the CPU, phantom training alone made the cell so contractive that forward iteration
#: kept up with Anderson; README): what the next GPU run picks from. The first row is the
#: baseline of the "vs first" column.
GPU_RECIPES = (
    ("fast (run 3): seed 48/64, implicit, jac 3, f 20 / b 12, batch 256",
     {"preset": "fast", "batch_size": 256}),
    ("fast, phantom, jac 3, batch 256", {"preset": "fast", "batch_size": 256, "backward": "phantom"}),
    ("fast, phantom, jac 3, batch 512", {"preset": "fast", "batch_size": 512, "backward": "phantom"}),
    ("fast, phantom, no regulariser, batch 512",
     {"preset": "fast", "batch_size": 512, "backward": "phantom", "jac_reg": 0.0}),
    ("fast, phantom, jac 3 + spectral-radius band (8 VJPs), batch 512",
     {"preset": "fast", "batch_size": 512, "backward": "phantom", "rho_reg": 4.0, "rho_min": 0.78,
      "rho_max": 0.88}),
    ("large (run 3): 128/256, implicit, jac 3, f 15 / b 10, batch 256",
     {"preset": "large", "batch_size": 256}),
    ("large, phantom, jac 3, batch 512", {"preset": "large", "batch_size": 512, "backward": "phantom"}),
    ("large, phantom, no regulariser, batch 512",
     {"preset": "large", "batch_size": 512, "backward": "phantom", "jac_reg": 0.0}),
)  # fmt: skip

RECIPE_SETS = {"cpu": RECIPES, "gpu": GPU_RECIPES}


#: Batches of real training images --early-exit steps through (each round).
EARLY_EXIT_BATCHES = 6


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


def recipe_config(options: dict, **overrides):
    """The train.TrainConfig of a recipe: its preset (if any), then its options, then ``overrides``."""
    import train  # the repository root is on sys.path under `python -m bench.training`

    options = dict(options)
    preset = options.pop("preset", None)
    return train.config_from_options({**(train.PRESETS[preset] if preset else {}), **options, **overrides})


def recipe_step_time(options: dict, device: torch.device, sync, repeats: int) -> tuple[float, int, int]:
    """(seconds per training step, batch size, parameters) of one train.py recipe."""
    import train

    cfg = recipe_config(options, f_tol=1e-30, b_tol=1e-30)  # tol unreachable: every solve runs to max_iter
    torch.manual_seed(0)
    model = DEQClassifier(cfg.model).to(device)
    x = torch.rand(cfg.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    times = []
    for i in range(repeats + 1):  # first step is warm-up
        sync()
        t0 = time.perf_counter()
        loss = train.training_loss(model, x, y, cfg, device.type)[3]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), cfg.batch_size, sum(p.numel() for p in model.parameters())


def compare_recipes(recipes, device: torch.device, sync, repeats: int) -> None:
    print(f"training recipes (median step of {repeats} after warm-up, best of 2 alternating rounds)")
    best = {label: math.inf for label, _ in recipes}
    sizes = {}
    for _ in range(2):  # alternate so machine drift hits every recipe
        for label, options in recipes:
            t, batch, params = recipe_step_time(options, device, sync, repeats)
            best[label] = min(best[label], t / batch)
            sizes[label] = params
    base = best[recipes[0][0]]
    print(f"{'recipe':<66} {'params':>8} {'images/s':>9} {'vs first':>9}")
    for label, _ in recipes:
        print(f"{label:<66} {sizes[label]:>8,} {1 / best[label]:>9.1f} {base / best[label]:>8.2f}x")


def compare_early_exit(args, device: torch.device, sync) -> None:
    from deq.checkpoint import load_model
    from deq.data import batches, load_cifar10

    model = load_model(args.model, device).train()
    images, labels = load_cifar10(args.data, "train")
    n = args.batch_size * EARLY_EXIT_BATCHES
    data = list(batches(images[:n].to(device), labels[:n].to(device), args.batch_size))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # every step sees the same weights
    print(
        f"early exit in training: {args.model} ({model.deq.solver}, {model.deq.solver_kwargs}), "
        f"{EARLY_EXIT_BATCHES} batches of {args.batch_size} training images, median step of 2 rounds"
    )
    times, evals = {False: [], True: []}, {False: [], True: []}
    for round_ in range(3):  # the first is warm-up; alternate so machine drift hits both
        for early_exit in (False, True):
            model.deq.early_exit = early_exit
            for x, y in data:
                sync()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                logits, info = model(x, return_info=True)
                F.cross_entropy(logits, y).backward()
                opt.step()
                sync()
                if round_:
                    times[early_exit].append(time.perf_counter() - t0)
                    evals[early_exit].append(info.forward.f_work / len(x))  # f's work, per image
    print(f"{'early exit':<11} {'images/s':>9} {'step ms':>8} {'forward f-evaluations per image':>32}")
    for early_exit in (False, True):
        t = statistics.median(times[early_exit])
        print(
            f"{'on' if early_exit else 'off':<11} {args.batch_size / t:>9.1f} {t * 1e3:>8.1f} "
            f"{statistics.mean(evals[early_exit]):>32.1f}"
        )
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"early exit: {ratio:.2f}x the training images/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--recipes",
        nargs="?",
        const="cpu",
        choices=sorted(RECIPE_SETS),
        help="compare whole training recipes instead: the CPU ones (the default) or the GPU presets",
    )
    parser.add_argument("--early-exit", action="store_true", help="early exit off vs on in training instead")
    parser.add_argument("--model", default="checkpoints/cpu", help="shipped model of --early-exit")
    parser.add_argument("--data", default="data", help="CIFAR-10 folder of --early-exit")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.early_exit:
        print(f"device {device} ({device_label(device)})\n")
        compare_early_exit(args, device, sync)
        return
    if args.recipes:
        print(f"device {device} ({device_label(device)}), torch threads {torch.get_num_threads()}\n")
        compare_recipes(RECIPE_SETS[args.recipes], device, sync, args.repeats)
        return
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
