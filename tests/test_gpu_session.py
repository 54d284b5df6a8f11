"""scripts/gpu_session.py end to end at tiny size on CPU: the GPU session's one command must not
fail on the device machine for a reason a CPU could have caught."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_data import make_cifar_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_trains_selects_on_validation_and_packs(tmp_path):
    data = make_cifar_folder(tmp_path / "cifar", per_class=30, test_per_class=3)
    out, runs = tmp_path / "out", tmp_path / "runs"
    cmd = [sys.executable, "scripts/gpu_session.py", "--out", str(out), "--data", str(data),
           "--runs", str(runs), "--smoke", "--sweep-jac", "0.5", "4",
           "--seed-budget", "3", "--large-budget", "4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["run"] for c in summary["seed_candidates"]] == ["seed-jac0.5", "seed-jac4"]
    assert all(
        c["anderson"]["split"] == "val" and c["anderson"]["images"] == 100 for c in summary["seed_candidates"]
    )
    assert all(  # --seed-args
        c["options"][:2] == ["--batch-size", "256"] and "--bn-recalibrate" in c["options"]
        for c in summary["seed_candidates"]
    )
    assert summary["seed"]["chosen"] in ("seed-jac0.5", "seed-jac4")
    assert {"own", "anderson", "forward"} == set(summary["seed"]["test"]) == set(summary["large"]["test"])
    seed = json.loads((runs / "seed" / "config.json").read_text())["card"]
    assert seed["selection"]["configurations_tried"] == 2 and "validation split" in seed["selection"]["rule"]
    assert seed["test_accuracy"] == summary["seed"]["test"]["own"]["accuracy"]
    with tarfile.open(out / "checkpoints.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"seed/model.safetensors", "large/config.json", "seed-jac4/train_log.jsonl"} <= names
    assert not any("train_state" in n for n in names)
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "--overwrite" in again.stderr  # never deletes earlier runs silently
