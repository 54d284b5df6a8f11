"""Train the DEQ CIFAR-10 classifier and write a checkpoint (safetensors + JSON card + log).

    python train.py --preset seed --data data --out runs/seed          # the reference 50-epoch recipe
    python train.py --preset fast --data data --out runs/fast          # the seed model, 270 s of one GPU
    python train.py --preset large --data data --out runs/large        # one wide DEQ cell, 400 s of one GPU
    python train.py --preset cpu --data data --out runs/cpu            # 1.5 hours of a 2-core CPU
    python train.py --preset cpu-rho --data data --out runs/cpu-rho --init-from RUN   # + 1 hour, fine-tune
    torchrun --nproc_per_node=2 train.py --preset seed ...             # multi-GPU (DDP)

Every TrainConfig field is a command-line option (--batch-size, --jac-reg, ...), and so are the
model's (MODEL_OPTIONS: --arch, --solver, --f-max-iter, --solver-option m=6, ...); a preset sets
defaults, explicit options override them. Data: see deq/data.py (class folders, e.g. the offline
JPEG copy unpacked with `tar -xJf cifar10-jpeg.tar.xz -C data`, or torchvision's CIFAR10 with
--download). --resume continues the run in --out from its last finished epoch.
"""

# Reading order: the config (TrainConfig, MODEL_OPTIONS, PRESETS, parse_args), setup (Process,
# data, model, the --out checks), one epoch (Schedule, run_epoch, evaluate_epoch), the record and
# checkpoint of an epoch, then main.

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from deq import DEQClassifier, ModelConfig
from deq.checkpoint import (
    CONFIG_NAME,
    LOG_NAME,
    STATE_NAME,
    EpochRecord,
    load_model,
    load_state,
    read_config,
    read_log,
    save_checkpoint,
    save_state,
    update_card,
    write_log,
)
from deq.data import batches, describe_source, load_cifar10, random_subset, split_validation
from deq.evaluate import device_label, evaluate
from deq.layer import BACKWARD_MODES
from deq.model import ARCHITECTURES
from deq.solvers import COMMON_OPTIONS, SOLVERS, lookup


