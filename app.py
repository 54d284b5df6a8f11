"""Gradio demo: classify an image with a Deep Equilibrium Model and watch its equilibrium solve,
Anderson acceleration against forward iteration, live. Layout and wiring only: the logic is in
``deq.demo`` (see its docstring for the rooms).

    python app.py                                  # models from checkpoints/
    DEQ_MODEL=owner/name python app.py             # or a local directory / Hugging Face Hub repo

Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (set by Hugging Face Spaces).
Importing this module loads no model: ``build_demo(catalogue)`` builds the page for the models of
a ``deq.demo.catalogue.Catalogue``; ``app.demo`` (what ``gradio app.py`` looks for) is built on
first use from the environment's catalogue.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

try:  # ZeroGPU Spaces: the GPU is attached only inside functions decorated with spaces.GPU
    import spaces
except ImportError:
    spaces = None

import gradio as gr
import torch
from gradio.utils import get_upload_folder
from gradio_client import handle_file
from starlette.middleware import Middleware

from deq.card import card_markdown
from deq.demo.catalogue import Catalogue, load_catalogue
from deq.demo.figures import answer_figure, budget_figure, residual_figure, set_title, training_figures
from deq.demo.images import MAX_FILE_BYTES, prepare_image, to_preview
from deq.demo.inference import SolveSettings
from deq.demo.limits import RequestBodyLimit
from deq.demo.stream import REPLAY_S, stream_solve, warm_up
from deq.demo.text import input_summary, train_log_note
from deq.demo.uploads import image_source

ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
EXAMPLE_FILES = frozenset(p.resolve() for p in EXAMPLES)
QUEUE_SIZE = 16  # requests waiting beyond this get "queue is full"
CONCURRENCY = 2

# Small inputs (CIFAR-10 is 32x32) shown enlarged with sharp pixels.
CSS = """
#image-input img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#results-table table, #model-card table { display: block; overflow-x: auto; max-width: 100%; }
#results-table th, #results-table td, #model-card th, #model-card td {
    white-space: nowrap; word-break: normal; overflow-wrap: normal;
}
"""
#: On a narrow screen the charts are below the inputs: bring them into view when a solve starts.
SCROLL_TO_CHART_JS = """(...args) => {
    if (window.innerWidth < 768) {
        document.getElementById("residual-plot")?.scrollIntoView({behavior: "smooth", block: "start"});
    }
    return args;
}"""
# Gradio 6 takes css in launch(); uploads over the size deq.demo.images accepts are refused before
# they are stored; request bodies are bounded before they are read (deq.demo.limits). Tests
# launch with the same.
LAUNCH_KWARGS = {
    "css": CSS,
    "mcp_server": True,  # the solve is also an MCP tool (gradio[mcp])
    "max_file_size": MAX_FILE_BYTES,
    "app_kwargs": {"middleware": [Middleware(RequestBodyLimit)]},
}

INTRO = r"""
# Deep Equilibrium Model: watch the solver think

A **deep equilibrium model (DEQ)** does not stack layers: it applies one weight-tied cell $f$
"infinitely often" and uses its **fixed point** $z^\star = f(z^\star, x)$, with the image injected
as $x$ at every step. Finding $z^\star$ is a root-finding problem, so the network's "depth" is the
number of solver iterations. Pick an image: the app solves its equilibrium from $z_0 = 0$ with
**Anderson acceleration** and with plain **forward iteration** $z_{k+1} = f(z_k, x)$, side by side,
and draws each solver's relative residual $\lVert f(z) - z \rVert / \lVert f(z) \rVert$ as it goes.
"""

EXPLAIN = r"""
**Reading the charts.** Each point is one evaluation of the cell $f$. The solves take
milliseconds; the race is replayed over 1.5 s so that it can be watched, both solvers advancing
one f-evaluation at a time. Switch the x axis to *milliseconds* for what each solver's iterations
cost (its traced clock, scaled to end at its median untraced solve); the table's wall times are
those medians. Forward iteration converges linearly (a straight line on the log axis) at a rate
set by how contractive $f$ is; Anderson acceleration combines the last $m$ iterates to
extrapolate. On the default `large` model it needs 1.1-1.6x fewer evaluations than forward
iteration on the example images (1.3-2.4x on the `cpu` model). On the `seed` model, whose cell is
barely contractive, forward iteration stops at `max_iter` 100 on every example while Anderson
converges in 17-34 evaluations. The dashed line is the tolerance: a solver stops below it, or
after `max_iter` evaluations. $\beta > 1$ over-projects (often faster, can diverge), $\beta < 1$
damps.

