"""Checkpoints: safetensors weights + a JSON config/model card. No pickles anywhere.

A checkpoint is a directory::

    model.safetensors   the state dict
    config.json         {"model": ModelConfig fields, "card": {data set, accuracy, device, ...}}
    train_log.jsonl     (optional) one ``EpochRecord`` per training epoch
    train_state.*       (while a run can be resumed) optimizer, schedule and RNG state

This module owns all of it: the file names, the train-log schema with its writer and reader,
the resume state, where the shipped checkpoints live (``CHECKPOINTS_DIR``) and finding
checkpoints in a directory. The same directory is what ``deq.hub`` pushes to a Hugging Face
model repo, so ``load_model`` takes a local directory or a Hub repo id.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import DEQClassifier, ModelConfig

__all__ = [
    "EpochRecord",
    "find_checkpoints",
    "CHECKPOINTS_DIR",
    "save_checkpoint",
    "load_model",
    "read_config",
    "update_card",
    "resolve_checkpoint",
    "save_state",
    "load_state",
    "write_log",
    "read_log",
    "STATE_NAME",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "LOG_NAME",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LOG_NAME = "train_log.jsonl"
STATE_NAME = "train_state"  # + .safetensors / .json: what --resume continues from
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: The checkpoints shipped with this repository (what the app serves by default).
CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def save_checkpoint(model: DEQClassifier, directory: str | Path, card: dict | None = None) -> Path:
    """Write ``model`` (weights + config + card) into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), {"format": "pt"}))
    _write_json(directory / CONFIG_NAME, {"model": model.config.to_dict(), "card": card or {}})
    return directory


# ----------------------------------------------------------------------------- the training log