@dataclass
class TrainConfig:
    """One training run. ``model`` is the classifier's own config (architecture, solvers); the
    rest is how it is trained, grouped by concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # --- data
    data: str = "data"
    download: bool = False
    val_images: int = 0  # hold these out of the training set; evaluate on them, never on test
    augment: bool = False
    limit_train: int = 0  # 0 = all
    limit_test: int = 0
    # --- optimisation and its schedule
    epochs: int = 50  # with time_budget_s: an upper bound only
    time_budget_s: float = 0.0  # > 0: train for this wall time, the schedule planned over it
    batch_size: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup: float = 0.0  # fraction of the schedule with a linear warm-up of the learning rate
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    jac_reg: float = 0.0  # weight of the Jacobian regulariser ||df/dz||_F^2 / dim (0 = off)
    jac_target: float = 0.0  # > 0: penalise only the excess over this ||df/dz||_F^2 / dim (a hinge)
    jac_two_sided: bool = False  # with jac_target: penalise the distance to it either way
    rho_reg: float = 0.0  # weight of the spectral-radius band penalty (0 = off)
    rho_min: float = 0.0  # with rho_reg: penalise a spectral radius of df/dz at z* below this ...
    rho_max: float = 1.0  # ... or above this (per sample, a hinge either side)
    rho_iters: int = 8  # power iterations of the spectral-radius estimate
    # --- evaluation after each epoch
    test_flip: bool = False  # average logits over the image and its mirror
    bn_recalibrate: int = 0  # recompute BatchNorm statistics on this many training images first (0 = off)
    # --- the machine
    amp: bool = False  # bf16 autocast (CUDA)
    channels_last: bool = False
    compile: bool = False  # torch.compile the cell
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    # --- the run's directory
    out: str = "runs/seed"
    resume: bool = False  # continue the run saved in --out
    overwrite: bool = False  # start a new run in an --out that holds one, replacing it
    init_from: str = ""  # start from this checkpoint's weights (fresh optimizer and schedule)


#: Command-line options that build ``TrainConfig.model`` (the rest are TrainConfig's own fields),
#: with their defaults. --f-* set the forward solve, --b-* the implicit backward's; a solver's own
#: options (Anderson's m, lam, beta) come from --solver-option / --backward-option KEY=VALUE and
#: otherwise are the solver's defaults, written into the model config.
MODEL_OPTIONS: dict[str, object] = {
    "arch": "seed", "n_channels": 48, "n_inner_channels": 64, "n_groups": 8, "init_std": 0.01,
    "solver": "anderson", "f_tol": 1e-2, "f_max_iter": 25, "solver_option": (),
    "backward": "implicit", "backward_solver": "", "b_tol": 1e-2, "b_max_iter": 25, "backward_option": (),
    "phantom_steps": 1,
}  # fmt: skip

PRESETS: dict[str, dict] = {
    "seed": {},  # the defaults are the reference recipe: 50 epochs of Adam, Anderson, implicit backward
    # The GPU presets train for a wall-clock budget, not a number of epochs. float32 (TF32 convs)
    # and Jacobian weight 3: with bf16 or a weaker weight the cells lost their fixed point within
    # 4 epochs on an H200; with a stronger one forward iteration catches up with Anderson.
    "fast": {  # the seed architecture on one GPU in 5 minutes
        "epochs": 500, "time_budget_s": 270, "val_images": 5000, "batch_size": 128, "lr": 2e-3,
        "warmup": 0.02, "augment": True, "label_smoothing": 0.1, "f_max_iter": 20, "b_max_iter": 12,
        "jac_reg": 3.0, "channels_last": True,
    },
    "large": {  # one wider DEQ cell at 16x16 on one GPU in 7 minutes (the regulariser as for the seed)
        "arch": "large", "n_channels": 128, "n_inner_channels": 256, "epochs": 500, "time_budget_s": 400,
        "val_images": 5000, "batch_size": 128, "lr": 2e-3, "warmup": 0.02, "weight_decay": 5e-5,
        "augment": True, "label_smoothing": 0.1, "test_flip": True, "f_max_iter": 15, "b_max_iter": 10,
        "jac_reg": 3.0, "channels_last": True,
    },
    # 1.5 hours of a 2-core CPU. The "large" layout (DEQ at 16x16 behind a strided stem) at 64/128
    # channels trains ~2x the images/s of the seed layout at 32x32, with 3.7x the parameters (243k;
    # `python -m bench.training --recipes`). The Jacobian weight sets the trade-off measured on
    # 300 validation images after 3 epochs (Anderson vs forward iteration at tol 1e-4): weight 3 was
    # so contractive that Anderson saved only 1.25x f-evaluations (median 12 vs 15); weight 1 lost
    # the equilibrium (Anderson converged on 46%, falling). Adam moves near-constant equilibrium
    # channels faster than BatchNorm's running averages follow (validation accuracy 30% where batch
    # statistics gave 52%), hence the recalibration before each evaluation.
    "cpu": {
        "arch": "large", "n_channels": 64, "n_inner_channels": 128, "epochs": 500, "time_budget_s": 5400,
        "val_images": 5000, "batch_size": 64, "lr": 2e-3, "warmup": 0.02, "weight_decay": 5e-5,
        "augment": True, "label_smoothing": 0.1, "f_max_iter": 15, "b_max_iter": 10, "jac_reg": 2.0,
        "bn_recalibrate": 2000,
    },
    # The last of checkpoints/cpu's three stages (README): a fine-tune (--init-from) that pushes
    # each image's spectral radius of df/dz at z* (the 8-iteration training estimate) into
    # [0.78, 0.88]. "cpu" leaves it at a median 0.70, where forward iteration needs only 1.33x
    # Anderson's f-evaluations; near the band forward iteration is slow and Anderson still
    # converges. 20 training solver steps: with 15 the batch residual stayed at 0.03-0.04, above
    # tol 1e-2.
    "cpu-rho": {
        "arch": "large", "n_channels": 64, "n_inner_channels": 128, "epochs": 500, "time_budget_s": 3600,
        "val_images": 5000, "batch_size": 64, "lr": 1e-3, "warmup": 0.05, "weight_decay": 5e-5,
        "augment": True, "label_smoothing": 0.1, "f_max_iter": 20, "b_max_iter": 10, "jac_reg": 2.0,
        "rho_reg": 4.0, "rho_min": 0.78, "rho_max": 0.88, "bn_recalibrate": 2000,
    },
}  # fmt: skip


def _option_value(text: str):
    """KEY=VALUE's value: a JSON number/bool/null, else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _solver_options(pairs, flag: str) -> dict:
    """A solver's own options from repeated KEY=VALUE; tol and max_iter have flags of their own."""
    options = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        if key in COMMON_OPTIONS:
            raise ValueError(
                f"{flag} {key}=...: {key} is set by --f-tol/--f-max-iter (forward) and --b-tol/--b-max-iter "
                "(backward)"
                if key in ("tol", "max_iter")
                else f"{flag} {key}=...: not a training option"
            )
        if key == "early_exit" and flag == "--backward-option":
            raise ValueError(f"{flag} early_exit=...: only the forward solve can exit early")
        options[key] = _option_value(value)
    return options


