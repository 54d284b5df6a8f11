"""One GPU session in one command: train the shipped checkpoints, pick, evaluate, benchmark.

    python3 scripts/gpu_session.py --out "$OUT" --data .gpudata   # the real run (~9 min on an H100/H200)
    python3 scripts/gpu_session.py --out /tmp/smoke --smoke    # the whole script at tiny size, on CPU

What it does, with every run planned for a wall-clock budget (train.py --time-budget-s):
1. Unpacks the CIFAR-10 JPEG archive (``<--data>/cifar10-jpeg.tar.xz``) and decodes it once.
2. Trains a sweep of seed-size configurations (``fast`` preset plus --seed-args, one
   Jacobian-regulariser weight each, concurrent processes; by default the one weight the first
   session chose), then the ``large`` preset plus --large-args (after the sweep, or alongside it
   with --concurrent); --models picks one of the two. All hold out the same
   5,000 training images as a validation split; none of them sees the test set.
3. Picks the seed configuration on the validation split alone: among the runs that are real
   equilibrium models there (Anderson converges to tol 1e-4 within 100 f-evaluations on >= 98%
   of the images and needs fewer f-evaluations than forward iteration, median per image), the
   most accurate; if none is, the most accurate of all (its card says so).
4. Evaluates the chosen seed model and the large model once on the full test set: at their
   own solver settings (the card's headline accuracy), and as the app solves: tol 1e-4 /
   max_iter 100 from z0 = 0, no flips, true float32, with Anderson and with forward iteration
   (per-image f-evaluation counts).
5. Runs the CUDA-only tests and (unless --no-benchmarks) the solver and training benchmarks,
   the GPU presets' recipes among them (``bench.training --recipes gpu``).

What comes back under --out (at most 8 files): checkpoints.tar.gz (seed/ = the chosen run,
large/, and each sweep run, without resume state), summary.json, session.log, logs.tar.gz,
tests.txt, bench_solvers.txt, bench_training.txt, bench_recipes.txt. Everything is written as
soon as it exists, so a run cut short still returns what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deq.checkpoint import CONFIG_NAME, read_config, update_card  # noqa: E402  (after the sys.path line)

PY = sys.executable
ARCHIVE = "cifar10-jpeg.tar.xz"  # looked for in --data
EQUILIBRIUM = {"tol": 1e-4, "max_iter": 100}  # the app's defaults, from z0 = 0
MIN_CONVERGED = 0.98


@dataclass
class Run:
    """One train.py process."""

    name: str
    preset: str
    budget_s: float
    options: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    started: float = 0.0

    def out(self, runs: Path) -> Path:
        return runs / self.name


# The seed sweep varies the weight of the Jacobian regulariser: too little and the cell may lose
# its attracting fixed point, too much and it is so contractive that acceleration has nothing
# to gain (the CPU stand-in showed both ends).
SEED_SWEEP_JAC = (3.0,)  # the 2026-11-27 session's choice among 0.1, 0.5, 2, 3, 6 and 12
# Batch 256: at batch 100 one training step (25 forward + 25 backward f-evaluations) took 22 ms on
# an H200, bound as much by kernel launches as by arithmetic, so a larger batch buys images/s.
# BatchNorm recalibration: in run 3 the validation accuracy swung between epochs (seed: 15-71%) as
# the running statistics lagged the weights. The implicit gradient stays: on the CPU (README,
# "The next GPU run") phantom training made the cell so contractive that forward iteration
# needed no more f-evaluations than Anderson, at Jacobian weights 2 and 0.5 alike.
SEED_ARGS = "--batch-size 256 --lr 2.5e-3 --bn-recalibrate 2000"
LARGE_ARGS = "--batch-size 256 --lr 2.5e-3 --bn-recalibrate 2000"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(args: list[str], out_file: Path, timeout: float) -> int:
    """Run a command to completion, its output to out_file; its exit status."""
    log("$ " + " ".join(args))
    try:
        with open(out_file, "w") as fh:
            return subprocess.run(
                args, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
    except subprocess.TimeoutExpired:
        log(f"timed out after {timeout:.0f} s: {args[:4]}")
        return 124


def prepare_data(data: Path) -> None:
    if not (data / "train").is_dir():
        data.mkdir(parents=True, exist_ok=True)
        with tarfile.open(data / ARCHIVE) as tar:
            tar.extractall(data, filter="data")
    from deq.data import load_cifar10

    t = time.time()
    for split in ("train", "test"):
        images, _ = load_cifar10(data, split)
        log(f"{split}: {tuple(images.shape)} decoded/cached in {time.time() - t:.1f} s")


def start(run: Run, args, runs: Path, logs: Path) -> None:
    cmd = [PY, "train.py", "--preset", run.preset, "--data", str(args.data), "--out", str(run.out(runs)),
           "--val-images", str(args.val_images), "--time-budget-s", str(run.budget_s), "--no-progress",
           *run.options, *args.train_args]  # fmt: skip
    log("start: " + " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    fh = open(logs / f"{run.name}.log", "w")
    run.process = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    run.started = time.time()


def wait(run: Run, grace_s: float) -> None:
    """Wait for a run: its budget plus ``grace_s`` (start-up, the last evaluation), then stop it."""
    try:
        code = run.process.wait(timeout=max(1.0, run.started + run.budget_s + grace_s - time.time()))
    except subprocess.TimeoutExpired:
        run.process.terminate()
        code = run.process.wait()
    log(f"{run.name}: exit {code}")


class Evaluator:
    """Evaluations in this process (the data loaded once, on the GPU); each report is also
    recorded in the checkpoint's card with the ``python -m deq.evaluate`` command that redoes it."""

    def __init__(self, args):
        import torch

        from deq.data import random_subset
        from deq.evaluate import load_split

        self.args = args
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # true float32: TF32 convolutions (cuDNN's default) leave ~1e-3 noise in f, which can hold
        # a residual above tol 1e-4 that the same model reaches on a CPU
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        self.data = {
            split: tuple(t.to(self.device) for t in load_split(str(args.data), split, args.val_images))
            for split in ("val", "test")
        }
        if args.smoke:  # the script's paths, not the models, are under test: a random 200 of each
            self.data = {split: random_subset(*data, 200) for split, data in self.data.items()}

    def __call__(self, ckpt: Path, split: str, **options) -> dict | None:
        from deq.checkpoint import load_model
        from deq.evaluate import evaluate_checkpoint

        a = self.args
        cli = ["python -m deq.evaluate", str(ckpt), "--data", str(a.data), "--split", split,
               "--val-images", str(a.val_images), "--batch-size", str(a.eval_batch), "--record"]  # fmt: skip
        for key in ("solver", "tol", "max_iter"):
            if key in options:
                cli += [f"--{key.replace('_', '-')}", str(options[key])]
        if options.get("flip") is not None:
            cli.append("--flip" if options["flip"] else "--no-flip")
        if options.get("headline"):
            cli.append("--headline")
        try:
            model = load_model(ckpt, self.device)
            result = evaluate_checkpoint(
                str(ckpt), model, *self.data[split], split=split, command=" ".join(cli),
                batch_size=a.eval_batch, record=True, **options,
            )  # fmt: skip
        except Exception as err:  # one failed evaluation must not cost the session's other results
            log(f"evaluation failed: {' '.join(cli)}: {type(err).__name__}: {err}")
            return None
        log(f"{ckpt} {split} {options}: acc {result['accuracy']:.4f}, f-evals median "
            f"{result['median_f_evals']:.0f} p90 {result['p90_f_evals']:.0f}, "
            f"converged {result['converged_fraction']:.4f}")  # fmt: skip
        return result


