"""train.py end to end on tiny made-up data: checkpoint, resume, DDP (gloo), errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data import make_cifar_folder

import train
from deq.checkpoint import LOG_NAME, WEIGHTS_NAME, load_model
from deq.data import batches, load_cifar10

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--batch-size", "25", "--f-max-iter", "5", "--b-max-iter", "5", "--no-progress"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_cifar_folder(tmp_path_factory.mktemp("cifar"), per_class=10, test_per_class=3)


def run(data_dir, out, *extra):
    return train.main(["--data", str(data_dir), "--out", str(out), *TINY, *extra])


def test_end_to_end_checkpoint_loads_and_matches_its_card(data_dir, tmp_path):
    record = run(data_dir, tmp_path / "run")
    model = load_model(tmp_path / "run")
    card = model.card
    assert card["epochs"] == 2 and card["finished"] and card["dataset"] == "CIFAR-10 (class-folder copy)"
    assert card["parameters"] == 64_842 and card["train_config"]["batch_size"] == 25
    assert {"device", "torch", "git_commit", "command", "train_wall_time_s"} <= set(card)
    # the saved weights are the evaluated ones: recompute the test accuracy from the checkpoint
    images, labels = load_cifar10(data_dir, "test")
    with torch.inference_mode():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches(images, labels, 100))
    assert (
        correct / len(labels)
        == pytest.approx(card["test_accuracy"])
        == pytest.approx(1 - record["test_error"])
    )
    log = [json.loads(line) for line in (tmp_path / "run" / LOG_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(
        r["backward_iters"] > 0 and r["forward_iters"] > 0 and r["train_images_per_s"] > 0 for r in log
    )


def die_on_call(n: int, fn):
    """``fn``, except that its n-th call raises KeyboardInterrupt (a run killed there)."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapper


def test_resume_after_interruption_ends_where_an_uninterrupted_run_ends(data_dir, tmp_path, monkeypatch):
    run(data_dir, tmp_path / "full", "--backward", "phantom")
    real_evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", die_on_call(2, real_evaluate))  # killed during epoch 2
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, tmp_path / "cut", "--backward", "phantom")
    assert load_model(tmp_path / "cut").card["epochs"] == 1
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    run(data_dir, tmp_path / "cut", "--backward", "phantom", "--resume")
    full, cut = (load_file(str(tmp_path / d / WEIGHTS_NAME)) for d in ("full", "cut"))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    logs = [
        [json.loads(x) for x in (tmp_path / d / LOG_NAME).read_text().splitlines()] for d in ("full", "cut")
    ]
    assert [r["test_error"] for r in logs[0]] == [r["test_error"] for r in logs[1]]


