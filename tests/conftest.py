import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# The suite is mostly many tiny tensor ops: one intra-op thread avoids OpenMP hand-off costs
# that dominate them on small CPUs.
torch.set_num_threads(1)


# --- The Gradio app's tests (test_app_*.py, test_hub.py): a tiny checkpoint, the app, a server.

import importlib  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

TRAIN_LOG = [
    {"epoch": e, "train_loss": 2.0 / e, "train_error": 0.6 / e, "test_loss": 2.1 / e, "test_error": 0.65 / e,
     "forward_residual": 0.01 / e, "forward_iters": 9.0, "backward_residual": None, "backward_iters": None,
     "test_forward_residual": 0.02 / e, "test_forward_iters": 10.0, "lr": 1e-3, "epoch_time_s": 60.0,
     "train_images_per_s": 800.0, "elapsed_s": 60.0 * e}
    for e in (1, 2, 3)
]  # fmt: skip
BUDGETS = [1, 2, 3, 4, 6, 8, 12, 16, 25, 50]
CARD = {"dataset": "CIFAR-10 (test fixture)", "test_images": 10000, "device": "test CPU", "epochs": 3,
        "test_accuracy": 0.783, "train_wall_time_s": 180.0, "finished": True,
        "budget_curve": {"split": "test", "images": 1000, "budgets": BUDGETS, "tol": 1e-4,
                         "anderson": [min(0.783, 0.1 * k) for k in BUDGETS],
                         "forward": [min(0.783, 0.08 * k) for k in BUDGETS]}}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained seed-size model saved as a checkpoint directory, with a card and a train log."""
    from deq import DEQClassifier
    from deq.checkpoint import LOG_NAME, save_checkpoint

    torch.manual_seed(0)
    directory = save_checkpoint(DEQClassifier(), tmp_path_factory.mktemp("ckpt") / "tiny", CARD)
    (directory / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in TRAIN_LOG))
    return directory


@pytest.fixture(scope="session")
def app_module():
    """``app``: importing it loads no model."""
    return importlib.import_module("app")


@pytest.fixture(scope="session")
def app_catalogue(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as the app's only model (as DEQ_MODEL would name it)."""
    from deq.demo.catalogue import load_catalogue

    empty = tmp_path_factory.mktemp("no-checkpoints")
    return load_catalogue(
        {"DEQ_MODEL": str(tiny_checkpoint), "DEQ_CHECKPOINTS": str(empty), "DEQ_DEVICE": "cpu"}
    )


@pytest.fixture(scope="session")
def app_demo(app_module, app_catalogue):
    """The page built for ``app_catalogue``."""
    return app_module.build_demo(app_catalogue)


@pytest.fixture(scope="session")
def app_url(app_module, app_demo):
    """The demo served on 127.0.0.1 (a free port) for the session."""
    _, url, _ = app_demo.launch(
        server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **app_module.LAUNCH_KWARGS
    )
    yield url
    app_demo.close()