def equilibrium(evaluate: Evaluator, ckpt: Path, split: str) -> dict:
    """Anderson vs forward iteration as the app solves (its defaults, no test-time flips) on
    ``split``: the per-solver reports."""
    return {s: evaluate(ckpt, split, solver=s, flip=False, **EQUILIBRIUM) for s in ("anderson", "forward")}


def is_real_equilibrium(reports: dict) -> bool:
    a, f = reports.get("anderson"), reports.get("forward")
    return bool(
        a and f and a["converged_fraction"] >= MIN_CONVERGED and a["median_f_evals"] < f["median_f_evals"]
    )


def pack(out: Path, runs: Path, logs: Path) -> None:
    """checkpoints.tar.gz (no resume state: the runs are finished) and logs.tar.gz."""
    with tarfile.open(out / "checkpoints.tar.gz.tmp", "w:gz") as tar:
        for d in sorted(p for p in runs.iterdir() if p.is_dir() and p != logs):
            for f in sorted(d.iterdir()):
                if not f.name.startswith("train_state"):
                    tar.add(f, arcname=f"{d.name}/{f.name}")
    (out / "checkpoints.tar.gz.tmp").replace(out / "checkpoints.tar.gz")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path(".data"))
    parser.add_argument("--runs", type=Path, default=Path("runs/gpu"), help="where the runs are trained")
    parser.add_argument("--overwrite", action="store_true", help="replace what --runs holds")
    parser.add_argument("--val-images", type=int, default=5000)
    parser.add_argument("--seed-budget", type=float, default=270.0)
    parser.add_argument("--large-budget", type=float, default=190.0)
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="train large alongside the seed sweep (one GPU time-slices processes: "
        "this splits its throughput, it does not add to it)",
    )
    parser.add_argument("--eval-batch", type=int, default=500)
    parser.add_argument(
        "--sweep-jac",
        type=float,
        nargs="+",
        default=SEED_SWEEP_JAC,
        help="the seed sweep: one run per Jacobian-regulariser weight",
    )
    parser.add_argument(
        "--train-args", default="", help='extra train.py options for every run, e.g. --train-args="--no-amp"'
    )
    parser.add_argument(
        "--seed-args",
        default=SEED_ARGS,
        help="extra train.py options for the seed runs (before --train-args)",
    )
    parser.add_argument("--large-args", default=LARGE_ARGS, help="extra train.py options for the large run")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=("seed", "large"),
        default=["seed", "large"],
        help="what to train: the seed sweep, the large model or both (e.g. --models large "
        "--large-budget 470 gives large the whole command)",
    )
    parser.add_argument("--no-bench", action="store_true", help="skip the CUDA tests and benchmarks")
    parser.add_argument(
        "--no-benchmarks", action="store_true", help="run the CUDA tests but skip the benchmarks"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on CPU: tests the script, not the models"
    )
    args = parser.parse_args()
    args.train_args = args.train_args.split()
    if args.smoke:
        args.seed_budget, args.large_budget = min(args.seed_budget, 8.0), min(args.large_budget, 12.0)
        args.val_images, args.eval_batch = 100, 100
        args.train_args = ["--limit-train", "200", "--batch-size", "20", "--device", "cpu"]

    out, runs = args.out.resolve(), args.runs  # --runs and --data: relative to ROOT, as the cards name them
    logs = runs / "logs"  # packed into logs.tar.gz: --out may hold 8 files only
    os.chdir(ROOT)
    if runs.exists() and any(runs.iterdir()) and not args.overwrite:
        sys.exit(f"error: {runs} holds earlier runs; move them away or pass --overwrite")
    for d in (runs, logs):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary: dict = {
        "device": device,
        "torch": torch.__version__,
        "started": time.strftime("%FT%TZ", time.gmtime()),
    }
    save = lambda: (out / "summary.json").write_text(json.dumps(summary, indent=2))  # noqa: E731
    log(f"torch {torch.__version__} on {device}")

    prepare_data(args.data)
    large = None
    if "large" in args.models:
        large = Run("large", "large", args.large_budget, args.large_args.split())
    seeds = [
        Run(f"seed-jac{w:g}", "fast", args.seed_budget, [*args.seed_args.split(), "--jac-reg", str(w)])
        for w in (args.sweep_jac if "seed" in args.models else ())
    ]
    for run in seeds:
        start(run, args, runs, logs)
    if large and args.concurrent:
        start(large, args, runs, logs)
    evaluate = Evaluator(args)

    # --- the seed sweep: pick on the validation split, then the test set once
    candidates = []
    for run in seeds:
        wait(run, grace_s=120)
        ckpt = run.out(runs)
        if not (ckpt / CONFIG_NAME).is_file():
            candidates.append({"run": run.name, "options": run.options, "error": "no checkpoint"})
            continue
        card = read_config(ckpt)["card"]
        reports = equilibrium(evaluate, ckpt, "val")
        candidates.append({
            "run": run.name, "options": run.options, "val_accuracy": card.get("val_accuracy"),
            "epochs": card.get("epochs"), "train_wall_time_s": card.get("train_wall_time_s"),
            "anderson": reports["anderson"], "forward": reports["forward"],
            "real_equilibrium": is_real_equilibrium(reports),
        })  # fmt: skip
    if seeds:
        summary["seed_candidates"] = candidates
        save()
    trained = [c for c in candidates if c.get("val_accuracy") is not None]
    eligible = [c for c in trained if c["real_equilibrium"]] or trained
    if eligible:
        best = max(eligible, key=lambda c: c["val_accuracy"])
        rule = (
            "most accurate on the validation split among the configurations on which Anderson converges "
            f"(tol {EQUILIBRIUM['tol']:g}, max_iter {EQUILIBRIUM['max_iter']}) on >= {MIN_CONVERGED:.0%} of "
            "its images with a lower median f-evaluation count than forward iteration"
        )
        if not best["real_equilibrium"]:
            rule = "no configuration met the equilibrium criterion on the validation split; " + rule.replace(
                "among the configurations", "of all; the criterion was: configurations"
            )
        chosen = runs / "seed"
        shutil.copytree(runs / best["run"], chosen)
        brief = [
            {k: c.get(k) for k in ("run", "options", "val_accuracy", "real_equilibrium")}
            | {f"{s}_median_f_evals": (c.get(s) or {}).get("median_f_evals") for s in ("anderson", "forward")}
            for c in candidates
        ]
        update_card(chosen, selection={"configurations_tried": len(candidates), "chosen": best["run"],
                                       "rule": rule, "validation_images": args.val_images,
                                       "candidates": brief})  # fmt: skip
        summary["seed"] = {"chosen": best["run"], "test": test_reports(evaluate, chosen)}
        save()
    pack(out, runs, logs)
    if large and not args.concurrent:
        start(large, args, runs, logs)

    # --- CUDA-only tests while the large model trains (small: they barely slow it down)
    pytest = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings"]
    if not args.no_bench:
        sh(
            [*pytest, "tests/test_cuda.py", "tests/test_solvers.py", "-k", "cuda"],
            out / "tests.txt",
            timeout=120,
        )
    if large is None:
        summary["wall_s"] = round(time.time() - t0, 1)
        save()
        return

    wait(large, grace_s=150)
    if (runs / "large" / CONFIG_NAME).is_file():
        summary["large"] = {"val": equilibrium(evaluate, runs / "large", "val"),
                            "test": test_reports(evaluate, runs / "large")}  # fmt: skip
        save()
    pack(out, runs, logs)

    # --- benchmarks last: alone on the GPU
    if not (args.smoke or args.no_bench or args.no_benchmarks):
        bench_solvers = [PY, "-m", "bench.solvers", "--device", "cuda", "--repeats", "5",
                         "--data", str(args.data), "--model", "checkpoints/cpu"]  # fmt: skip
        sh(bench_solvers, out / "bench_solvers.txt", timeout=60)
        bench_training = [PY, "-m", "bench.training", "--device", "cuda", "--batch-size", "100"]
        sh(bench_training, out / "bench_training.txt", timeout=45)
        bench_recipes = [PY, "-m", "bench.training", "--device", "cuda", "--recipes", "gpu", "--repeats", "3"]
        sh(bench_recipes, out / "bench_recipes.txt", timeout=90)
    summary["wall_s"] = round(time.time() - t0, 1)
    save()
    pack(out, runs, logs)
    log(f"done in {summary['wall_s']} s")
    for key in ("seed", "large"):
        for name, rep in (summary.get(key, {}).get("test") or {}).items():
            if rep:
                log(f"{key} test {name:<9} acc {rep['accuracy']:.4f}  median f-evals "
                    f"{rep['median_f_evals']:.0f}  p90 {rep['p90_f_evals']:.0f}  "
                    f"converged {rep['converged_fraction']:.4f}")  # fmt: skip


def test_reports(evaluate: Evaluator, ckpt: Path) -> dict:
    """The test set, once per setting: the model's own (the card's headline), then the equilibrium."""
    return {"own": evaluate(ckpt, "test", headline=True), **equilibrium(evaluate, ckpt, "test")}


if __name__ == "__main__":
    main()