**The answer along the solve.** The lower chart applies the classifier's head to every $f(z_k)$:
the answer the network would give at that depth, the probability of its top class, and the class
named wherever it changes. The legend says from which f-evaluation each solver's answer was final.
Once both have converged they agree: the classifier only looks at $z^\star$, not at the path to
it.
"""

#: $...$ inline and $$...$$ displayed, for the two texts above.
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]


#: The image of the API's example call ("Use via API", the MCP schema): one this repository ships,
#: relative to a checkout, instead of Gradio's default image on an external site.
API_EXAMPLE_IMAGE = "examples/ship.jpg"


def _with_api_example(image: gr.Image) -> gr.Image:
    # Set on the instance: a subclass of a Gradio component makes Gradio write a .pyi stub beside it.
    image.example_payload = lambda: handle_file(API_EXAMPLE_IMAGE)
    image.example_value = lambda: API_EXAMPLE_IMAGE
    return image


def _user_error(err: Exception) -> gr.Error:
    return gr.Error(str(err), print_exception=False)


#: The x-axis choice on the page -> stream_solve's x_axis.
X_AXIS_CHOICES = {"f-evaluations": "evals", "milliseconds": "ms"}


def solve_request(catalogue: Catalogue, payload: dict | None, model_label: str, beta: float, log10_tol: float,
                  m: float, log10_lam: float, max_iter: float, x_axis: str = "f-evaluations",
                  replay_s: float = REPLAY_S) -> Iterator[tuple]:  # fmt: skip
    """The solve event: (residual plot, answer plot, label, table, status, preview, JSON report)
    frames while the race is drawn (the report in the final frame only). ``payload`` is gr.Image's
    raw value: the event runs with preprocess=False so that ``deq.demo`` decodes the upload itself
    and says what is wrong with a bad one."""
    try:
        source = image_source(payload, Path(get_upload_folder()), EXAMPLE_FILES)
        if source is None:
            yield None, None, None, "", "Upload an image or pick an example.", None, None
            return
        entry = catalogue.get(model_label or catalogue.default)
        settings = SolveSettings.from_ui(beta, log10_tol, m, log10_lam, max_iter)
        model = entry.model_for(settings.tol)  # float64 where float32 cannot reach tol
        if x_axis not in X_AXIS_CHOICES:
            raise ValueError(f"x_axis must be one of {list(X_AXIS_CHOICES)}, got {x_axis!r}")
        prepared = prepare_image(source)
    except ValueError as err:
        raise _user_error(err) from None
    about, preview = input_summary(prepared), to_preview(prepared.tensor)
    frames = stream_solve(model, prepared, settings, x_axis=X_AXIS_CHOICES[x_axis], replay_s=replay_s)
    try:
        for i, frame in enumerate(frames):
            if frame.final:
                for warning in frame.warnings:
                    gr.Warning(warning)
            yield (
                frame.figure,
                frame.answers,
                frame.label,
                frame.table,
                f"{frame.status}  \n{about}",
                preview if i == 0 else gr.skip(),
                frame.report if frame.final else gr.skip(),
            )
    except ValueError as err:
        raise _user_error(err) from None
    except Exception as err:  # not the user's doing: say what failed rather than a bare "Error"
        message = f"The solve failed ({type(err).__name__}: {err}); other requests are unaffected."
        raise gr.Error(message) from err


def empty_race_figure():
    """The residual chart before the first race (the app's default settings)."""
    fig = residual_figure(SolveSettings())
    set_title(fig, "Pick an image: the race is drawn here")
    return fig


def describe_model(catalogue: Catalogue, label: str) -> tuple:
    """(model card, training-log note, accuracy, residual and step charts, accuracy-by-budget
    chart or None) of one model."""
    try:
        entry = catalogue.get(label)
    except ValueError as err:
        raise _user_error(err) from None
    note = train_log_note(label, len(entry.train_log), entry.log_problem)
    curve = budget_figure(entry.model.card.get("budget_curve"))
    return card_markdown(entry.model, label), note, *training_figures(entry.train_log), curve


def build_demo(catalogue: Catalogue) -> gr.Blocks:
    """The page, serving ``catalogue``'s models (its handlers close over it; nothing global)."""

    def solve(image: dict | None, model_label: str, beta: float, log10_tol: float, m: int, log10_lam: float,
              max_iter: int, x_axis: str):  # fmt: skip
        """Classify a 32x32-or-larger RGB image with a deep equilibrium model, solving its equilibrium
        z* = f(z*, x) with Anderson acceleration and with forward iteration side by side. Streams the
        residual chart, the answer-along-the-solve chart, the top-5 prediction, a results table, a
        status line and the 32x32 input; the last output is a JSON report with each solver's
        per-f-evaluation residuals, times and answers, f-evaluations, convergence and wall times.

        Args:
            image: the image to classify (any common format; centre-cropped and resized to 32x32).
            model_label: which served checkpoint classifies it (one of the dropdown's choices).
            beta: Anderson's mixing, 0.01-10 (page: 0.1-3); below 1 damps, above 1 over-projects.
            log10_tol: tol as a power of ten, -4 = 1e-4; tol 1e-12 to 0.5 (page: -8 to -1); float64 < 1e-6.
            m: Anderson's memory, the past iterates it combines: 1-20 (page: 1-10).
            log10_lam: Anderson's Tikhonov regulariser as a power of ten; lam at most 10 (page: -8 to 0).
            max_iter: the most f-evaluations each solver may spend: 1-1000 (page: 10-500).
            x_axis: "f-evaluations" or "milliseconds": the charts' x axis.
        """
        yield from solve_request(
            catalogue, image, model_label, beta, log10_tol, m, log10_lam, max_iter, x_axis
        )

    def model_info(label: str):
        """Model card, training-log note, the three training charts and the accuracy-by-budget chart
        of one served model.

        Args:
            label: which served checkpoint to describe (one of the dropdown's choices).
        """
        return describe_model(catalogue, label)

    if spaces is not None:  # ZeroGPU: the GPU is attached only inside spaces.GPU functions
        solve = spaces.GPU(solve)
    card, note, accuracy, residuals, steps, budget = describe_model(catalogue, catalogue.default)
    with gr.Blocks(title="Deep Equilibrium Model: live solver demo") as demo:
        gr.Markdown(INTRO, latex_delimiters=LATEX)
        with gr.Tab("Classify and solve"):
            with gr.Row():
                with gr.Column(scale=2, min_width=300):
                    image = _with_api_example(gr.Image(
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        label="Image",
                        height=260,
                        elem_id="image-input",
                    ))  # fmt: skip
                    gr.Examples(
                        [[str(p)] for p in EXAMPLES],
                        inputs=image,
                        label="CIFAR-10 test images (one per class)",
                        example_labels=[p.stem for p in EXAMPLES],
                        examples_per_page=10,
                        cache_examples=False,  # explicit: Spaces would otherwise cache (final frames only)
                    )
                    model_choice = gr.Dropdown(
                        catalogue.labels,
                        value=catalogue.default,
                        label="Model",
                        visible=len(catalogue.labels) > 1,
                    )
                    beta = gr.Slider(0.1, 3.0, value=1.0, step=0.05, label="Anderson beta",
                                     info="mixing: < 1 damped, > 1 over-projected")  # fmt: skip
                    tol = gr.Slider(
                        -8, -1, value=-4, step=0.5, label="tol (log10)", info="-4 means tol = 1e-4"
                    )
                    with gr.Accordion("Advanced", open=False):
                        m = gr.Slider(1, 10, value=5, step=1, precision=0, label="Anderson memory m")
                        lam = gr.Slider(-8, 0, value=-4, step=1, label="Anderson regulariser lam (log10)")
                        max_iter = gr.Slider(10, 500, value=100, step=10, precision=0,
                                             label="max_iter (f-evaluations per solver)")  # fmt: skip
                    run = gr.Button("Solve", variant="primary")
                with gr.Column(scale=3):
                    # The verdict is the chart's title: no component label above it.
                    # An empty chart from the start: plotly.js is loaded before the first race.
                    plot = gr.Plot(empty_race_figure(), label="Relative residual per f-evaluation",
                                   show_label=False, elem_id="residual-plot")  # fmt: skip
                    x_axis = gr.Radio(list(X_AXIS_CHOICES), value="f-evaluations", label="x axis",
                                      info="milliseconds: what each solver's iterations cost")  # fmt: skip
                    answers = gr.Plot(answer_figure(), label="The answer along the solve: top-1 class and "
                                      "its probability", show_label=False, elem_id="answer-plot")  # fmt: skip
                    with gr.Row():
                        label = gr.Label(
                            num_top_classes=5, label="Prediction (top 5)", scale=3, elem_id="prediction"
                        )
                        preview = gr.Image(label="What the model sees (32x32)", interactive=False, height=160,
                                           scale=2)  # fmt: skip
                    table = gr.Markdown(label="Results table", elem_id="results-table")
                    status = gr.Markdown("Upload an image or pick an example.", label="Status")
                    with gr.Accordion("The result as JSON (what the API returns last)", open=False):
                        report = gr.JSON(label="Result (JSON)")
            gr.Markdown(EXPLAIN, latex_delimiters=LATEX)
        with gr.Tab("The model"):
            # Each chart carries its title inside the figure: a component label would cover its legend.
            card_md = gr.Markdown(card, elem_id="model-card")
            budget_plot = gr.Plot(budget, label="Accuracy by solver budget", show_label=False)
            note_md = gr.Markdown(note)
            accuracy_plot = gr.Plot(accuracy, label="Accuracy per epoch", show_label=False)
            residual_plot = gr.Plot(residuals, label="Final relative residual per epoch", show_label=False)
            steps_plot = gr.Plot(steps, label="Solver steps per epoch", show_label=False)

        gr.on(
            triggers=[image.change, run.click, beta.release, tol.release, m.release, lam.release,
                      max_iter.release, model_choice.select, x_axis.input],
            fn=solve,
            inputs=[image, model_choice, beta, tol, m, lam, max_iter, x_axis],
            outputs=[plot, answers, label, table, status, preview, report],
            api_name="solve",
            trigger_mode="always_last",
            concurrency_limit=CONCURRENCY,
            preprocess=False,  # deq.demo reads the upload itself (solve_request)
            js=SCROLL_TO_CHART_JS,
        )  # fmt: skip
        model_choice.change(
            model_info,
            inputs=model_choice,
            outputs=[card_md, note_md, accuracy_plot, residual_plot, steps_plot, budget_plot],
            api_name="model_info",
        )
    return demo.queue(max_size=QUEUE_SIZE)


def environment_catalogue() -> Catalogue:
    """The models the environment names (``deq.demo.catalogue``), the default one warmed up;
    exits with the reason when there is nothing to serve."""
    try:
        catalogue = load_catalogue()
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"app.py cannot start: {err}") from None
    model = catalogue.get(catalogue.default).model
    if spaces is None or next(model.parameters()).is_cpu:  # ZeroGPU: the GPU only inside spaces.GPU
        warm_up(model)
    return catalogue


_building = threading.Lock()


def __getattr__(name: str):
    """``app.demo``, built on first use (PEP 562): importing app loads no model."""
    if name != "demo":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _building:  # two first uses at once build one page
        if "demo" not in globals():
            globals()["demo"] = build_demo(environment_catalogue())
    return globals()["demo"]


if __name__ == "__main__":
    # One intra-op thread per request: a single 32x32 image is too little work to split, and
    # concurrent requests then use the cores instead of contending for them.
    torch.set_num_threads(int(os.environ.get("DEQ_THREADS", "1")))
    demo = build_demo(environment_catalogue())
    demo.launch(**LAUNCH_KWARGS)