def model_config(options: dict) -> ModelConfig:
    """The ModelConfig of MODEL_OPTIONS-style options (missing ones take MODEL_OPTIONS' defaults).
    Raises ValueError naming the command-line option at fault."""
    o = {**MODEL_OPTIONS, **options}
    forward = _lookup_flag(o["solver"], "--solver")
    backward = _lookup_flag(o["backward_solver"] or o["solver"], "--backward-solver")
    own = _solver_options(o["solver_option"], "--solver-option")
    backward_own = _solver_options(o["backward_option"], "--backward-option")
    if backward is forward:  # the same solver backward: the forward's own options, then any of its own
        backward_own = {**{k: v for k, v in own.items() if k != "early_exit"}, **backward_own}
    # the solvers' own defaults are written out, so that the model config states every option
    solver_kwargs = {**forward.own_defaults, "tol": o["f_tol"], "max_iter": o["f_max_iter"], **own}
    backward_kwargs = {**backward.own_defaults, "tol": o["b_tol"], "max_iter": o["b_max_iter"],
                       **backward_own}  # fmt: skip
    forward.check(solver_kwargs, "--solver-option/--f-tol/--f-max-iter")
    backward.check(backward_kwargs, "--backward-option/--b-tol/--b-max-iter")
    return ModelConfig(
        arch=o["arch"], n_channels=o["n_channels"], n_inner_channels=o["n_inner_channels"],
        n_groups=o["n_groups"], init_std=o["init_std"], solver=forward.name, solver_kwargs=solver_kwargs,
        backward=o["backward"], backward_solver=o["backward_solver"] or None, backward_kwargs=backward_kwargs,
        phantom_steps=o["phantom_steps"],
    )  # fmt: skip