def test_a_run_is_never_silently_replaced_or_misrecorded(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(data_dir, out, "--epochs", "1")
    weights = (out / WEIGHTS_NAME).read_bytes()
    with pytest.raises(ValueError, match="already holds a training run: pass --resume .* or --overwrite"):
        run(data_dir, out, "--epochs", "1")
    assert (out / WEIGHTS_NAME).read_bytes() == weights  # refused before anything was written
    with pytest.raises(ValueError, match="holds no saved training state"):
        run(data_dir, tmp_path / "empty", "--resume")
    with pytest.raises(ValueError, match=r"differ from the saved run.*--epochs 1 -> 2; --lr 0.001 -> 0.5\."):
        run(data_dir, out, "--epochs", "2", "--lr", "0.5", "--resume")
    with pytest.raises(ValueError, match=r"differ from the saved run.*--solver 'anderson' -> 'broyden'"):
        run(data_dir, out, "--epochs", "1", "--solver", "broyden", "--resume")
    with pytest.raises(
        ValueError, match=r"--solver-option/--f-tol/--f-max-iter \{.*'m': 5.*\} -> \{.*'m': 3"
    ):  # noqa: E501
        run(data_dir, out, "--epochs", "1", "--solver-option", "m=3", "--resume")
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", "--overwrite"])
    # where things are and how the run is watched may change; the finished run stays finished
    assert run(data_dir, out, "--epochs", "1", "--resume", "--progress") == {}
    assert (out / WEIGHTS_NAME).read_bytes() == weights
    run(data_dir, out, "--epochs", "1", "--overwrite", "--seed", "1")
    assert load_model(out).card["train_config"]["seed"] == 1


def test_a_run_saved_by_an_older_train_py_is_checked_against_its_model_too(data_dir, tmp_path):
    from deq.checkpoint import STATE_NAME, load_state, save_state

    out = tmp_path / "old"
    run(data_dir, out, "--epochs", "2", "--time-budget-s", "0")
    state = load_state(out / STATE_NAME)
    flat = {k: v for k, v in state["config"].items() if k != "model"}  # the flat config train.py once saved
    flat.update({"m": 5, "lam": 1e-4, "f_tol": 1e-2, "f_max_iter": 5, "b_tol": 1e-2, "b_max_iter": 5})
    save_state(out / STATE_NAME, {**state, "config": flat, "epoch": 1, "step": state["step"] // 2})
    train.update_card(out, finished=False)
    with pytest.raises(ValueError, match=r"--solver 'anderson' -> 'broyden'"):
        run(data_dir, out, "--solver", "broyden", "--resume")
    assert run(data_dir, out, "--resume")["epoch"] == 2  # the same model options: it continues


def test_the_training_log_is_written_atomically_and_a_damaged_one_is_named(data_dir, tmp_path, monkeypatch):
    from pathlib import Path

    from deq.checkpoint import EpochRecord, read_log, write_log

    first = EpochRecord(
        epoch=1, train_loss=2.0, train_error=0.5, eval_split="val", eval_loss=2.1, eval_error=0.6
    )
    write_log(tmp_path, [first])
    real_write_text = Path.write_text

    def write_half_then_die(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_log(tmp_path, [first, EpochRecord(**{**first.__dict__, "epoch": 2})])
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert read_log(tmp_path) == [first] and [p.name for p in tmp_path.iterdir()] == [LOG_NAME]

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # killed in its second epoch's evaluation: resumable
        monkeypatch.setattr(train, "evaluate", die_on_call(2, train.evaluate))
        run(data_dir, out, "--epochs", "2")
    monkeypatch.undo()
    line_one = (out / LOG_NAME).read_text().splitlines()[0]
    (out / LOG_NAME).write_text(line_one + '\n{"epoch": 2, "trunc')
    with pytest.raises(ValueError, match=r"train_log.jsonl line 2: .*the training log is damaged"):
        run(data_dir, out, "--epochs", "2", "--resume")
    (out / LOG_NAME).write_text(line_one.replace('"lr"', '"learning_rate"') + "\n")
    with pytest.raises(ValueError, match=r"line 1: unknown field 'learning_rate'"):
        read_log(out)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real_ce, calls = train.F.cross_entropy, {"n": 0}

    def ce_goes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 6 else loss  # 4 train steps + 1 eval batch per epoch

    monkeypatch.setattr(train.F, "cross_entropy", ce_goes_nan)
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        run(data_dir, tmp_path / "nan")
    model = load_model(tmp_path / "nan")
    assert model.card["epochs"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--learning-rate", "1"], "unrecognized arguments"),
        (["--backward", "exact"], "argument --backward: invalid choice"),
        (["--solver-option", "m=0"], "--solver-option/--f-tol/--f-max-iter: m must be an integer >= 1"),
        (["--m", "6"], "--m is now --solver-option m=VALUE"),
        (["--lam=1e-3"], "--lam is now --solver-option lam=VALUE"),
        (["--solver-option", "tol=1e-3"], "tol is set by --f-tol/--f-max-iter"),
        (["--solver", "forward", "--solver-option", "m=3"], "unknown option(s) ['m'] for solver 'forward'"),
        (["--backward-solver", "broyden", "--backward-option", "m=3"], "--backward-option/--b-tol"),
        (["--solver-option", "depth=3"], "unknown option(s) ['depth'] for solver 'anderson'"),
        (["--solver-option", "m"], "--solver-option takes KEY=VALUE"),
        (["--solver", "newton"], "invalid choice: 'newton'"),
        (["--backward-solver", "newton"], "invalid choice: 'newton'"),
        (["--preset", "turbo"], "invalid choice"),
        (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--limit-train", "-5"], "--limit-train must be >= 0"),
        (["--bn-recalibrate", "-1"], "--bn-recalibrate must be >= 0"),
    ],
)
def test_bad_options_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cuda"])
    assert "no CUDA GPU is available here" in capsys.readouterr().err


def test_presets_and_overrides():
    cfg, preset = train.parse_args(["--preset", "fast", "--epochs", "3"])
    assert preset == "fast" and cfg.epochs == 3 and cfg.model.backward == "implicit" and cfg.augment
    assert (cfg.time_budget_s, cfg.val_images, cfg.jac_reg, cfg.amp) == (270, 5000, 3.0, False)
    assert cfg.model.solver_kwargs["max_iter"] == 20 and cfg.model.backward_kwargs["max_iter"] == 12
    seed, _ = train.parse_args(["--preset", "seed"])
    assert (seed.lr, seed.min_lr, seed.batch_size, seed.epochs, seed.augment) == (1e-3, 1e-6, 100, 50, False)
    assert seed.model.solver_kwargs == {"m": 5, "lam": 1e-4, "beta": 1.0, "tol": 1e-2, "max_iter": 25}
    assert seed.model.backward_kwargs == seed.model.solver_kwargs and seed.model.backward_solver is None
    # a solver's own options; backward, the same solver takes the same ones unless told otherwise
    tuned, _ = train.parse_args(["--solver-option", "m=3", "--solver-option", "beta=0.5"])
    assert tuned.model.solver_kwargs["m"] == tuned.model.backward_kwargs["m"] == 3
    both, _ = train.parse_args(["--solver-option", "m=3", "--backward-option", "lam=0.001"])
    assert both.model.backward_kwargs == {"m": 3, "lam": 0.001, "beta": 1.0, "tol": 1e-2, "max_iter": 25}
    mixed, _ = train.parse_args(
        ["--backward-solver", "forward", "--b-max-iter", "7", "--solver-option", "m=3"]
    )
    assert mixed.model.backward_kwargs == {"tol": 1e-2, "max_iter": 7} and mixed.model.solver_kwargs["m"] == 3
    assert train.DEQClassifier(mixed.model).deq.backward_solver == "forward"


def test_train_config_composes_the_model_config():
    cfg, _ = train.parse_args(["--preset", "cpu"])
    assert isinstance(cfg.model, train.ModelConfig)
    model_fields = {f.name for f in train.fields(train.ModelConfig)}
    assert not model_fields & {f.name for f in train.fields(train.TrainConfig)}  # no field declared twice
    with pytest.raises(ValueError, match="unknown option"):
        train.config_from_options({"depth": 3})


def test_cpu_preset_fits_the_cpu_model_targets():
    cfg, _ = train.parse_args(["--preset", "cpu"])
    model = train.DEQClassifier(cfg.model)
    assert cfg.model.arch == "large" and sum(p.numel() for p in model.parameters()) <= 300_000
    assert (cfg.jac_reg, cfg.bn_recalibrate, cfg.val_images, cfg.amp) == (2.0, 2000, 5000, False)
    assert cfg.time_budget_s <= 3 * 3600


def test_jacobian_target_penalises_only_the_excess():
    torch.manual_seed(0)
    model = train.DEQClassifier(train.ModelConfig(n_channels=16, n_inner_channels=16, n_groups=4))
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    cfg, _ = train.parse_args(["--jac-reg", "2"])
    torch.manual_seed(1)
    _, info, ce, plain = train.training_loss(model, x, y, cfg, "cpu")
    jac = float(info.jacobian_penalty)
    assert float(plain) == pytest.approx(float(ce) + 2 * jac, rel=1e-5)
    for target, expected in ((jac / 2, jac / 2), (jac * 2, 0.0)):  # the same random projection each time
        cfg, _ = train.parse_args(["--jac-reg", "2", "--jac-target", str(target)])
        torch.manual_seed(1)
        _, _, ce, loss = train.training_loss(model, x, y, cfg, "cpu")
        assert float(loss) == pytest.approx(float(ce) + 2 * expected, rel=1e-4, abs=1e-7)
    cfg, _ = train.parse_args(["--jac-reg", "2", "--jac-target", str(jac * 2), "--jac-two-sided"])
    torch.manual_seed(1)
    _, _, ce, loss = train.training_loss(model, x, y, cfg, "cpu")
    assert float(loss) == pytest.approx(float(ce) + 2 * jac, rel=1e-4)  # below the target: pushed up
    with pytest.raises(SystemExit):
        train.parse_args(["--jac-target", "-1"])


def test_batchnorm_recalibration_sets_exact_statistics_and_keeps_momentum():
    torch.manual_seed(0)
    model = train.DEQClassifier(train.ModelConfig(n_channels=16, n_inner_channels=16, n_groups=4))
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    stem_bn = model.stem[1]
    stem_bn.running_mean.fill_(5.0)  # stale
    train.recalibrate_batchnorm(model, images, batch_size=10)  # equal batches: the exact mean
    with torch.no_grad():
        conv = model.stem[0]((images.float() / 255 - model.mean) / model.std)
    torch.testing.assert_close(stem_bn.running_mean, conv.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert stem_bn.momentum == 0.1 and model.head[0].momentum == 0.1


def test_missing_data_dir_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "error: no CIFAR-10 data at" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_ddp_two_processes_gloo(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "train.py", "--data", str(data_dir), "--out", str(tmp_path / "ddp"),
           *TINY, "--epochs", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"epoch": 1') == 1  # rank 0 alone logs
    model = load_model(tmp_path / "ddp")
    assert model.card["device"].endswith("x2") and model.card["epochs"] == 1
    log = (tmp_path / "ddp" / LOG_NAME).read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["train_images_per_s"] > 0


def test_large_preset_trains_with_test_time_flips(data_dir, tmp_path):
    small = ["--n-channels", "16", "--n-inner-channels", "16", "--no-amp", "--no-channels-last"]
    record = train.main(["--preset", "large", "--data", str(data_dir), "--out", str(tmp_path / "large"),
                         *TINY, "--epochs", "1", "--val-images", "20", "--time-budget-s", "0",
                         *small])  # fmt: skip
    model = load_model(tmp_path / "large")
    assert model.config.arch == "large" and model.card["train_config"]["test_flip"]
    assert 0 <= record["val_error"] <= 1 and "test_error" not in record  # never looks at the test set
    assert (
        record["backward_iters"] > 0 and model.card["val_images"] == 20 and "test_accuracy" not in model.card
    )


def test_schedule_warms_up_then_anneals_over_steps_or_time():
    cfg, _ = train.parse_args(["--lr", "1e-2", "--min-lr", "1e-4", "--warmup", "0.1", "--epochs", "10"])
    schedule = train.Schedule(cfg, steps_per_epoch=10)
    schedule.step = 50
    assert schedule.progress(elapsed=1e6) == 0.5  # epochs mode: steps only
    lrs = [schedule.lr(p / 100) for p in range(101)]
    assert lrs[0] < lrs[5] < lrs[10] == pytest.approx(1e-2)  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] == pytest.approx(1e-4)
    timed, _ = train.parse_args(["--time-budget-s", "60", "--epochs", "10"])
    schedule = train.Schedule(timed, steps_per_epoch=10)
    schedule.step = 1
    assert schedule.progress(elapsed=30.0) == 0.5 and schedule.progress(elapsed=90.0) == 1.0
    schedule.step = 100
    assert schedule.progress(elapsed=1.0) == 1.0  # --epochs still caps a budgeted run


def test_time_budget_ends_the_run_with_its_schedule_finished(data_dir, tmp_path):
    record = run(data_dir, tmp_path / "budget", "--epochs", "1000", "--time-budget-s", "4",
                 "--val-images", "20", "--backward", "phantom")  # fmt: skip
    card = load_model(tmp_path / "budget").card
    assert card["finished"] and card["epochs"] < 1000 and card["epochs"] == record["epoch"]
    assert record["lr"] < 1e-3 * 0.05  # annealed: the budget ran out at the end of the schedule
    assert card["train_wall_time_s"] < 4 + 10  # stops at the budget (slack for one step and the evaluation)
    assert card["val_images"] == 20 and card["train_images"] == 80 and "test_accuracy" not in card


def test_bad_budget_options_are_errors(data_dir, tmp_path):
    for bad in (["--time-budget-s", "-1"], ["--val-images", "-3"], ["--warmup", "1.0"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
    with pytest.raises(ValueError, match="--val-images 100 leaves no training images"):
        run(data_dir, tmp_path / "o", "--val-images", "100")
    with pytest.raises(ValueError, match="too short for one training step"):
        run(data_dir, tmp_path / "o", "--time-budget-s", "1e-9")


def test_help_gives_every_option_a_line_its_default_and_choices_and_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    options = {**train.MODEL_OPTIONS, **{f.name: f.default for f in dataclasses.fields(train.TrainConfig)}}
    del options["model"]
    assert set(train.OPTION_HELP) == set(options)  # one description per option, none stale
    flat = " ".join(text.split())  # argparse wraps lines
    for name, default in options.items():
        if not isinstance(default, tuple):
            assert f"(default: {default!r}" in flat or f"(default: {default})" in flat, name
    assert "one of 'large', 'seed'" in flat and "one of 'anderson', 'broyden', 'forward'" in flat
    for preset in train.PRESETS:
        assert f"  {preset}: {train.PRESET_PURPOSE[preset]}" in text
    assert "--arch large --n-channels 128" in text and "--channels-last" in text


def test_spectral_radius_band_penalises_the_distance_outside_it():
    torch.manual_seed(0)
    model = train.DEQClassifier(train.ModelConfig(n_channels=16, n_inner_channels=16, n_groups=4))
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    cfg, _ = train.parse_args(["--rho-reg", "3", "--rho-iters", "4"])
    torch.manual_seed(1)
    _, info, ce, loss = train.training_loss(model, x, y, cfg, "cpu")
    rho = info.spectral_radius.detach()
    assert rho.shape == (4,)
    assert float(loss.detach()) == pytest.approx(float(ce.detach()))  # inside [0, 1]: free
    lo, hi = float(rho.min()), float(rho.max())
    cases = {  # band -> expected penalty per image
        (hi + 0.1, hi + 0.2): hi + 0.1 - rho,  # all below the band: pushed up
        (0.0, lo / 2): rho - lo / 2,  # all above: pushed down
        (lo, hi): torch.zeros(4),
    }
    for (low, high), expected in cases.items():
        band = ["--rho-min", str(low), "--rho-max", str(high)]
        cfg, _ = train.parse_args(["--rho-reg", "3", "--rho-iters", "4", *band])
        torch.manual_seed(1)  # the same power-iteration start each time
        _, _, ce, loss = train.training_loss(model, x, y, cfg, "cpu")
        expected_loss = float(ce.detach()) + 3 * float(expected.mean())
        assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-4, abs=1e-6)
    loss.backward()
    for bad in (["--rho-min", "0.9", "--rho-max", "0.5"], ["--rho-reg", "-1"], ["--rho-iters", "0"],
                ["--rho-reg", "1", "--rho-max", "inf"], ["--rho-min", "inf", "--rho-max", "inf"],
                ["--rho-reg", "1", "--compile"], ["--preset", "cpu-rho"]):  # fmt: skip
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def test_early_exit_options_of_train_py():
    cfg, _ = train.parse_args(["--solver-option", "early_exit=true"])
    assert cfg.model.solver_kwargs["early_exit"] is True
    assert "early_exit" not in cfg.model.backward_kwargs  # the forward's options, less this one
    for bad in (
        ["--solver-option", "early_exit=true", "--compile"],
        ["--backward-option", "early_exit=true"],
    ):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
