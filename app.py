"""Gradio demo: classify an image with a Deep Equilibrium Model and watch its equilibrium solve,
Anderson acceleration against forward iteration, live. Layout and wiring only: the logic is in
``deq.demo`` and ``deq.images``.

    python app.py                                  # model from checkpoints/
    DEQ_MODEL=owner/name python app.py             # or a local directory / Hugging Face Hub repo

Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (set by Hugging Face Spaces).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

try:  # ZeroGPU Spaces: the GPU is attached only inside functions decorated with spaces.GPU
    import spaces
except ImportError:
    spaces = None

import gradio as gr
import torch
from gradio.utils import get_upload_folder, is_in_or_equal
from starlette.middleware import Middleware

from deq.demo import (
    SolveSettings,
    card_markdown,
    default_device,
    load_models,
    model_sources,
    read_train_log,
    stream_solve,
    training_figures,
    warm_up,
)
from deq.images import MAX_FILE_BYTES, prepare_image, to_preview
from deq.limits import MAX_PASTED_IMAGE_BYTES, RequestBodyLimit

ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
EXAMPLE_FILES = frozenset(p.resolve() for p in EXAMPLES)
MAX_DATA_URL_CHARS = 4 * (MAX_PASTED_IMAGE_BYTES // 3 + 1)  # base64 of the largest pasted image
QUEUE_SIZE = 16  # requests waiting beyond this get "queue is full"
CONCURRENCY = 2

# Small inputs (CIFAR-10 is 32x32) shown enlarged with sharp pixels.
CSS = "#image-input img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"
# Gradio 6 takes css in launch(); uploads over the size deq.images accepts are refused before
# they are stored. Tests launch with the same.
# Request bodies are bounded before they are read (deq.limits): JSON ones to a pasted image's size.
LAUNCH_KWARGS = {
    "css": CSS,
    "max_file_size": MAX_FILE_BYTES,
    "app_kwargs": {"middleware": [Middleware(RequestBodyLimit)]},
}

INTRO = """
# Deep Equilibrium Model: watch the solver think

A **deep equilibrium model (DEQ)** does not stack layers: it applies one weight-tied cell *f*
"infinitely often" and uses its **fixed point** z* = f(z*, x), with the image injected as x at
every step. Finding z* is a root-finding problem, so the network's "depth" is the number of
solver iterations. Pick an image: the app solves its equilibrium from z0 = 0 twice, with
**Anderson acceleration** and with plain **forward iteration** z(k+1) = f(z(k), x), and draws
each solver's relative residual ‖f(z) − z‖ / ‖f(z)‖ as it runs.
"""

EXPLAIN = """
**Reading the chart.** Each point is one evaluation of the cell *f*. Forward iteration converges
linearly (a straight line on the log axis) at a rate set by how contractive *f* is; Anderson
acceleration combines the last *m* iterates to extrapolate: on the default `seed` model it needs
2-6x fewer evaluations on the example images. On a more contractive cell (the `cpu` model, more
accurate) forward iteration is already fast and Anderson saves less: 1.2-1.7x on the examples.
The dashed line is the tolerance: a solver stops below it, or after `max_iter` evaluations.
`beta` > 1 over-projects (often faster, can diverge), `beta` < 1 damps. Once both have converged
they should agree: the classifier only looks at z*, not at the path to it.
"""


def _load() -> tuple[dict, dict, str]:
    checkpoints = Path(os.environ.get("DEQ_CHECKPOINTS") or ROOT / "checkpoints")
    try:
        sources, default = model_sources(checkpoints, os.environ.get("DEQ_MODEL"))
        # a bad checkpoint found in the directory is skipped (logged); one named in DEQ_MODEL is an error
        models = load_models(sources, default, default_device(), fallback=not os.environ.get("DEQ_MODEL"))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"app.py cannot start: {err}") from None
    return sources, models, default if default in models else next(iter(models))


SOURCES, MODELS, DEFAULT_MODEL = _load()
TRAIN_LOGS = {label: read_train_log(SOURCES[label]) for label in MODELS}
if spaces is None or next(MODELS[DEFAULT_MODEL].parameters()).is_cpu:  # ZeroGPU: GPU only inside spaces.GPU
    warm_up(MODELS[DEFAULT_MODEL])


def uploaded_file(payload: dict | None) -> str | bytes | None:
    """The file behind gr.Image's raw value (the solve runs with preprocess=False so that
    ``deq.images`` decodes the upload itself and says what is wrong with a bad one, where
    gr.Image would fail first with a generic error): a local path, or a data: URL's bytes."""
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise gr.Error("Expected an image file.", print_exception=False)
    if payload.get("path"):
        return _stored_upload(payload["path"])
    url = payload.get("url") or ""
    if not isinstance(url, str):
        raise gr.Error("Expected an image file.", print_exception=False)
    if url.startswith("data:") and "," in url:
        encoded = url.split(",", 1)[1]
        if len(encoded) > MAX_DATA_URL_CHARS:  # checked before decoding anything
            raise gr.Error(
                f"The pasted image is over {MAX_PASTED_IMAGE_BYTES // 2**20} MB: upload the file instead.",
                print_exception=False,
            )
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise gr.Error("The pasted image is not valid base64 data.", print_exception=False) from None
    raise gr.Error("Upload the image file itself (links are not fetched).", print_exception=False)


