"""The benchmarks' recipe tables: every recipe is a valid train.py configuration (a typo would
otherwise surface only on the GPU machine, where a failed benchmark costs device time)."""

from __future__ import annotations

import pytest
import torch

from bench.training import RECIPE_SETS, recipe_config, recipe_step_time


@pytest.mark.parametrize("name", sorted(RECIPE_SETS))
def test_every_recipe_is_a_valid_train_config(name):
    for label, options in RECIPE_SETS[name]:
        cfg = recipe_config(options)
        assert cfg.batch_size == options.get("batch_size", cfg.batch_size), label
        assert cfg.model.backward == options.get("backward", cfg.model.backward), label


def test_a_gpu_recipe_steps_on_the_cpu_at_a_tiny_batch():
    label, options = next(r for r in RECIPE_SETS["gpu"] if r[1].get("backward") == "phantom")
    seconds, batch, params = recipe_step_time(
        {**options, "batch_size": 2}, torch.device("cpu"), lambda: None, 1
    )
    assert batch == 2 and params == 64_842 and seconds > 0, label