#: The evaluation split of a log record: "val" (held out of the training set) or "test".
EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class EpochRecord:
    """One line of train_log.jsonl: an epoch of training (or the part of one its time budget
    allowed) and the evaluation after it. Errors are fractions; ``*_iters`` are mean solver
    f-evaluations per image, ``*_residual`` mean final relative residuals.

    The evaluation was made on ``eval_split``; in the file its fields carry the split as their
    prefix (``val_error``, ``test_forward_iters``, ...), as every published log has them.
    """

    epoch: float
    train_loss: float
    train_error: float
    eval_split: str
    eval_loss: float
    eval_error: float
    forward_residual: float | None = None
    forward_iters: float | None = None
    backward_residual: float | None = None  # None: no implicit backward solve (phantom gradient)
    backward_iters: float | None = None
    jacobian_penalty: float | None = None  # None: trained without the Jacobian regulariser
    spectral_radius: float | None = None  # mean estimate over the epoch; None: not regularised
    eval_forward_residual: float | None = None
    eval_forward_iters: float | None = None
    lr: float | None = None
    steps: int | None = None
    epoch_time_s: float | None = None
    train_images_per_s: float | None = None
    elapsed_s: float | None = None

    def to_json(self) -> dict:
        """The record as written to train_log.jsonl."""
        prefix = self.eval_split + "_"
        out = {}
        for key, value in asdict(self).items():
            if key != "eval_split":
                out[prefix + key.removeprefix("eval_") if key.startswith("eval_") else key] = value
        return out

    @classmethod
    def from_json(cls, data: dict) -> EpochRecord:
        """Parse one line's object; ValueError on a missing, unknown or non-numeric field."""
        if not isinstance(data, dict):
            raise ValueError("a record must be a JSON object")
        splits = [s for s in EVAL_SPLITS if f"{s}_error" in data]
        if len(splits) != 1:
            raise ValueError(f"a record needs exactly one of {[s + '_error' for s in EVAL_SPLITS]}")
        split, values = splits[0], {"eval_split": splits[0]}
        names = {f.name for f in fields(cls)}
        for key, value in data.items():
            name = "eval_" + key.removeprefix(split + "_") if key.startswith(split + "_") else key
            if name not in names or name == "eval_split" or key.startswith("eval_"):
                raise ValueError(f"unknown field {key!r}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"field {key!r} must be a number or null, got {value!r}")
            values[name] = value
        missing = [f.name for f in fields(cls) if f.name not in values and f.default is not None]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        return cls(**values)


def write_log(directory: str | Path, records: list[EpochRecord]) -> None:
    """Rewrite ``directory``/train_log.jsonl with one JSON record per line, atomically."""
    text = "".join(json.dumps(r.to_json()) + "\n" for r in records)
    _atomic_write(Path(directory) / LOG_NAME, lambda p: p.write_text(text))


def read_log(source: str | Path) -> list[EpochRecord]:
    """The records of a checkpoint's train_log.jsonl (a directory or a Hub repo id).
    FileNotFoundError when it has none; ValueError naming the file and line if it is damaged."""
    path = resolve_checkpoint(source) / LOG_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint has no {LOG_NAME}: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read: {err}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            records.append(EpochRecord.from_json(json.loads(line)))
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            raise ValueError(f"{path} line {number}: {err}: the training log is damaged") from None
    return records


def update_card(directory: str | Path, **fields) -> dict:
    """Add or replace fields of a local checkpoint's card (atomic rewrite of config.json)."""
    directory = Path(directory)
    data = read_config(directory)
    data["card"].update(fields)
    _write_json(directory / CONFIG_NAME, data)
    return data["card"]


def find_checkpoints(root: str | Path = CHECKPOINTS_DIR) -> list[Path]:
    """Checkpoint directories directly under ``root`` (holding config.json and weights), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file())


def resolve_checkpoint(source: str | Path) -> Path:
    """A local checkpoint directory for ``source``: a directory, or a Hub repo id (downloaded
    through huggingface_hub's cache; honours HF_HUB_OFFLINE)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(
            f"checkpoint must be a directory holding {WEIGHTS_NAME} and {CONFIG_NAME}, got file {path}"
        )
    if not _REPO_ID.match(str(source)):
        raise FileNotFoundError(f"no checkpoint directory at {path} (and it is not a Hub repo id owner/name)")
    if path.parent.is_dir():  # "checkpoints/mine" beside a checkpoints/ folder is a path, not owner/name
        raise FileNotFoundError(
            f"no checkpoint directory at {path} ({path.parent}/ exists here, so this names a local "
            "directory, not a Hub repo owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(str(source), allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, LOG_NAME, "README.md"])
        )
    except Exception as err:  # network, auth, offline mode, missing repo: one clear message
        raise FileNotFoundError(
            f"could not get checkpoint {source!r} from the Hugging Face Hub: {err}"
        ) from err


def read_config(source: str | Path) -> dict:
    """The parsed config.json of a checkpoint: {"model": {...}, "card": {...}}."""
    path = resolve_checkpoint(source) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint has no {CONFIG_NAME}: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path} must hold an object with a 'model' config")
    unknown = sorted(set(data) - {"model", "card"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}")
    data.setdefault("card", {})
    return data


def load_model(source: str | Path, device: str | torch.device = "cpu") -> DEQClassifier:
    """Load a checkpoint (directory or Hub repo id) as a DEQClassifier in eval mode.

    Keys are checked strictly; the card is attached as ``model.card`` (a dict).
    """
    directory = resolve_checkpoint(source)
    data = read_config(directory)
    model = DEQClassifier(ModelConfig.from_dict(data["model"]))
    weights = directory / WEIGHTS_NAME
    try:
        state = load_file(str(weights), device=str(device))
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint has no {WEIGHTS_NAME}: {weights}") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from None
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and expected[key].is_floating_point():
            if not tensor.is_floating_point():
                raise ValueError(f"{weights}: {key} holds {tensor.dtype} values where floats belong")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{weights}: {key} holds non-finite values (NaN or inf)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match the model config in {CONFIG_NAME}: {err}") from None
    model.card = data["card"]
    return model.to(device).eval()


# --- Training state (optimizer, scheduler, RNG) for --resume, also without pickles. ---


def _split(obj, tensors: dict[str, torch.Tensor], prefix: str):
    """Replace every tensor in a nested dict/list by a reference into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise ValueError(f"cannot store dict keys {list(obj)} at {prefix}")
        return {"__dict__": [[k, _split(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"cannot store {type(obj).__name__} at {prefix}")


def _join(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(path: str | Path, state: dict) -> None:
    """Save a nested dict of tensors/numbers/strings as ``path``.safetensors + ``path``.json."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, tensors, "s")
    _atomic_write(path.with_suffix(".safetensors"), lambda p: save_file(tensors, str(p)))
    _write_json(path.with_suffix(".json"), tree)


def load_state(path: str | Path) -> dict:
    """Inverse of ``save_state``."""
    path = Path(path)
    try:
        tensors = load_file(str(path.with_suffix(".safetensors")))
        tree = json.loads(path.with_suffix(".json").read_text())
        return _join(tree, tensors)
    except (SafetensorError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"training state at {path} is corrupt: {err}") from None