def _stored_upload(path) -> str:
    """``path`` if it is a file Gradio stored for a client (its upload/cache folder, where
    uploads and clicked examples go) or one of the app's examples; any other server path is
    refused with one message that says nothing about whether it exists."""
    try:
        resolved = Path(path).resolve() if isinstance(path, str) else None
    except (OSError, ValueError):  # e.g. an embedded NUL byte
        resolved = None
    if resolved is not None and (
        resolved in EXAMPLE_FILES or is_in_or_equal(resolved, Path(get_upload_folder()).resolve())
    ):
        return str(resolved)
    raise gr.Error("Only images uploaded to this app can be read.", print_exception=False)


def describe_model(label: str):
    """Model card, training-log note and the three training charts of one model."""
    model = MODELS.get(label) if isinstance(label, str) else None
    if model is None:
        raise gr.Error(f"Unknown model; choose one of {sorted(MODELS)}.", print_exception=False)
    records = TRAIN_LOGS.get(label, [])
    note = (
        f"Training curves of `{label}`: {len(records)} epochs, from its `train_log.jsonl`."
        if records
        else f"`{label}` has no training log (`train_log.jsonl`)."
    )
    return card_markdown(model, label), note, *training_figures(records)


def solve(image: dict | None, model_label: str, beta: float, log10_tol: float, m: float, log10_lam: float,
          max_iter: float):  # fmt: skip
    """Stream (residual plot, label, table, status, preview) while both solvers run."""
    image = uploaded_file(image)
    if image is None:
        yield None, None, "", "Upload an image or pick an example.", None
        return
    model_label = model_label or DEFAULT_MODEL
    model = MODELS.get(model_label) if isinstance(model_label, str) else None
    if model is None:
        raise gr.Error(f"Unknown model; choose one of {sorted(MODELS)}.", print_exception=False)
    try:
        settings = SolveSettings.from_ui(beta, log10_tol, m, log10_lam, max_iter)
        prepared = prepare_image(image)
    except ValueError as err:
        raise gr.Error(str(err), print_exception=False) from None
    w, h = prepared.original_size
    about = f"Input: {prepared.format} {w}x{h} ({prepared.mode})" + "".join(f"; {n}" for n in prepared.notes)
    preview = to_preview(prepared.tensor)
    for i, frame in enumerate(stream_solve(model, prepared, settings)):
        if frame.final:
            for warning in frame.warnings:
                gr.Warning(warning)
        yield (
            frame.figure,
            frame.label,
            frame.table,
            f"{frame.status}  \n{about}",
            preview if i == 0 else gr.skip(),
        )


