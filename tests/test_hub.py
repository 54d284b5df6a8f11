"""Publishing to the Hugging Face Hub (HfApi mocked: no network) and loading from an offline cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deq import hub

ROOT = Path(__file__).resolve().parent.parent


class FakeApi:
    """Records calls; upload_folder notes which files it would send (the staging dir is temporary)."""

    def __init__(self, token=None):
        self.token = token
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, dict[str, bytes]] = {}

    remote_files: list[str] = []

    def list_repo_files(self, repo_id, **kw):
        self.calls.append(("list_repo_files", (repo_id,), kw))
        return list(self.remote_files)

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", (repo_id,), kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kw):
        self.calls.append(
            (
                "upload_folder",
                (repo_id,),
                {"folder_path": folder_path, "allow_patterns": allow_patterns, **kw},
            )
        )
        root = Path(folder_path)
        names = allow_patterns or [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        self.uploaded[repo_id] = {n: (root / n).read_bytes() for n in names}


def test_push_checkpoint_creates_the_repo_and_uploads_weights_config_log_and_card(tiny_checkpoint):
    api = FakeApi()
    names = hub.push_checkpoint(tiny_checkpoint, "someone/deq-tiny", api=api, private=True)
    assert names == ["model.safetensors", "config.json", "train_log.jsonl", "README.md"]
    assert api.calls[0] == (
        "create_repo",
        ("someone/deq-tiny",),
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    assert api.calls[1][2]["repo_type"] == "model"
    files = api.uploaded["someone/deq-tiny"]
    assert set(files) == set(names)
    assert files["model.safetensors"] == (tiny_checkpoint / "model.safetensors").read_bytes()
    readme = files["README.md"].decode()
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["library_name"] == "pytorch" and meta["datasets"] == ["cifar10"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(0.783)
    assert 'load_model("someone/deq-tiny")' in readme and "78.3%" in readme


def test_push_space_creates_a_gradio_space_with_the_app_files():
    api = FakeApi()
    paths = hub.push_space("someone/deq-demo", ROOT, api=api)
    create, upload = api.calls
    expected = {"repo_type": "space", "space_sdk": "gradio", "private": None, "exist_ok": True}
    assert create == ("create_repo", ("someone/deq-demo",), expected)
    assert upload[2]["repo_type"] == "space" and upload[2]["folder_path"] == str(ROOT)
    assert upload[2]["allow_patterns"] == paths
    assert {
        "app.py",
        "requirements.txt",
        "deq/demo/stream.py",
        "deq/demo/__init__.py",
        "deq/demo/images.py",
        "deq/model.py",
        "examples/cat.jpg",
    } <= set(paths)
    assert not any(p.startswith(("tests/", "data/", "runs/", ".venv/")) or "__pycache__" in p for p in paths)
    assert len([p for p in paths if p.startswith("examples/")]) == 10


def test_space_files_need_the_app(tmp_path):
    with pytest.raises(FileNotFoundError, match="app.py"):
        hub.space_files(tmp_path)
    (tmp_path / "app.py").write_text("")
    (tmp_path / "requirements.txt").write_text("")
    (tmp_path / "checkpoints" / "seed").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "train_state.json"):
        (tmp_path / "checkpoints" / "seed" / name).write_text("{}")
    assert hub.space_files(tmp_path) == [
        "app.py", "checkpoints/seed/config.json", "checkpoints/seed/model.safetensors", "requirements.txt"
    ]  # fmt: skip


def push_argv(checkpoint) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--model-repo", "someone/m", "--space", "someone/s"]


def test_cli_dry_run_lists_uploads_and_deletions_and_changes_nothing(tiny_checkpoint, capsys, monkeypatch):
    apis = []
    monkeypatch.setattr(hub, "HfApi", lambda token=None: apis.append(FakeApi(token)) or apis[-1])
    remote = ["app.py", "deq/old_module.py", "checkpoints/gone/config.json", "notes.txt"]
    monkeypatch.setattr(FakeApi, "remote_files", remote)
    assert hub.main([*push_argv(tiny_checkpoint), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model repo someone/m: upload model.safetensors, config.json, train_log.jsonl, README.md" in out
    assert "space someone/s (sdk gradio): upload" in out and "  app.py\n" in out
    assert (
        "delete 2 files no longer part of the app\n  checkpoints/gone/config.json\n  deq/old_module.py" in out
    )
    assert "nothing was changed" in out
    assert [c[0] for a in apis for c in a.calls] == ["list_repo_files"]  # read only


def test_cli_asks_before_it_changes_anything(tiny_checkpoint, monkeypatch, capsys):
    apis = []
    monkeypatch.setattr(hub, "HfApi", lambda token=None: apis.append(FakeApi(token)) or apis[-1])
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    assert hub.main(push_argv(tiny_checkpoint)) == 1  # no terminal, no --yes: nothing happens
    assert "pass --yes" in capsys.readouterr().err
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda question: "n")
    assert hub.main(push_argv(tiny_checkpoint)) == 1
    assert not [c for a in apis for c in a.calls if c[0] != "list_repo_files"]
    monkeypatch.setattr("builtins.input", lambda question: "y")
    assert hub.main(push_argv(tiny_checkpoint)) == 0
    assert [c[0] for c in apis[-2].calls + apis[-1].calls] == ["create_repo", "upload_folder"] * 2


def test_cli_pushes_with_the_api(tiny_checkpoint, monkeypatch, capsys):
    apis = []
    monkeypatch.setattr(hub, "HfApi", lambda token=None: apis.append(FakeApi(token)) or apis[-1])
    assert hub.main([*push_argv(tiny_checkpoint), "--token", "t", "--yes"]) == 0
    assert {a.token for a in apis} == {"t"}
    assert [c[0] for a in apis for c in a.calls] == ["list_repo_files"] + ["create_repo", "upload_folder"] * 2
    assert "uploaded" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        hub.main(["--model-repo", "someone/m"])  # no --checkpoint
    assert hub.main(["--checkpoint", str(tmp_path), "--model-repo", "someone/m", "--dry-run"]) == 1
    assert "not a checkpoint" in capsys.readouterr().err


def test_space_front_matter_matches_the_pinned_gradio():
    readme = ROOT / "README.md"
    assert hub.has_space_front_matter(readme)
    text = readme.read_text().split("---")[1]
    meta = yaml.safe_load(text)
    pinned = next(line.split("==")[1].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if re.match(r"gradio(\[[a-z,]+\])?==", line))  # fmt: skip
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == pinned and meta["app_file"] == "app.py"
    assert len(meta["short_description"]) <= 60 and isinstance(meta["python_version"], str)


def test_load_from_an_offline_hub_cache(tiny_checkpoint, tmp_path):
    """A Hub repo id resolves through huggingface_hub's cache (HF_HUB_OFFLINE/HF_HUB_CACHE are
    read at import time, hence the subprocess)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--deq-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    script = """
import json
from deq.checkpoint import load_model
from deq.demo.catalogue import load_catalogue
model = load_model("someone/deq-tiny")
catalogue = load_catalogue({"DEQ_MODEL": "someone/deq-tiny", "DEQ_CHECKPOINTS": "no-such-dir"})
log = catalogue.get(catalogue.default).train_log
print(json.dumps({"acc": model.card["test_accuracy"], "labels": catalogue.labels, "log": len(log)}))
"""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "home"),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "acc": 0.783,
        "labels": ["someone/deq-tiny"],
        "log": 3,
    }
