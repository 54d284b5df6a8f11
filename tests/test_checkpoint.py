"""Checkpoints: round trip, strict loading, clear errors; resume state without pickles."""

from __future__ import annotations

import json

import pytest
import torch

from deq import DEQClassifier, ModelConfig
from deq.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_model,
    load_state,
    read_config,
    save_checkpoint,
    save_state,
)
from deq.data import load_cifar10


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = DEQClassifier(ModelConfig(solver_kwargs={"tol": 1e-3, "max_iter": 30, "m": 4})).eval()
    save_checkpoint(model, tmp_path / "ckpt", {"dataset": "test", "test_accuracy": 0.5})
    return model, tmp_path / "ckpt"


def test_round_trip_predicts_the_same(saved):
    model, path = saved
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.config == model.config and loaded.card == {"dataset": "test", "test_accuracy": 0.5}
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left


def test_seed_model_has_spec_parameter_count():
    assert sum(p.numel() for p in DEQClassifier().parameters()) == 64_842
    wide = DEQClassifier(ModelConfig(n_channels=64, n_inner_channels=128))
    assert wide(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_cell_initialisation_follows_spec():
    torch.manual_seed(0)
    cell = DEQClassifier().deq.f
    for conv in (cell.conv1, cell.conv2):
        assert conv.bias is None and abs(conv.weight.std().item() - 0.01) < 1e-3


def test_missing_or_mismatched_weights_are_clear_errors(saved, tmp_path, monkeypatch):
    _, path = saved
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)  # "checkpoints/mine" looks like a Hub id owner/name: it is a path here
    with pytest.raises(FileNotFoundError, match="names a local directory, not a Hub repo"):
        load_model("checkpoints/mine")
    (path / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(path)
    other = DEQClassifier(ModelConfig(n_channels=32, n_inner_channels=64))
    save_checkpoint(other, tmp_path / "other")
    (path / WEIGHTS_NAME).write_bytes((tmp_path / "other" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="does not match the model config"):
        load_model(path)


def test_config_errors(saved):
    _, path = saved
    data = json.loads((path / CONFIG_NAME).read_text())
    data["model"]["n_layers"] = 3
    (path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown key"):
        load_model(path)
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config(path)
    with pytest.raises(ValueError, match="must be a directory"):
        load_model(path / WEIGHTS_NAME)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("n_groups", 0, "n_groups must be an integer in"),
        ("pool_size", 0, "pool_size must be an integer in"),
        ("pool_size", 5, "pool_size=5 must divide image_size=32"),
        ("n_channels", "abc", "n_channels must be an integer in"),
        ("n_channels", -8, "n_channels must be an integer in"),
        ("n_inner_channels", 1048576, "n_inner_channels must be an integer in"),  # refused at once
        ("n_channels", 50, "n_channels=50 must be divisible by n_groups=8"),
        ("init_std", None, "init_std must be a finite number"),
        ("arch", ["seed"], "arch must be one of"),
        ("solver", "newton", "solver must be one of"),
        ("solver_kwargs", {"tol": -1}, "tol must be a positive"),
        ("backward_kwargs", "fast", "backward_kwargs must be a dict or null"),
        ("phantom_steps", 2.5, "phantom_steps must be an integer in"),
    ],
)
def test_every_config_field_is_checked_before_anything_is_built(saved, field, value, message):
    _, path = saved
    data = json.loads((path / CONFIG_NAME).read_text())
    data["model"][field] = value
    (path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_weights_that_are_not_finite_floats_are_refused(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    state = load_file(str(path / WEIGHTS_NAME))
    key = next(k for k in state if k.endswith("conv1.weight"))
    good = state[key].clone()
    for bad, message in ((float("nan"), "non-finite"), (float("inf"), "non-finite")):
        state[key] = good.clone()
        state[key][0, 0, 0, 0] = bad
        save_file(state, str(path / WEIGHTS_NAME))
        with pytest.raises(ValueError, match=f"{key} holds {message}"):
            load_model(path)
    state[key] = good.to(torch.int32)
    save_file(state, str(path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=f"{key} holds torch.int32 values where floats belong"):
        load_model(path)


def test_training_state_round_trip(tmp_path):
    model = DEQClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "epoch": 3, "elapsed": 1.5}
    save_state(tmp_path / "state", state)
    back = load_state(tmp_path / "state")
    assert back["epoch"] == 3 and back["elapsed"] == 1.5 and torch.equal(back["rng"], state["rng"])
    opt2 = torch.optim.Adam(DEQClassifier().parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert not list(tmp_path.glob("*.pt"))  # nothing pickled


def test_large_arch_round_trip(tmp_path):
    config = ModelConfig(arch="large", n_channels=32, n_inner_channels=64, backward="phantom")
    model = DEQClassifier(config).eval()
    x = torch.rand(2, 3, 32, 32)
    assert model.inject(x).shape == (2, 32, 16, 16)  # the equilibrium lives at 16x16
    save_checkpoint(model, tmp_path / "large")
    with torch.inference_mode():
        torch.testing.assert_close(load_model(tmp_path / "large")(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="arch must be one of"):
        DEQClassifier(ModelConfig(arch="huge"))


def test_evaluate_cli_solves_to_the_requested_tolerance(saved, tmp_path, capsys):
    from test_data import make_cifar_folder

    from deq.evaluate import main as evaluate_main

    _, path = saved
    data = make_cifar_folder(tmp_path / "cifar", per_class=1, test_per_class=2)
    evaluate_main([str(path), "--data", str(data), "--tol", "1e-4", "--max-iter", "200", "--record"])
    report = json.loads(capsys.readouterr().out)
    assert load_model(path).card["evaluations"] == [report]  # recorded in the card
    assert report["images"] == 20 and 0 <= report["accuracy"] <= 1
    assert report["solver"] == {"solver": "anderson", "tol": 1e-4, "max_iter": 200}
    assert report["converged_fraction"] == 1.0 and report["mean_residual"] < 1e-4


def test_evaluate_reports_per_image_counts_and_headline_only_on_request(saved, tmp_path, capsys):
    from test_data import make_cifar_folder

    from deq.evaluate import main as evaluate_main

    _, path = saved
    data = make_cifar_folder(tmp_path / "cifar", per_class=3, test_per_class=2)
    common = [str(path), "--data", str(data), "--tol", "1e-4", "--max-iter", "200", "--record"]
    evaluate_main([*common, "--split", "val", "--val-images", "10", "--solver", "forward"])
    val = json.loads(capsys.readouterr().out)
    assert val["split"] == "val" and val["images"] == 10
    assert val["p90_f_evals"] >= val["median_f_evals"] >= 1 and val["mean_f_evals"] <= 200
    assert load_model(path).card["test_accuracy"] == 0.5  # a validation run never changes it
    with pytest.raises(SystemExit):  # trained without a split: "val" would be training images
        evaluate_main([str(path), "--data", str(data), "--split", "val"])
    with pytest.raises(SystemExit):  # --headline needs the test split
        evaluate_main([*common, "--split", "val", "--headline"])
    evaluate_main([*common, "--headline"])
    test = json.loads(capsys.readouterr().out)
    card = load_model(path).card
    assert card["test_accuracy"] == test["accuracy"] and card["test_images"] == 20
    assert [(e["split"], e["solver"]["solver"]) for e in card["evaluations"]] == [
        ("val", "forward"), ("test", "anderson")]  # fmt: skip


def test_budget_curve_matches_single_budget_evaluations_and_is_recorded(saved, tmp_path, capsys):
    from test_data import make_cifar_folder

    from deq.evaluate import CURVE_BUDGETS, budget_curve, evaluate
    from deq.evaluate import main as evaluate_main

    model, path = saved
    data = make_cifar_folder(tmp_path / "cifar", per_class=1, test_per_class=2)
    images, labels = load_cifar10(data, "test")
    curve = budget_curve(model, images, labels, budgets=(1, 3, 200), tol=1e-6)
    for solver in ("anderson", "forward"):
        assert len(curve[solver]) == 3
        for k, accuracy in zip((1, 3, 200), curve[solver], strict=True):
            one = evaluate(model, images, labels, solver=solver, tol=1e-6, max_iter=k)
            assert accuracy == one["correct"] / len(labels)
    # solved to the equilibrium, both solvers give the same classifier
    assert curve["anderson"][-1] == curve["forward"][-1]
    for bad in ((), (0, 1), (1.5,)):
        with pytest.raises(ValueError, match="budgets"):
            budget_curve(model, images, labels, budgets=bad)

    evaluate_main([str(path), "--data", str(data), "--curve", "--record"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["budgets"] == list(CURVE_BUDGETS) and printed["tol"] == 1e-4 and printed["images"] == 20
    assert load_model(path).card["budget_curve"] == printed
    with pytest.raises(SystemExit):
        evaluate_main([str(path), "--data", str(data), "--curve", "--solver", "forward"])


def test_spectral_radius_is_reported_per_image_and_recorded_in_the_card(saved, tmp_path, capsys):
    from test_data import make_cifar_folder

    from deq.card import card_markdown
    from deq.evaluate import SPECTRAL_RADIUS_AVERAGE, SPECTRAL_RADIUS_ITERS, spectral_radii
    from deq.evaluate import main as evaluate_main

    model, path = saved
    data = make_cifar_folder(tmp_path / "cifar", per_class=1, test_per_class=2)
    images, _ = load_cifar10(data, "test")
    radii = spectral_radii(model, images, batch_size=7)
    assert radii.shape == (20,) and ((radii > 0) & (radii < 1)).all()  # a contractive cell
    torch.testing.assert_close(spectral_radii(model, images, batch_size=7), radii, rtol=0, atol=0)  # seeded
    one_batch = spectral_radii(model, images, batch_size=20)
    torch.testing.assert_close(one_batch, radii, rtol=0.05, atol=0)  # per image, whatever the batch
    with pytest.raises(ValueError, match="batch_size"):
        spectral_radii(model, images, batch_size=0)
    with pytest.raises(ValueError, match="at least one image"):
        spectral_radii(model, images[:0])

    evaluate_main([str(path), "--data", str(data), "--spectral-radius", "--record"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 20 and printed["power_iterations"] == SPECTRAL_RADIUS_ITERS
    assert printed["averaged"] == SPECTRAL_RADIUS_AVERAGE and printed["seed"] == 0
    assert printed["p10"] <= printed["median"] <= printed["p90"] <= printed["max"] < 1
    assert printed["at_least_one"] == 0.0
    assert printed["median"] == pytest.approx(float(radii.median()), rel=0.05)
    card = load_model(path).card
    assert card["spectral_radius"] == printed and card["test_accuracy"] == 0.5  # nothing else changed
    assert f"median {printed['median']:.2f}" in card_markdown(load_model(path))
    for extra in ("--curve", "--flip"):
        with pytest.raises(SystemExit):
            evaluate_main([str(path), "--data", str(data), "--spectral-radius", extra])


def test_the_training_log_schema_reads_what_train_py_writes_and_refuses_the_rest():
    from deq.checkpoint import EpochRecord

    line = {"epoch": 2.0, "train_loss": 1.0, "train_error": 0.3, "val_loss": 1.1, "val_error": 0.35,
            "forward_iters": 9.0, "backward_residual": None, "val_forward_iters": 7.5,
            "lr": 1e-3}  # fmt: skip
    record = EpochRecord.from_json(line)
    assert (record.eval_split, record.eval_error, record.eval_forward_iters) == ("val", 0.35, 7.5)
    assert {k: v for k, v in record.to_json().items() if v is not None} == {
        k: v for k, v in line.items() if v is not None
    }  # written back under the same keys
    for bad, message in (
        ({**line, "test_error": 0.1}, "exactly one of"),  # evaluated on two splits?
        ({**line, "eval_error": 0.1}, "unknown field 'eval_error'"),  # the in-memory name is not a key
        ({**line, "note": "x"}, "unknown field 'note'"),
        ({**line, "lr": "fast"}, "'lr' must be a number"),
        ({k: v for k, v in line.items() if k != "train_loss"}, r"missing field\(s\) \['train_loss'\]"),
        ([1], "must be a JSON object"),
    ):
        with pytest.raises(ValueError, match=message):
            EpochRecord.from_json(bad)