if spaces is not None:
    solve = spaces.GPU(solve)


def build_demo() -> gr.Blocks:
    card, note, accuracy, residuals, steps = describe_model(DEFAULT_MODEL)
    with gr.Blocks(title="Deep Equilibrium Model: live solver demo") as demo:
        gr.Markdown(INTRO)
        with gr.Tab("Classify and solve"):
            with gr.Row():
                with gr.Column(scale=2, min_width=300):
                    image = gr.Image(
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        label="Image",
                        height=260,
                        elem_id="image-input",
                    )
                    gr.Examples(
                        [[str(p)] for p in EXAMPLES],
                        inputs=image,
                        label="CIFAR-10 test images (one per class)",
                        examples_per_page=10,
                        cache_examples=False,  # explicit: Spaces would otherwise cache (final frames only)
                    )
                    model_choice = gr.Dropdown(
                        list(MODELS), value=DEFAULT_MODEL, label="Model", visible=len(MODELS) > 1
                    )
                    beta = gr.Slider(0.1, 3.0, value=1.0, step=0.05, label="Anderson beta",
                                     info="mixing: < 1 damped, > 1 over-projected")  # fmt: skip
                    tol = gr.Slider(
                        -8, -1, value=-4, step=0.5, label="tol (log10)", info="-4 means tol = 1e-4"
                    )
                    with gr.Accordion("Advanced", open=False):
                        m = gr.Slider(1, 10, value=5, step=1, label="Anderson memory m")
                        lam = gr.Slider(-8, 0, value=-4, step=1, label="Anderson regulariser lam (log10)")
                        max_iter = gr.Slider(
                            10, 500, value=100, step=10, label="max_iter (f-evaluations per solver)"
                        )
                    run = gr.Button("Solve", variant="primary")
                with gr.Column(scale=3):
                    plot = gr.Plot(label="Relative residual per iteration (live)", elem_id="residual-plot")
                    with gr.Row():
                        label = gr.Label(
                            num_top_classes=5, label="Prediction (top 5)", scale=3, elem_id="prediction"
                        )
                        preview = gr.Image(label="What the model sees (32x32)", interactive=False, height=160,
                                           scale=2)  # fmt: skip
                    table = gr.Markdown()
                    status = gr.Markdown("Upload an image or pick an example.")
            gr.Markdown(EXPLAIN)
            card_md = gr.Markdown(card)
        with gr.Tab("How it was trained"):
            note_md = gr.Markdown(note)
            accuracy_plot = gr.Plot(accuracy, label="Accuracy per epoch")
            residual_plot = gr.Plot(residuals, label="Final relative residual of the solves per epoch")
            steps_plot = gr.Plot(steps, label="Solver steps per epoch")

        gr.on(
            triggers=[image.change, run.click, beta.release, tol.release, m.release, lam.release,
                      max_iter.release, model_choice.input],
            fn=solve,
            inputs=[image, model_choice, beta, tol, m, lam, max_iter],
            outputs=[plot, label, table, status, preview],
            api_name="solve",
            trigger_mode="always_last",
            concurrency_limit=CONCURRENCY,
            preprocess=False,  # see uploaded_file()
        )  # fmt: skip
        model_choice.change(
            describe_model,
            inputs=model_choice,
            outputs=[card_md, note_md, accuracy_plot, residual_plot, steps_plot],
            api_name="model_info",
        )
    return demo.queue(max_size=QUEUE_SIZE)


demo = build_demo()

if __name__ == "__main__":
    # One intra-op thread per request: a single 32x32 image is too little work to split, and
    # concurrent requests then use the cores instead of contending for them.
    torch.set_num_threads(int(os.environ.get("DEQ_THREADS", "1")))
    demo.launch(**LAUNCH_KWARGS)