def _lookup_flag(name: str, flag: str):
    try:
        return lookup(name)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def config_from_options(options: dict) -> TrainConfig:
    """A TrainConfig from flat options (a preset merged with command-line options): the
    MODEL_OPTIONS build its model config, the rest are its fields. Unknown keys: ValueError."""
    train_fields = {f.name for f in fields(TrainConfig)} - {"model"}
    unknown = sorted(set(options) - train_fields - set(MODEL_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}")
    model = model_config({k: v for k, v in options.items() if k in MODEL_OPTIONS})
    return TrainConfig(model=model, **{k: v for k, v in options.items() if k in train_fields})


#: One line of --help per option; parse_args adds each option's default (and its choices).
OPTION_HELP = {
    # the model (MODEL_OPTIONS)
    "arch": "the layout around the DEQ cell: a registered architecture (deq.model.ARCHITECTURES)",
    "n_channels": "channels of the equilibrium state z",
    "n_inner_channels": "channels inside the cell (its first convolution)",
    "n_groups": "GroupNorm groups of the cell",
    "init_std": "standard deviation of the cell's initial convolution weights",
    "solver": "forward solver: any registered one",
    "f_tol": "forward solve: stop at this relative residual",
    "f_max_iter": "forward solve: at most this many f-evaluations",
    "solver_option": "a forward solver option of its own, KEY=VALUE, repeatable, e.g. m=6, lam=1e-3, "
    "beta=0.8 for Anderson (its defaults: m=5 lam=1e-4 beta=1); the backward takes them too with the "
    "same solver",
    "backward": "implicit: the exact implicit gradient; phantom: backprop through --phantom-steps "
    "applications of f at z*",
    "backward_solver": "solver of the implicit backward ('' = the forward solver)",
    "b_tol": "backward solve: stop at this relative residual",
    "b_max_iter": "backward solve: at most this many iterations",
    "backward_option": "a backward solver option of its own, KEY=VALUE (as --solver-option), repeatable",
    "phantom_steps": "with --backward phantom: applications of f backpropagated through",
    # data
    "data": "CIFAR-10 as class folders (the JPEG copy unpacked), or where --download puts it",
    "download": "fetch CIFAR-10 with torchvision if --data lacks it (needs a network)",
    "val_images": "hold this many training images out for validation (0: evaluate on the test set)",
    "augment": "random crops (padding 4) and horizontal flips",
    "limit_train": "train on the first N training images only (0: all); for smoke tests",
    "limit_test": "evaluate on the first N held-out images only (0: all); for smoke tests",
    # optimisation
    "epochs": "epochs to train (with --time-budget-s: an upper bound only)",
    "time_budget_s": "train for this many seconds of wall time, the schedule planned over it (0: off)",
    "batch_size": "images per step (per process under torchrun)",
    "lr": "Adam's peak learning rate",
    "min_lr": "the learning rate the cosine schedule ends at",
    "warmup": "fraction of the schedule with a linear learning-rate warm-up",
    "weight_decay": "Adam's L2 weight decay",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "jac_reg": "weight of the Jacobian regulariser ||df/dz||_F^2 / dim (0: off); keeps f contractive",
    "jac_target": "with --jac-reg: penalise only the Jacobian penalty's excess over this value (0: off)",
    "jac_two_sided": "with --jac-target: penalise the distance to the target either way",
    "rho_reg": "weight of a penalty on each image's spectral radius of df/dz at z* outside "
    "[--rho-min, --rho-max] (0: off); sets how fast forward iteration converges",
    "rho_min": "with --rho-reg: the lowest spectral radius not penalised",
    "rho_max": "with --rho-reg: the highest spectral radius not penalised (below 1: f contracts)",
    "rho_iters": "power iterations (vector-Jacobian products) of the spectral-radius estimate",
    # evaluation
    "test_flip": "evaluate on each image and its mirror, averaging the logits",
    "bn_recalibrate": "recompute BatchNorm statistics on this many training images before each "
    "evaluation (0: off)",
    # the machine
    "amp": "bf16 autocast on CUDA (the solver's own arithmetic stays float32)",
    "channels_last": "channels-last memory format (faster convolutions on GPUs)",
    "compile": "torch.compile the cell (not with --jac-reg or --rho-reg: no double backward)",
    "seed": "random seed (initialisation, shuffling, augmentation)",
    "device": "auto, cpu, cuda or cuda:N",
    "progress": "a progress bar per epoch",
    # the output
    "out": "the run's directory: checkpoint, card (config.json), train_log.jsonl",
    "resume": "continue the run in --out from its last finished epoch",
    "overwrite": "replace what --out holds (never done silently)",
    "init_from": "start from this checkpoint's weights (a fine-tune; its architecture must match)",
}


#: Presets that continue a trained model: they need --init-from.
FINE_TUNE_PRESETS = ("cpu-rho",)

#: What each preset is for, in --help.
PRESET_PURPOSE = {
    "seed": "the reference recipe: 50 epochs of Adam, Anderson, implicit backward (the defaults)",
    "fast": "the seed architecture on one GPU in a 270 s budget",
    "large": "one wider DEQ cell at 16x16 on one GPU in a 400 s budget",
    "cpu": "the large layout at 64/128 channels in 1.5 hours of a 2-core CPU",
    "cpu-rho": "fine-tune (--init-from) for 1 hour, pushing the spectral radius of df/dz into [0.78, 0.88]; "
    "checkpoints/cpu's last stage",
}


def presets_epilog() -> str:
    """--help's list of the presets: what each is for and the options it sets."""

    def flag(key: str, value: object) -> str:
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            return name if value else "--no-" + name[2:]
        return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"

    lines = ["presets (explicit options override what they set):"]
    for name, values in PRESETS.items():
        lines.append(f"  {name}: {PRESET_PURPOSE[name]}")
        line = "     "
        for unit in (flag(k, v) for k, v in values.items()):  # a flag and its value stay on one line
            if len(line) + 1 + len(unit) > 96:
                lines.append(line)
                line = "     "
            line += " " + unit
        if values:
            lines.append(line)
    return "\n".join(lines)


def _choices(option: str) -> list[str] | None:
    """The values an option takes, where they are few; solvers and architectures as registered
    when asked."""
    choices = {"solver": sorted(SOLVERS), "backward_solver": ["", *sorted(SOLVERS)],
               "backward": list(BACKWARD_MODES), "arch": sorted(ARCHITECTURES)}  # fmt: skip
    return choices.get(option)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=presets_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a named recipe (listed below); explicit options override it")  # fmt: skip
    defaults = {**MODEL_OPTIONS, **{f.name: f.default for f in fields(TrainConfig) if f.name != "model"}}
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{OPTION_HELP[name]} (default: {default})")  # fmt: skip
        elif isinstance(default, tuple):
            parser.add_argument(flag, action="append", default=None, metavar="KEY=VALUE",
                                help=OPTION_HELP[name])  # fmt: skip
        else:
            choices = _choices(name)
            among = f"; one of {', '.join(repr(c) for c in choices)}" if choices else ""
            parser.add_argument(flag, type=type(default), default=None, metavar=name.upper(), choices=choices,
                                help=f"{OPTION_HELP[name]} (default: {default!r}{among})")  # fmt: skip
    if argv is None:
        argv = sys.argv[1:]
    for old in ("--m", "--lam"):  # the Anderson flags of earlier versions
        if any(a == old or a.startswith(old + "=") for a in argv):
            parser.error(f"{old} is now --solver-option {old[2:]}=VALUE (--backward-option for the backward)")
    args = parser.parse_args(argv)  # unknown options: argparse exits with an error
    values = dict(PRESETS[args.preset]) if args.preset else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "preset"})
    try:
        cfg = config_from_options(values)  # ModelConfig validates the model and solver options
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not (cfg.time_budget_s >= 0 and math.isfinite(cfg.time_budget_s)):
        parser.error("--time-budget-s must be a finite number >= 0")
    for name in ("val_images", "bn_recalibrate", "limit_train", "limit_test"):
        if getattr(cfg, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if not 0 <= cfg.warmup < 1:
        parser.error("--warmup must be in [0, 1)")
    if not (cfg.jac_reg >= 0 and cfg.jac_target >= 0 and math.isfinite(cfg.jac_reg + cfg.jac_target)):
        parser.error("--jac-reg and --jac-target must be finite numbers >= 0")
    if not (cfg.rho_reg >= 0 and math.isfinite(cfg.rho_reg)):
        parser.error("--rho-reg must be a finite number >= 0")
    if not (0 <= cfg.rho_min <= cfg.rho_max and math.isfinite(cfg.rho_min)):
        parser.error(
            f"--rho-min and --rho-max must satisfy 0 <= min <= max, got {cfg.rho_min} and {cfg.rho_max}"
        )
    if cfg.rho_iters < 1:
        parser.error("--rho-iters must be >= 1")
    if cfg.rho_reg > 0 and cfg.rho_min == 0 and not math.isfinite(cfg.rho_max):
        parser.error(
            "--rho-reg needs a band to push the spectral radius into: a finite --rho-max or --rho-min > 0"
        )
    if cfg.compile and (cfg.jac_reg > 0 or cfg.rho_reg > 0):
        parser.error("--compile cannot be used with --jac-reg or --rho-reg: they differentiate twice")
    if cfg.compile and cfg.model.solver_kwargs.get("early_exit"):
        parser.error("--compile cannot be used with --solver-option early_exit=true: a batch that narrows "
                     "as samples converge would recompile the cell for every size")  # fmt: skip
    if args.preset in FINE_TUNE_PRESETS and not cfg.init_from:
        parser.error(f"--preset {args.preset} fine-tunes a trained model: give --init-from CHECKPOINT")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {cfg.device}: no CUDA GPU is available here (use --device cpu or auto)")
    if cfg.resume and cfg.overwrite:
        parser.error("--resume and --overwrite contradict each other: continue the run or replace it")
    return cfg, args.preset


# ----------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Process:
    """Where this process trains: its device and its place in a (possibly distributed) run."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:  # rank 0 logs and writes the checkpoint
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> Process:
    """This process's Process; under torchrun, joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device.startswith("cuda")
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    return Process(device, rank, world)


def load_data(cfg: TrainConfig, proc: Process):
    """((train images, labels), (evaluation images, labels)) on the device: the evaluation set is
    the validation split held out of the training set when ``val_images``, else the test set."""
    if proc.main:  # rank 0 decodes and caches first; the others then read the cache
        train = load_cifar10(cfg.data, "train", download=cfg.download)
    if proc.world > 1:
        dist.barrier()
    if not proc.main:
        train = load_cifar10(cfg.data, "train")
    if cfg.val_images:  # held out before --limit-train, so the validation set never changes
        if cfg.val_images >= len(train[1]):
            raise ValueError(f"--val-images {cfg.val_images} leaves no training images (of {len(train[1])})")
        train, test = split_validation(*train, cfg.val_images)
    else:
        test = load_cifar10(cfg.data, "test", download=cfg.download and proc.main)
    if cfg.limit_train:  # tiny runs still see every class
        train = random_subset(*train, cfg.limit_train)
    if cfg.limit_test:
        test = random_subset(*test, cfg.limit_test)
    return tuple(t.to(proc.device) for t in train), tuple(t.to(proc.device) for t in test)


def build_model(cfg: TrainConfig, proc: Process) -> tuple[DEQClassifier, torch.nn.Module, dict | None]:
    """(model, the module to train: DDP-wrapped across processes, lineage for the card when
    ``init_from`` gives starting weights)."""
    model = DEQClassifier(cfg.model)
    lineage = None
    if cfg.init_from:  # weights only: same architecture, any solver/backward settings
        init = load_model(cfg.init_from)
        try:
            model.load_state_dict(init.state_dict())
        except RuntimeError as err:
            raise ValueError(
                f"--init-from {cfg.init_from} does not fit this run's architecture: {err}"
            ) from None
        lineage = {"checkpoint": cfg.init_from, "card": init.card}
    model = model.to(proc.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.deq.f.forward = torch.compile(model.deq.f.forward)  # keeps state-dict keys
        # a batch narrowing as samples converge would recompile the cell for every new size
        model.deq.early_exit = False
    net = torch.nn.parallel.DistributedDataParallel(model) if proc.world > 1 else model
    return model, net, lineage


def git_commit() -> str:
    """HEAD, with "+dirty" when tracked files differ from it (the card must not overstate)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD") or "unknown"
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except OSError:
        return "unknown"


#: Options that may differ when a run is resumed: where things are and how it is watched, not
#: what is trained. Any other difference is refused (the card would misrecord the run).
RESUMABLE_CHANGES = {"data", "out", "download", "device", "resume", "overwrite", "progress"}


def check_out_dir(cfg: TrainConfig, out: Path) -> dict | None:
    """What --out holds, checked against --resume/--overwrite. Returns the saved training state
    to continue (with --resume), else None; a new run never silently replaces an old one."""
    holds_run = any((out / name).exists() for name in (CONFIG_NAME, LOG_NAME, STATE_NAME + ".json"))
    if not cfg.resume:
        if holds_run and not cfg.overwrite:
            raise ValueError(
                f"--out {out} already holds a training run: pass --resume to continue it or "
                "--overwrite to replace it (or choose another --out)"
            )
        return None
    if not (out / (STATE_NAME + ".json")).is_file():
        raise ValueError(
            f"--resume: {out} holds no saved training state ({STATE_NAME}.json); nothing to continue"
        )
    state = load_state(out / STATE_NAME)
    if "step" not in state:
        raise ValueError(
            f"{out}/{STATE_NAME} was written by an older train.py (no step count); "
            "it cannot be resumed: start a new run"
        )
    saved = state.get("config")
    if saved is None:  # states from before the config was stored in them: the card has it
        saved = read_config(out)["card"].get("train_config", {})
    differences = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
        for k, v in dataclasses.asdict(cfg).items()
        if k not in RESUMABLE_CHANGES and k != "model" and k in saved and saved[k] != v
    ]
    # the model as the run saved it (every version of train.py writes it into config.json)
    saved_model, model = _stated(read_config(out)["model"]), _stated(cfg.model.to_dict())
    differences += [
        f"{MODEL_FLAGS.get(k, '--' + k.replace('_', '-'))} {saved_model.get(k)!r} -> {v!r}"
        for k, v in model.items()
        if saved_model.get(k) != v
    ]
    if differences:
        raise ValueError(
            f"--resume: these options differ from the saved run in {out}: {'; '.join(differences)}. "
            "Resume with the run's own options, or start a new run"
        )
    return state


#: The command-line options behind ModelConfig fields whose names differ.
MODEL_FLAGS = {
    "solver_kwargs": "--solver-option/--f-tol/--f-max-iter",
    "backward_kwargs": "--backward-option/--b-tol/--b-max-iter",
}


def _stated(model: dict) -> dict:
    """A model config dict with every solver option stated (defaults filled in, the backward's
    solver and options spelled out), so equal settings compare equal however they were written."""
    model = dict(model)
    solver = model.get("solver", "anderson")
    model["backward_solver"] = model.get("backward_solver") or solver
    if model.get("backward_kwargs") is None:
        model["backward_kwargs"] = model.get("solver_kwargs", {})
    for key, name in (("solver_kwargs", solver), ("backward_kwargs", model["backward_solver"])):
        if name in SOLVERS:
            model[key] = {**SOLVERS[name].own_defaults, **model.get(key, {})}
    return model


# ----------------------------------------------------------------------------- train / eval


class Schedule:
    """The learning rate along training: linear warm-up over the first ``warmup`` of it, then
    cosine down to ``min_lr``. Progress is the fraction of the optimizer steps done; with a time
    budget, the larger of that and the fraction of the time spent (``--epochs`` stays a cap), so
    a run stopped by its budget has finished its schedule."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int):
        self.cfg = cfg
        self.step = 0  # optimizer steps taken
        self.total_steps = cfg.epochs * steps_per_epoch
        self.deadline = cfg.time_budget_s  # the budget less a reserve for the last evaluation

    def progress(self, elapsed: float) -> float:
        """Of the schedule, after ``self.step`` optimizer steps and ``elapsed`` seconds."""
        by_steps = self.step / self.total_steps
        if self.cfg.time_budget_s > 0:
            return min(1.0, max(elapsed / self.deadline, by_steps))
        return min(1.0, by_steps)

    def lr(self, progress: float) -> float:
        cfg = self.cfg
        if progress < cfg.warmup:
            return max(cfg.min_lr, cfg.lr * progress / cfg.warmup)
        t = (progress - cfg.warmup) / (1 - cfg.warmup)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def shared_clock(seconds: float, proc: Process) -> float:
    """The largest of the ranks' clocks, so every rank takes the same lr and stops together."""
    if proc.world == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=proc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def training_loss(model, x, y, cfg: TrainConfig, device_type: str):
    """(logits, DEQInfo, cross-entropy, loss to minimise) of one batch: the cross-entropy plus
    ``cfg.jac_reg`` times the Jacobian penalty (with ``cfg.jac_target``, only its excess over the
    target: the cell may be as far from contractive as the target, no more; with
    ``cfg.jac_two_sided``, its distance to the target either way), plus ``cfg.rho_reg`` times the
    mean distance of each image's spectral radius of df/dz at z* from the band [``cfg.rho_min``,
    ``cfg.rho_max``], under bf16 autocast when ``cfg.amp``."""
    with torch.autocast(device_type, torch.bfloat16, enabled=cfg.amp):
        logits, info = model(
            x,
            return_info=True,
            jacobian_penalty=cfg.jac_reg > 0,
            spectral_radius_iters=cfg.rho_iters if cfg.rho_reg > 0 else 0,
        )
        ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        loss = ce
        if info.jacobian_penalty is not None:
            penalty = info.jacobian_penalty
            if cfg.jac_target > 0:
                penalty = penalty - cfg.jac_target
                penalty = penalty.abs() if cfg.jac_two_sided else torch.relu(penalty)
            loss = loss + cfg.jac_reg * penalty
        if info.spectral_radius is not None:
            rho = info.spectral_radius
            outside = torch.relu(rho - cfg.rho_max) + torch.relu(cfg.rho_min - rho)
            loss = loss + cfg.rho_reg * outside.mean()
    return logits, info, ce, loss


@dataclass
class Run:
    """A training run in progress: what ``run_epoch`` advances and the checkpoint records."""

    cfg: TrainConfig
    proc: Process
    model: DEQClassifier
    net: torch.nn.Module  # what the steps go through (DDP across processes)
    opt: torch.optim.Optimizer
    schedule: Schedule
    elapsed: float = 0.0  # seconds of training and evaluation so far (resumed runs included)
    log: list[EpochRecord] = field(default_factory=list)


def run_epoch(run: Run, data, epoch: int, clock) -> dict:
    """One pass over the training data, or up to the end of the schedule (``sums["done"]``);
    ``clock()`` is the run's elapsed seconds. Returns sums over this rank's samples."""
    cfg, proc, opt, schedule = run.cfg, run.proc, run.opt, run.schedule
    run.net.train()
    gen = torch.Generator(device=proc.device).manual_seed(cfg.seed * 1000 + epoch)
    steps = math.ceil(len(data[1]) / proc.world / cfg.batch_size)
    sums = dict.fromkeys(("loss", "correct", "n", "f_res", "f_evals", "b_res", "b_evals", "jac", "rho"), 0.0)
    done = False
    progress = cfg.progress and proc.main
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
    for x, y in batches(*data, cfg.batch_size, shuffle=True, generator=gen, augment_data=cfg.augment,
                        rank=proc.rank, world_size=proc.world):  # fmt: skip
        step_progress = schedule.progress(shared_clock(clock(), proc))
        if step_progress >= 1.0:
            done = True
            break
        for group in opt.param_groups:
            group["lr"] = schedule.lr(step_progress)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits, info, ce, loss = training_loss(run.net, x, y, cfg, proc.device.type)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step += 1
        loss_value = loss.item()  # one sync per step: also the non-finite check
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"non-finite training loss ({loss_value}) at epoch {epoch + 1}; "
                "stopping (the last checkpoint is from the last finished epoch)"
            )
        b = len(y)
        sums["loss"] += ce.item() * b  # the logged train loss is the cross-entropy alone
        sums["correct"] += int((logits.argmax(1) == y).sum())
        sums["n"] += b
        sums["f_res"] += info.forward.residual * b
        sums["f_evals"] += info.forward.n_evals * b
        if info.jacobian_penalty is not None:
            sums["jac"] += info.jacobian_penalty.item() * b
        if info.spectral_radius is not None:
            sums["rho"] += info.spectral_radius.sum().item()
        if info.backward is not None:
            sums["b_res"] += info.backward.residual * b
            sums["b_evals"] += info.backward.n_evals * b
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{sums['correct'] / sums['n']:.3f}",
                        f_res=f"{info.forward.residual:.1e}", f_it=info.forward.n_evals,
                        b_it=info.backward.n_evals if info.backward else "-")  # fmt: skip
    bar.close()
    sums = reduce_sums(sums, proc)
    sums["done"] = done or schedule.progress(shared_clock(clock(), proc)) >= 1.0
    return sums


def recalibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Set every BatchNorm's running mean/variance to the average of its batch statistics over
    ``images`` (uint8 (N, 3, 32, 32), unaugmented) under the current weights, replacing the
    running averages, which lag behind weights that move fast. Evaluations use these."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for x, _ in batches(images, None, batch_size):
            model(x)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def reduce_sums(sums: dict, proc: Process) -> dict:
    """Sums over every rank's samples."""
    if proc.world == 1:
        return sums
    t = torch.tensor([float(v) for v in sums.values()], dtype=torch.float64, device=proc.device)
    dist.all_reduce(t)
    return dict(zip(sums, t.tolist(), strict=True))


def evaluate_epoch(run: Run, train_data, eval_data) -> dict:
    """Evaluate on the held-out set (BatchNorm statistics recomputed first if asked); keeps the
    evaluation's time in reserve in the schedule, so the final one fits in the budget too."""
    cfg, model = run.cfg, run.model
    t0 = time.perf_counter()
    if cfg.bn_recalibrate:
        images, _ = random_subset(*train_data, cfg.bn_recalibrate, seed=cfg.seed)
        recalibrate_batchnorm(model, images, max(cfg.batch_size, 100))
    sums = evaluate(model, *eval_data, batch_size=max(cfg.batch_size, 100), amp=cfg.amp, flip=cfg.test_flip)
    eval_time = shared_clock(time.perf_counter() - t0, run.proc)  # the slowest rank's: one schedule for all
    run.schedule.deadline = max(cfg.time_budget_s - eval_time, 0.5 * cfg.time_budget_s)
    return sums


