"""The models the app serves: which checkpoints, which one by default, loaded once, each with its
training log. The only reader of the app's environment variables:

    DEQ_CHECKPOINTS  directory whose checkpoint subdirectories are offered (default: checkpoints/)
    DEQ_MODEL        a checkpoint directory or Hugging Face Hub repo id to serve by default
    DEQ_DEVICE       cpu / cuda (default: cuda when available)
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CHECKPOINTS_DIR, WEIGHTS_NAME, EpochRecord, find_checkpoints, load_model, read_log
from ..model import DEQClassifier
from .inference import FLOAT64_BELOW_TOL

__all__ = [
    "DEFAULT_CHECKPOINTS", "ServedModel", "Catalogue", "load_catalogue", "model_sources", "load_models",
    "default_device", "train_log", "float64_copy",
]  # fmt: skip

log = logging.getLogger(__name__)

#: The app's default model: the first of these present in the checkpoint directory. The rule
#: (README, "Shipped checkpoints"): the most accurate checkpoint that is a real equilibrium model
#: (Anderson converges at tol 1e-4 on >= 98% of the test images, in fewer f-evaluations than
#: forward iteration) with the whole request within 300 ms p50 on a 2-core CPU (bench.app).
DEFAULT_CHECKPOINTS = ("large", "cpu", "seed")


@dataclass(frozen=True)
class ServedModel:
    """One model on offer: its label, where it came from, the loaded model (eval mode) and its
    training log (``log_problem`` says why there is none, or None); ``model64``, a float64 copy
    for tolerances float32 cannot reach (None: solve those in float32 too)."""

    label: str
    source: str
    model: DEQClassifier
    train_log: list[EpochRecord]
    log_problem: str | None
    model64: DEQClassifier | None = None

    def model_for(self, tol: float) -> DEQClassifier:
        """The copy that can reach ``tol``: float64 below ``FLOAT64_BELOW_TOL``, if there is one."""
        return self.model64 if tol < FLOAT64_BELOW_TOL and self.model64 is not None else self.model


def float64_copy(model: DEQClassifier) -> DEQClassifier:
    """A float64 copy of a loaded model (eval mode): a copy, since requests share the original."""
    return copy.deepcopy(model).double().eval()


@dataclass(frozen=True)
class Catalogue:
    """The served models by label (in offer order) and the default label. Read-only once built:
    requests share it without locks."""

    entries: dict[str, ServedModel]
    default: str

    @property
    def labels(self) -> list[str]:
        return list(self.entries)

    def get(self, label: object) -> ServedModel:
        """The model called ``label``; ValueError (a message for the user) for any other value."""
        entry = self.entries.get(label) if isinstance(label, str) else None
        if entry is None:
            raise ValueError(f"Unknown model; choose one of {sorted(self.entries)}.")
        return entry


def model_sources(root: str | Path, env_model: str | None = None) -> tuple[dict[str, str], str]:
    """({label: path or Hub repo id}, default label) of the models on offer.

    Default: ``env_model`` (DEQ_MODEL) if given, else the first of ``DEFAULT_CHECKPOINTS`` under
    ``root``, else the first directory.
    Raises FileNotFoundError when there is nothing to offer.
    """
    sources = {p.name: str(p) for p in find_checkpoints(root)}
    if env_model:
        same = Path(env_model).expanduser().resolve()
        others = {k: v for k, v in sources.items() if Path(v).resolve() != same}
        return {env_model: env_model, **others}, env_model
    if not sources:
        raise FileNotFoundError(
            f"No model to serve: no checkpoint directory (config.json + {WEIGHTS_NAME}) under {Path(root)} "
            "and DEQ_MODEL is not set. Train one (python train.py --out checkpoints/mine) or set DEQ_MODEL "
            "to a checkpoint directory or a Hugging Face Hub repo id."
        )
    return sources, next((name for name in DEFAULT_CHECKPOINTS if name in sources), next(iter(sources)))


def load_models(
    sources: dict[str, str], default: str, device: str | torch.device = "cpu", fallback: bool = False
) -> dict[str, DEQClassifier]:
    """Load every model once. A model that does not load is left out with a logged warning,
    except the default one: its error propagates (with a clear message) unless ``fallback``
    (the default was not asked for by name), when the others still serve. Raises the default's
    error when nothing loads."""
    models: dict[str, DEQClassifier] = {}
    default_error: Exception | None = None
    for label in [default, *(label for label in sources if label != default)]:
        try:
            models[label] = load_model(sources[label], device)
        except (FileNotFoundError, ValueError) as err:
            if label == default:
                if not fallback:
                    raise
                default_error = err
            log.warning("left out checkpoint %s: %s", sources[label], err)
    if not models and default_error is not None:  # with fallback only: else the default raised
        raise default_error
    return {label: models[label] for label in sources if label in models}


def train_log(source: str) -> tuple[list[EpochRecord], str | None]:
    """(records, None) of a checkpoint's training log, or ([], why there are none)."""
    try:
        return read_log(source), None
    except FileNotFoundError:
        return [], "it has no training log (`train_log.jsonl`)."
    except ValueError as err:
        log.warning("training log of %s: %s", source, err)
        return [], "its training log is damaged."


def default_device(environ: Mapping[str, str] = os.environ) -> str:
    """DEQ_DEVICE if set, else cuda when available, else cpu."""
    return environ.get("DEQ_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def load_catalogue(environ: Mapping[str, str] = os.environ) -> Catalogue:
    """Load the models the environment asks for (see the module docstring). A bad checkpoint
    found in the directory is skipped (logged); one named in DEQ_MODEL is an error.
    Raises FileNotFoundError or ValueError with a message for the person starting the app."""
    root = Path(environ.get("DEQ_CHECKPOINTS") or CHECKPOINTS_DIR)
    named = environ.get("DEQ_MODEL") or None
    sources, default = model_sources(root, named)
    models = load_models(sources, default, default_device(environ), fallback=named is None)
    entries = {
        label: ServedModel(label, src, model, *train_log(src), model64=float64_copy(model))
        for label, model in models.items()
        for src in [sources[label]]
    }
    return Catalogue(entries, default if default in entries else next(iter(entries)))
