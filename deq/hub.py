"""Publish on the Hugging Face Hub: a checkpoint as a model repo, the demo as a Gradio Space.

    python -m deq.hub --checkpoint checkpoints/seed --model-repo you/deq-cifar10
    python -m deq.hub --space you/deq-demo                     # app + examples + checkpoints/
    python -m deq.hub --checkpoint checkpoints/seed --model-repo you/deq-cifar10 --space you/deq-demo
    python -m deq.hub ... --dry-run          # list the uploads and the Space deletions, change nothing

Repos are created when missing and updated otherwise (one commit each). Before it changes
anything it lists what it will upload and which Space files it will delete, and asks; ``--yes``
skips the question (needed where there is no terminal to answer it). The token comes from
--token, HF_TOKEN or ``hf auth login``. ``load_model("you/deq-cifar10")`` then loads the model,
and ``DEQ_MODEL=you/deq-cifar10 python app.py`` serves it.
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from .card import card_markdown
from .checkpoint import CHECKPOINTS_DIR, CONFIG_NAME, LOG_NAME, WEIGHTS_NAME, load_model

__all__ = [
    "checkpoint_files", "space_files", "space_deletions", "model_readme", "push_checkpoint", "push_space",
    "main",
]  # fmt: skip

REPO_ROOT = CHECKPOINTS_DIR.parent
#: What a Space needs, as globs relative to the repository root (checkpoints/ only where present).
SPACE_GLOBS = (
    "app.py",
    "requirements.txt",
    "packages.txt",
    "README.md",
    "LICENSE",
    "deq/*.py",
    "deq/demo/*.py",
    "examples/*.jpg",
    "examples/*.png",
    f"checkpoints/*/{WEIGHTS_NAME}",
    f"checkpoints/*/{CONFIG_NAME}",
    f"checkpoints/*/{LOG_NAME}",
)
#: Remote files an update may delete when they are no longer part of the upload.
SPACE_DELETE_PATTERNS = ["deq/*.py", "deq/demo/*.py", "examples/*", "checkpoints/**"]


def checkpoint_files(checkpoint: str | Path) -> list[Path]:
    """The files of a checkpoint directory that go to a model repo (weights, config, log)."""
    directory = Path(checkpoint)
    files = [
        directory / name for name in (WEIGHTS_NAME, CONFIG_NAME, LOG_NAME) if (directory / name).is_file()
    ]
    missing = {WEIGHTS_NAME, CONFIG_NAME} - {f.name for f in files}
    if missing:
        raise FileNotFoundError(f"{directory} is not a checkpoint: missing {sorted(missing)}")
    return files


def space_files(root: str | Path = REPO_ROOT) -> list[str]:
    """Paths (relative to ``root``, sorted) of the files a Space needs."""
    root = Path(root)
    found = {
        p.relative_to(root).as_posix() for pattern in SPACE_GLOBS for p in root.glob(pattern) if p.is_file()
    }
    for required in ("app.py", "requirements.txt"):
        if required not in found:
            raise FileNotFoundError(f"{root} has no {required}: not the demo's repository?")
    return sorted(found)


def space_deletions(space_id: str, files: list[str], api: HfApi) -> list[str]:
    """Files of the Space that an update with ``files`` deletes (they match SPACE_DELETE_PATTERNS,
    as upload_folder matches them, and are not uploaded again); [] for a Space not created yet."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        remote = api.list_repo_files(space_id, repo_type="space")
    except RepositoryNotFoundError:
        return []
    keep = set(files)
    return sorted(
        path for path in remote
        if path not in keep and any(fnmatch.fnmatch(path, pattern) for pattern in SPACE_DELETE_PATTERNS)
    )  # fmt: skip