def epoch_record(run: Run, tr: dict, te: dict, epoch: int, epoch_time: float, train_time: float,
                 images_per_epoch: int) -> EpochRecord:  # fmt: skip
    """The log record of an epoch from the training sums ``tr`` and evaluation sums ``te``."""
    n, backward = tr["n"], tr["b_evals"] > 0
    return EpochRecord(
        epoch=round(epoch + min(1.0, n / images_per_epoch), 3),
        train_loss=tr["loss"] / n,
        train_error=1 - tr["correct"] / n,
        eval_split="val" if run.cfg.val_images else "test",
        eval_loss=te["loss"] / te["n"],
        eval_error=1 - te["correct"] / te["n"],
        forward_residual=tr["f_res"] / n,
        forward_iters=tr["f_evals"] / n,
        backward_residual=tr["b_res"] / n if backward else None,
        backward_iters=tr["b_evals"] / n if backward else None,
        jacobian_penalty=tr["jac"] / n if run.cfg.jac_reg > 0 else None,
        spectral_radius=tr["rho"] / n if run.cfg.rho_reg > 0 else None,
        eval_forward_residual=te["f_res"] / te["n"],
        eval_forward_iters=te["f_evals"] / te["n"],
        lr=run.opt.param_groups[0]["lr"],
        steps=run.schedule.step,
        epoch_time_s=epoch_time,
        train_images_per_s=n / train_time,
        elapsed_s=run.elapsed,
    )


