"""The checkpoints shipped in checkpoints/: they load strictly, their cards agree with their
training logs, each is a real equilibrium model by its card's test-set evaluations, and the app's
default tells the demo's story on its own example images."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import pytest
import torch

from deq.checkpoint import find_checkpoints, load_model, read_log
from deq.demo.catalogue import DEFAULT_CHECKPOINTS, model_sources
from deq.demo.images import load_image
from deq.demo.inference import SolveSettings, classify

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {p.name: p for p in find_checkpoints(ROOT / "checkpoints")}
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


def equilibrium_report(card: dict, solver: str) -> dict:
    """The card's full-test-set evaluation of ``solver`` at the app's defaults (tol 1e-4, max_iter 100)."""
    reports = [
        e for e in card["evaluations"]
        if e["split"] == "test" and e["solver"] == {"solver": solver, "tol": 1e-4, "max_iter": 100}
        and e["images"] == card["test_images"]
    ]  # fmt: skip
    assert reports, f"no full test-set {solver} evaluation at tol 1e-4 in the card"
    return reports[-1]


def test_the_three_checkpoints_are_shipped_and_the_default_is_among_them():
    assert set(SHIPPED) == {"seed", "cpu", "large"}
    assert model_sources(ROOT / "checkpoints") == ({n: str(p) for n, p in sorted(SHIPPED.items())}, "large")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_checkpoint_loads_and_its_card_and_log_agree(name):
    model = load_model(SHIPPED[name])  # strict keys, finite weights, safetensors only
    card = model.card
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["dataset"] == "CIFAR-10 (JPEG q75 copy)" and card["test_images"] == 10_000
    assert card["val_images"] == 5000 and card["finished"]
    records = read_log(SHIPPED[name])
    assert records and records[-1].epoch == pytest.approx(card["epochs"], abs=1e-3)
    assert records[-1].eval_split == "val"
    assert records[-1].eval_error == pytest.approx(1 - card["val_accuracy"], abs=1e-3)
    # a real equilibrium model at the app's defaults: Anderson converges on >= 98% of the test
    # images, in fewer f-evaluations (median per image) than forward iteration
    anderson, forward = equilibrium_report(card, "anderson"), equilibrium_report(card, "forward")
    assert anderson["converged_fraction"] >= 0.98
    assert anderson["median_f_evals"] < forward["median_f_evals"]


@pytest.mark.slow
def test_the_default_model_beats_forward_iteration_on_the_example_images():
    """What the app shows first: on each example image Anderson converges at the app's defaults,
    and over the ten it needs fewer f-evaluations than forward iteration (median)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the app solves
    model = load_model(SHIPPED[DEFAULT_CHECKPOINTS[0]])
    settings = SolveSettings()
    evals = {"anderson": [], "forward": []}
    for path in EXAMPLES:
        image = load_image(path)
        for solver in evals:
            result = classify(model, image, settings, solver)
            if solver == "anderson":
                assert result.converged, path.name
            evals[solver].append(result.n_evals)
    torch.set_num_threads(threads)
    assert len(EXAMPLES) == 10
    assert statistics.median(evals["anderson"]) < statistics.median(evals["forward"])


def test_the_cpu_model_meets_its_targets_by_its_card():
    """checkpoints/cpu: trained on a 2-core CPU within 3 hours (all its stages), <= 300k parameters,
    >= 75% on the full test set, Anderson converging on >= 98% in >= 1.5x fewer f-evaluations than
    forward iteration (medians), and its last stage is what `--preset cpu-rho` runs."""
    import train
    from deq.card import lineage, total_train_wall_time_s

    card = load_model(SHIPPED["cpu"]).card
    assert card["parameters"] <= 300_000 and card["test_accuracy"] >= 0.75
    stages = lineage(card)
    assert all("2 cores" in stage["device"] for stage in stages)
    assert total_train_wall_time_s(card) <= 3 * 3600
    anderson, forward = equilibrium_report(card, "anderson"), equilibrium_report(card, "forward")
    assert anderson["converged_fraction"] >= 0.98
    assert forward["median_f_evals"] >= 1.5 * anderson["median_f_evals"]
    ran = card["train_config"]
    preset, _ = train.parse_args(["--preset", "cpu-rho", "--init-from", ran["init_from"]])
    different = {k for k, v in dataclasses.asdict(preset).items() if ran[k] != v}
    assert different == {"out", "progress"}, different  # where it ran, not how