def has_space_front_matter(readme: Path) -> bool:
    """Whether README.md starts with the YAML block that configures a Gradio Space."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return False
    end = text.find("\n---", 4)
    return end > 0 and "sdk: gradio" in text[:end]


def model_readme(checkpoint: str | Path, repo_id: str) -> str:
    """The model repo's README.md: Hub metadata and the checkpoint's model card facts."""
    model = load_model(checkpoint)  # also proves the weights match the config before upload
    accuracy = model.card.get("test_accuracy")
    metrics = (
        "model-index:\n- name: deq-cifar10\n  results:\n  - task: {type: image-classification}\n"
        "    dataset: {name: CIFAR-10, type: cifar10, split: test}\n"
        f"    metrics:\n    - {{type: accuracy, value: {accuracy:.4f}}}\n"
        if isinstance(accuracy, (int, float))
        else ""
    )
    return (
        "---\nlibrary_name: pytorch\nlicense: mit\npipeline_tag: image-classification\n"
        "tags: [deep-equilibrium-model, deq, implicit-layer, cifar10]\ndatasets: [cifar10]\n"
        f"{metrics}---\n\n"
        "# Deep Equilibrium Model, CIFAR-10\n\n"
        "A convolutional Deep Equilibrium Model (DEQ): one weight-tied cell whose fixed point "
        "z* = f(z*, x) is found by Anderson acceleration, trained with implicit differentiation.\n\n"
        f"{card_markdown(model).replace('### Model card', '## Model card')}\n\n"
        "## Use\n\n```python\nfrom deq.checkpoint import load_model\n\n"
        f'model = load_model("{repo_id}")  # images (B, 3, 32, 32) in [0, 1] -> logits (B, 10)\n```\n\n'
        f"Files: `{WEIGHTS_NAME}` (weights), `{CONFIG_NAME}` (model config + card), `{LOG_NAME}` "
        "(per-epoch training log).\n"
    )


def _api(api: HfApi | None, token: str | None) -> HfApi:
    return api if api is not None else HfApi(token=token)


def push_checkpoint(
    checkpoint: str | Path,
    repo_id: str,
    *,
    api: HfApi | None = None,
    token: str | None = None,
    private: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """Create/update model repo ``repo_id`` with the checkpoint and a generated README.md.

    Returns the uploaded file names; with ``dry_run`` only lists them (no Hub call).
    """
    files = checkpoint_files(checkpoint)
    readme = model_readme(checkpoint, repo_id)
    names = [f.name for f in files] + ["README.md"]
    if dry_run:
        return names
    api = _api(api, token)
    api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deq-hub-") as staging:
        for f in files:
            shutil.copy2(f, Path(staging) / f.name)
        (Path(staging) / "README.md").write_text(readme, encoding="utf-8")
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=staging,
            commit_message=f"Upload DEQ checkpoint {Path(checkpoint).name}",
        )
    return names


def push_space(
    space_id: str,
    root: str | Path = REPO_ROOT,
    *,
    api: HfApi | None = None,
    token: str | None = None,
    private: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """Create/update Gradio Space ``space_id`` with the app's files from ``root``.

    Returns the uploaded paths; with ``dry_run`` only lists them (no Hub call).
    """
    root = Path(root)
    files = space_files(root)
    if not has_space_front_matter(root / "README.md"):
        print(
            "warning: README.md has no Space front matter (sdk: gradio, sdk_version, app_file): "
            "the Space will not configure itself",
            file=sys.stderr,
        )
    if dry_run:
        return files
    api = _api(api, token)
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private or None, exist_ok=True)
    api.upload_folder(
        repo_id=space_id,
        repo_type="space",
        folder_path=str(root),
        allow_patterns=files,
        delete_patterns=SPACE_DELETE_PATTERNS,
        commit_message="Update the DEQ demo",
    )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deq.hub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="checkpoint directory to push (with --model-repo)")
    parser.add_argument("--model-repo", help="model repo id, owner/name")
    parser.add_argument("--space", help="Space repo id, owner/name: create/update it with the app")
    parser.add_argument(
        "--root", default=str(REPO_ROOT), help="repository holding app.py (default: this one)"
    )
    parser.add_argument("--private", action="store_true", help="create new repos as private")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login)")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the uploads and the Space deletions; change nothing"
    )
    parser.add_argument("--yes", action="store_true", help="do not ask before uploading and deleting")
    args = parser.parse_args(argv)
    if bool(args.checkpoint) != bool(args.model_repo):
        parser.error("--checkpoint and --model-repo go together")
    if not (args.model_repo or args.space):
        parser.error("nothing to do: give --checkpoint/--model-repo and/or --space")
    try:
        common = {"token": args.token, "private": args.private}
        plan = []
        if args.model_repo:
            names = push_checkpoint(args.checkpoint, args.model_repo, **common, dry_run=True)
            plan.append(f"model repo {args.model_repo}: upload {', '.join(names)}")
        if args.space:
            paths = push_space(args.space, args.root, **common, dry_run=True)
            plan.append(f"space {args.space} (sdk gradio): upload {len(paths)} files:")
            plan.append("".join(f"  {p}\n" for p in paths).rstrip("\n"))
            try:
                deletions = space_deletions(args.space, paths, _api(None, args.token))
                plan.append(f"space {args.space}: delete {len(deletions)} files no longer part of the app"
                            + "".join(f"\n  {p}" for p in deletions))  # fmt: skip
            except Exception as err:  # offline, no access: say so rather than guess
                plan.append(f"space {args.space}: cannot list its files to show deletions ({err})")
        print("\n".join(plan))
        if args.dry_run:
            print("dry run: nothing was changed")
            return 0
        if not args.yes and not _confirm("Upload (and delete) as listed? [y/N] "):
            print("nothing was changed", file=sys.stderr)
            return 1
        if args.model_repo:
            push_checkpoint(args.checkpoint, args.model_repo, **common)
            print(f"model repo {args.model_repo}: uploaded")
        if args.space:
            push_space(args.space, args.root, **common)
            print(f"space {args.space}: uploaded")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _confirm(question: str) -> bool:
    """A yes from the terminal; False without one (no terminal: pass --yes)."""
    if not sys.stdin.isatty():
        print("no terminal to confirm on: pass --yes to upload without asking", file=sys.stderr)
        return False
    return input(question).strip().lower() in ("y", "yes")


if __name__ == "__main__":
    sys.exit(main())