def save_run(run: Run, out: Path, card_base: dict, epoch: int, finished: bool) -> None:
    """Checkpoint, log and resume state after an epoch (rank 0 only)."""
    record = run.log[-1]
    card = {**card_base, "epochs": record.epoch, f"{record.eval_split}_accuracy": 1 - record.eval_error,
            "train_wall_time_s": run.elapsed, "finished": finished}  # fmt: skip
    save_checkpoint(run.model, out, card)
    write_log(out, run.log)
    save_state(out / STATE_NAME, {
        "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "rng": torch.get_rng_state(),
        "epoch": epoch + 1, "elapsed": run.elapsed, "step": run.schedule.step,
        "config": dataclasses.asdict(run.cfg),
    })  # fmt: skip


def card_facts(cfg: TrainConfig, preset: str | None, proc: Process, model, train_data, eval_data,
               argv: list[str] | None, lineage: dict | None) -> dict:  # fmt: skip
    """What every checkpoint of the run says about how it was made."""
    split = "val" if cfg.val_images else "test"
    facts = {
        "dataset": describe_source(cfg.data),
        "train_images": len(train_data[1]),
        f"{split}_images": len(eval_data[1]),
        "device": device_label(proc.device) + (f" x{proc.world}" if proc.world > 1 else ""),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "command": " ".join(
            shlex.quote(a) for a in ["python", "train.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "preset": preset,
        "train_config": dataclasses.asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if lineage:  # the lineage of a fine-tuned model
        facts["init_from"] = lineage
    return facts


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Train as the command line says; returns the last epoch's log record ({} if none ran)."""
    cfg, preset = parse_args(argv)
    proc = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    state = check_out_dir(cfg, out)  # before the slow data loading: a refused run fails fast
    if state is not None and read_config(out)["card"].get("finished"):
        print(f"{out} holds a finished run: nothing to resume")
        return {}
    train_data, eval_data = load_data(cfg, proc)
    model, net, lineage = build_model(cfg, proc)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = Schedule(cfg, steps_per_epoch=math.ceil(len(train_data[1]) / proc.world / cfg.batch_size))
    run = Run(cfg, proc, model, net, opt, schedule)
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_epoch, run.elapsed, schedule.step = state["epoch"], state["elapsed"], state["step"]
        run.log = read_log(out)[:start_epoch]
        if proc.main:
            print(f"resumed from {out} at epoch {start_epoch}")
    card_base = card_facts(cfg, preset, proc, model, train_data, eval_data, argv, lineage)

    result: dict = {}  # the last record of this invocation
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        clock = functools.partial(lambda start, t0: start + time.perf_counter() - t0, run.elapsed, t0)
        tr = run_epoch(run, train_data, epoch, clock)
        if not tr["n"]:  # the budget ran out at the end of the last epoch: that one finished the run
            if not run.log:
                raise ValueError(f"--time-budget-s {cfg.time_budget_s:g} is too short for one training step")
            if proc.main:
                update_card(out, finished=True)
            break
        train_time = time.perf_counter() - t0
        te = evaluate_epoch(run, train_data, eval_data)
        run.elapsed += time.perf_counter() - t0
        record = epoch_record(run, tr, te, epoch, time.perf_counter() - t0, train_time, len(train_data[1]))
        run.log.append(record)
        result = record.to_json()
        finished = tr["done"] or epoch + 1 == cfg.epochs
        if proc.main:
            print(json.dumps(record.to_json()))
            save_run(run, out, card_base, epoch, finished)
        if finished:
            break
    if proc.world > 1:
        dist.barrier()  # leave together: a rank tearing gloo down while rank 0 still writes can abort
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, FloatingPointError) as err:
        sys.exit(f"error: {err}")
