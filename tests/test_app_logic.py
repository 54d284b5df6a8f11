"""The demo's logic without a server: preprocessing (incl. every bad input), the streaming
generator, tables, model listing, cards, training curves, and the app's wiring."""

from __future__ import annotations

import base64
import gc
import io
import json
import math
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deq import DEQClassifier, ModelConfig
from deq.card import card_markdown
from deq.checkpoint import find_checkpoints, save_checkpoint
from deq.demo.catalogue import (
    DEFAULT_CHECKPOINTS,
    Catalogue,
    ServedModel,
    float64_copy,
    load_models,
    model_sources,
    train_log,
)
from deq.demo.figures import budget_figure, residual_figure, training_figures
from deq.demo.images import MAX_PIXELS, load_image, prepare_image
from deq.demo.inference import SolverResult, SolveSettings, classify, top_classes, trustworthy
from deq.demo.stream import REPLAY_S, stream_solve, warm_up
from deq.demo.text import results_table
from deq.demo.uploads import MAX_DATA_URL_CHARS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def small_model(seed: int = 0) -> DEQClassifier:
    torch.manual_seed(seed)
    return DEQClassifier(ModelConfig(n_channels=16, n_inner_channels=16, n_groups=4)).eval()


# ----------------------------------------------------------------------------- preprocessing


def save(im: Image.Image, path: Path, fmt: str, **kw) -> Path:
    im.save(path, fmt, **kw)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares width x height (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def rgb_of(tensor: torch.Tensor) -> list[float]:
    """Mean colour of a (1, 3, H, W) tensor."""
    return tensor.mean(dim=(0, 2, 3)).tolist()


def check_tensor(t: torch.Tensor) -> None:
    assert t.shape == (1, 3, 32, 32) and t.dtype == torch.float32
    assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1


@pytest.mark.parametrize(
    ("name", "make", "expected_rgb"),
    [
        ("rgb.png", lambda p: save(Image.new("RGB", (50, 40), (255, 0, 0)), p, "PNG"), (1, 0, 0)),
        ("gray.png", lambda p: save(Image.new("L", (40, 40), 128), p, "PNG"), (128 / 255,) * 3),
        ("rgba.png", lambda p: save(Image.new("RGBA", (40, 40), (255, 0, 0, 0)), p, "PNG"), (1, 1, 1)),
        ("half.png", lambda p: save(Image.new("RGBA", (40, 40), (0, 0, 0, 128)), p, "PNG"), (127 / 255,) * 3),
        ("la.png", lambda p: save(Image.new("LA", (40, 40), (0, 0)), p, "PNG"), (1, 1, 1)),
        (
            "palette.png",
            lambda p: save(Image.new("RGB", (40, 40), (0, 0, 255)).convert("P"), p, "PNG"),
            (0, 0, 1),
        ),
        ("cmyk.jpg", lambda p: save(Image.new("CMYK", (40, 40), (255, 0, 0, 0)), p, "JPEG"), (0, 1, 1)),
        ("cmyk.tif", lambda p: save(Image.new("CMYK", (40, 40), (0, 0, 0, 255)), p, "TIFF"), (0, 0, 0)),
        (
            "i16.png",
            lambda p: save(Image.fromarray(np.full((20, 20), 65535, np.uint16)), p, "PNG"),
            (1, 1, 1),
        ),
        (
            "i16-mid.png",
            lambda p: save(Image.fromarray(np.full((20, 20), 32768, np.uint16)), p, "PNG"),
            (0.5,) * 3,
        ),
        ("bits.png", lambda p: save(Image.new("1", (40, 40), 1), p, "PNG"), (1, 1, 1)),
        ("float.tif", lambda p: save(Image.new("F", (40, 40), 0.25), p, "TIFF"), (0.25,) * 3),
        ("one.png", lambda p: save(Image.new("RGB", (1, 1), (0, 255, 0)), p, "PNG"), (0, 1, 0)),
        ("thin.png", lambda p: save(Image.new("RGB", (4000, 2), (0, 0, 255)), p, "PNG"), (0, 0, 1)),
        ("tall.bmp", lambda p: save(Image.new("RGB", (3, 900), (255, 255, 0)), p, "BMP"), (1, 1, 0)),
        (
            "pic.webp",
            lambda p: save(Image.new("RGB", (64, 64), (255, 0, 0)), p, "WEBP", lossless=True),
            (1, 0, 0),
        ),
    ],
)
def test_load_image_converts_any_mode(tmp_path, name, make, expected_rgb):
    t = load_image(make(tmp_path / name))
    check_tensor(t)
    assert rgb_of(t) == pytest.approx(expected_rgb, abs=0.03)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    prepared = prepare_image(path)
    check_tensor(prepared.tensor)
    assert rgb_of(prepared.tensor) == pytest.approx([1, 0, 0], abs=0.02)
    assert "first frame of an animation" in prepared.notes


def test_centre_crop_and_exif_orientation(tmp_path):
    # Left, middle, right thirds red, green, blue: the centre square is all green.
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100, 0] = arr[:, 100:200, 1] = arr[:, 200:, 2] = 255
    t = load_image(save(Image.fromarray(arr), tmp_path / "wide.png", "PNG"))
    assert rgb_of(t) == pytest.approx([0, 1, 0], abs=0.02)
    # Stored 300x100 with orientation 6 (rotate 90 degrees): shown 100x300, tall; top third red.
    exif = Image.Exif()
    exif[0x0112] = 6
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100, 0] = 255  # left of the stored image = top after the rotation
    t = load_image(save(Image.fromarray(arr), tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes(), quality=95))
    # The centre crop of the rotated image is the middle third: no red left.
    assert rgb_of(t)[0] < 0.1


def test_load_image_downscales_with_antialiasing(tmp_path):
    checker = (np.indices((512, 512)).sum(0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    t = load_image(save(Image.fromarray(checker), tmp_path / "checker.png", "PNG"))
    assert t.std() < 0.05 and abs(t.mean() - 0.5) < 0.05  # averaged to grey, no aliasing
    assert torch.equal(load_image((EXAMPLES / "cat.jpg").read_bytes()), load_image(EXAMPLES / "cat.jpg"))


def _truncated_png(p: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return p


def _truncated_jpeg(p: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    p.write_bytes(buf.getvalue()[:2000])
    return p


BAD_INPUTS = [
    ("empty.png", lambda p: (p.write_bytes(b""), p)[1], "empty"),
    ("notes.txt", lambda p: (p.write_text("not an image at all"), p)[1], "not an image"),
    (
        "fake.png",
        lambda p: (p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), p)[1],
        "corrupt|not an image",
    ),
    (
        "drawing.svg",
        lambda p: (p.write_text('<svg xmlns="http://www.w3.org/2000/svg"/>'), p)[1],
        "not an image",
    ),
    ("half.png", _truncated_png, "truncated|corrupt"),
    ("half.jpg", _truncated_jpeg, "truncated|corrupt"),
    ("bomb.png", lambda p: png_header_only(p, 100_000, 100_000), "too large"),
    ("big.png", lambda p: png_header_only(p, 9000, 9000), "too large: 9000x9000"),
    (
        "page.eps",
        lambda p: (p.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"), p)[1],
        "not an image",
    ),
    ("missing.png", lambda p: p, "could not be read"),
]


@pytest.mark.parametrize(("name", "make", "message"), BAD_INPUTS)
def test_load_image_refuses_bad_input_with_a_clear_message(tmp_path, name, make, message):
    with pytest.raises(ValueError, match=message):
        load_image(make(tmp_path / name))


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    side = math.isqrt(MAX_PIXELS) + 1
    start = time.perf_counter()
    with pytest.raises(ValueError, match="too large"):
        load_image(png_header_only(tmp_path / "big.png", side, side))
    assert time.perf_counter() - start < 0.5


# ----------------------------------------------------------------------------- settings and inference


def test_settings_from_ui_and_bounds():
    s = SolveSettings.from_ui(2.0, -4, 5, -4, 100)
    assert (s.beta, s.tol, s.m, s.lam, s.max_iter) == (2.0, pytest.approx(1e-4), 5, pytest.approx(1e-4), 100)
    assert set(s.solver_kwargs("forward")) == {"tol", "max_iter"}
    assert set(s.solver_kwargs("anderson")) == {"tol", "max_iter", "m", "lam", "beta"}
    bad_settings = [
        (float("nan"), -4, 5, -4, 100),  # not finite
        (1.0, -4, 5.5, -4, 100),  # m not whole
        (1.0, -4, 5, -4, 10**6),  # max_iter too large
        (0.0, -4, 5, -4, 100),  # beta too small
        ("x", -4, 5, -4, 100),  # not a number
        (1.0, 3, 5, -4, 100),  # tol = 1000
        (1.0, -4, 5, 400, 100),  # 10**400 overflows
    ]
    for bad in bad_settings:
        with pytest.raises(ValueError):
            SolveSettings.from_ui(*bad)
    with pytest.raises(ValueError, match="whole number"):
        SolveSettings(m=2.0).validate()


def test_classify_gives_probabilities():
    result = classify(small_model(), load_image(EXAMPLES / "cat.jpg"), SolveSettings(tol=1e-3, max_iter=30))
    assert len(result.probs) == 10 and sum(result.probs) == pytest.approx(1.0)
    assert result.n_evals == len(result.trace) <= 30 and result.trace[0] == pytest.approx(1.0)
    label = top_classes(result.probs)
    assert len(label) == 5 and list(label.values()) == sorted(label.values(), reverse=True)
    assert next(iter(label)) == result.prediction
    assert top_classes(None) is None


# ----------------------------------------------------------------------------- the stream


class SlowCell(torch.nn.Module):
    def __init__(self, cell: torch.nn.Module, delay: float):
        super().__init__()
        self.cell, self.delay = cell, delay

    def forward(self, z, x):
        time.sleep(self.delay)
        return self.cell(z, x)


def slow_model(delay: float = 0.002) -> DEQClassifier:
    """A small model whose cell takes at least ``delay`` seconds: the solve outlasts the first frame."""
    model = small_model()
    model.deq.f = SlowCell(model.deq.f, delay)
    return model


def figure_json(fig) -> dict:
    return json.loads(fig.to_json())


def test_stream_yields_intermediate_frames_and_a_complete_final_one():
    settings = SolveSettings(tol=1e-12, max_iter=25)  # unreachable tol: both run all 25 steps
    frames = list(stream_solve(slow_model(), load_image(EXAMPLES / "dog.jpg"), settings, interval=0.0))
    assert len(frames) >= 5 and frames[-1].final and not any(f.final for f in frames[:-1])
    assert all(f.figure is frames[0].figure for f in frames)  # one figure per request, updated in place
    final = figure_json(frames[-1].figure)
    assert final["layout"]["yaxis"]["type"] == "log"
    tol_lines = [s for s in final["layout"]["shapes"] if s["y0"] == s["y1"]]
    assert tol_lines and tol_lines[0]["y0"] == pytest.approx(1e-12)
    anderson, forward = final["data"]
    assert "Anderson" in anderson["name"] and "forward" in forward["name"]
    for trace in (anderson, forward):  # lists, not base64 arrays, one point per f-evaluation
        assert isinstance(trace["y"], list) and len(trace["y"]) == 25 and trace["x"] == list(range(1, 26))
    assert frames[-1].label is not None and len(frames[-1].label) == 5
    assert "Anderson" in frames[-1].table and "forward iteration" in frames[-1].table
    assert "Same prediction" in frames[-1].table and frames[-1].status.startswith("Done")


def test_stream_draws_progressively_and_side_by_side():
    seen, rows = [], []
    settings = SolveSettings(tol=1e-12, max_iter=15)
    for frame in stream_solve(slow_model(), load_image(EXAMPLES / "dog.jpg"), settings, interval=0.0):
        data = figure_json(frame.figure)["data"]
        seen.append((len(data[0]["y"]), len(data[1]["y"])))
        rows.append(set(frame.results))
    assert seen == sorted(seen) and seen[-1] == (15, 15)
    assert any(0 < a < 15 and 0 < f < 15 for a, f in seen)  # both curves partly drawn at once
    # a solver's row appears only once its curve is complete
    for shown, done in zip(seen, rows, strict=True):
        assert all(shown[("anderson", "forward").index(s)] == 15 for s in done)


def test_the_race_is_replayed_at_a_human_pace_whatever_the_compute_time():
    """At the app's default settings a small model solves in milliseconds: the curves are still
    drawn over REPLAY_S, in at least three frames, the first one at once."""
    model, image = small_model(), load_image(EXAMPLES / "frog.jpg")
    warm_up(model)
    start = time.perf_counter()
    stamps, frames = [], []
    for frame in stream_solve(model, image, SolveSettings()):
        stamps.append(time.perf_counter() - start)
        frames.append(frame)
    assert len(frames) >= 3 and frames[-1].final
    assert stamps[-1] >= 0.9 * REPLAY_S  # drawn over the replay, not in one go
    assert stamps[0] < 0.5  # the first frame does not wait for the replay (0.1 s unloaded)
    fast = list(stream_solve(model, image, SolveSettings(), replay_s=0))
    assert [len(t.y) for t in fast[-1].figure.data] == [len(t.y) for t in frames[-1].figure.data]


def test_the_final_frame_has_the_verdict_median_wall_times_and_the_settling_answer():
    model, image = small_model(), load_image(EXAMPLES / "frog.jpg")
    final = list(stream_solve(model, image, SolveSettings(tol=1e-3), replay_s=0.2))[-1]
    anderson, forward = final.results["anderson"], final.results["forward"]
    assert len(anderson.timing_s) >= 3 and len(forward.timing_s) >= 3  # repeated untraced solves
    assert "median of" in final.table and "traced run" not in final.table
    title = final.figure.layout.title.text
    assert title.startswith(f"Anderson: {anderson.n_evals} f-evaluations (")
    assert title.endswith(f"<br>forward iteration: {forward.n_evals} f-evaluations")
    assert " fewer than forward iteration)" in title or " more than forward iteration)" in title
    for r in (anderson, forward):  # one answer and one time stamp per f-evaluation
        assert len(r.answers) == len(r.times_ms) == len(r.trace)
        assert r.times_ms == sorted(r.times_ms)
        assert r.answers[-1][0] == r.predicted_index and 1 <= r.settled_at <= len(r.trace)
    answer_lines = figure_json(final.answers)["data"]
    assert [len(t["y"]) for t in answer_lines] == [len(anderson.trace), len(forward.trace)]
    assert all(0 <= p <= 1 for t in answer_lines for p in t["y"])
    assert f"final from f-eval {anderson.settled_at}" in answer_lines[0]["name"]
    assert answer_lines[0]["text"][0] != ""  # the first answer is named, later only changes
    ms = list(stream_solve(model, image, SolveSettings(tol=1e-3), x_axis="ms", replay_s=0))[-1]
    xs = figure_json(ms.figure)["data"][0]["x"]
    assert xs == sorted(xs) and xs[-1] > 0 and "milliseconds" in ms.figure.layout.xaxis.title.text
    with pytest.raises(ValueError, match="x_axis"):
        next(stream_solve(model, image, SolveSettings(), x_axis="seconds"))


def test_stream_is_throttled_and_always_ends_with_the_final_frame():
    interval = 0.2
    settings = SolveSettings(tol=1e-12, max_iter=25)  # 50 f-evaluations of >= 10 ms: >= 0.5 s
    model, image = slow_model(0.01), load_image(EXAMPLES / "ship.jpg")
    warm_up(model)  # the first torch calls and the first plotly figure are slow
    gc.collect()  # no full collection of the test session's garbage inside the timed part
    stamps, frames, points = [], [], []
    start = time.perf_counter()
    for frame in stream_solve(model, image, settings, interval=interval):
        stamps.append(time.perf_counter())
        frames.append(frame)
        points.append(len(frame.figure.data[0].y))
    total = stamps[-1] - start
    gaps = np.diff(stamps[:-1])  # the final frame is sent as soon as it is ready
    assert len(frames) >= 3 and frames[-1].final and not any(f.final for f in frames[:-1])
    assert (gaps >= interval - 0.005).all() and len(frames) <= total / interval + 2
    assert points[0] <= 3 and stamps[0] - start < interval  # the first frame does not wait for the throttle


def test_closing_the_stream_stops_the_solver_thread():
    model = slow_model(0.01)
    stream = stream_solve(model, load_image(EXAMPLES / "ship.jpg"), SolveSettings(tol=1e-12, max_iter=500))
    next(stream)
    stream.close()
    deadline = time.perf_counter() + 2
    while any(t.name == "deq-solve" for t in threading.enumerate()) and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "deq-solve" for t in threading.enumerate())


class NaNAfter(torch.nn.Module):
    """The cell, until it has been called n times; NaN from then on (a solver blowing up)."""

    def __init__(self, cell: torch.nn.Module, n: int):
        super().__init__()
        self.cell, self.n, self.calls = cell, n, 0

    def forward(self, z, x):
        self.calls += 1
        out = self.cell(z, x)
        return out if self.calls <= self.n else out * float("nan")


def test_divergence_is_shown_and_warned_never_a_nan_label():
    model = small_model()
    model.deq.f = NaNAfter(model.deq.f, 6)
    frames = list(
        stream_solve(model, load_image(EXAMPLES / "cat.jpg"), SolveSettings(beta=3.0), interval=0.0)
    )
    final = frames[-1]
    assert final.results["anderson"].diverged and final.results["forward"].diverged
    assert any("diverged" in w for w in final.warnings) and "diverged" in final.status
    text = final.figure.to_json()
    assert "NaN" not in text and "Infinity" not in text
    assert any("diverged" in a["text"] for a in figure_json(final.figure)["layout"]["annotations"])
    for frame in frames:  # a label, if any, from a finite best iterate: no NaN
        assert frame.label is None or all(math.isfinite(v) for v in frame.label.values())
    # both diverged: their best iterates are no equilibrium, so no confident label is shown
    assert final.label is None and any("no prediction is shown" in w for w in final.warnings)


def test_only_a_trustworthy_solve_gives_the_label():
    def result(**kw):
        base = dict(solver="anderson", trace=[1.0], n_evals=1, residual=1e-5, converged=True,
                    diverged=False, message="", wall_s=0.1, probs=[0.1] * 10)  # fmt: skip
        return SolverResult(**{**base, **kw})

    assert trustworthy(result())
    assert trustworthy(result(converged=False, residual=0.05))  # stopped at max_iter, close
    assert not trustworthy(result(converged=False, residual=1.0))  # the frog-at-100% case
    assert not trustworthy(result(diverged=True, converged=False, residual=1e-3))
    assert not trustworthy(result(probs=None))


class Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_non_finite_output_gives_no_label_and_a_warning():
    model = small_model()
    model.head.append(Scale(float("nan")))  # head: Sequential; its logits become NaN
    frames = list(
        stream_solve(model, load_image(EXAMPLES / "cat.jpg"), SolveSettings(max_iter=10), interval=0.0)
    )
    assert all(f.label is None for f in frames)
    assert any("no finite" in w or "non-finite" in w for w in frames[-1].warnings)
    assert "–" in frames[-1].table


def test_stream_raises_bad_settings_before_solving():
    with pytest.raises(ValueError, match="beta"):
        next(stream_solve(small_model(), load_image(EXAMPLES / "cat.jpg"), SolveSettings(beta=-1.0)))


# ----------------------------------------------------------------------------- table and figure


def result(solver: str, n: int, converged: bool, wall: float, top: int = 3) -> SolverResult:
    probs = [0.01] * 10
    probs[top] = 0.91
    trace = [10.0 ** (-i / 4) for i in range(n)]
    return SolverResult(solver, trace, n, trace[-1], converged, False, "", wall, probs)


def test_results_table_speedup_and_agreement():
    table = results_table(
        {"anderson": result("anderson", 12, True, 0.02), "forward": result("forward", 60, True, 0.1)}
    )
    assert "| Anderson | 12 |" in table and "| forward iteration | 60 |" in table
    assert (
        "5.0x fewer f-evaluations" in table and "5.0x less wall time" in table and "both say *cat*" in table
    )
    assert "wall time: a single untraced solve (noisy)" not in table  # no timing solves: the traced run
    assert "wall time: the traced run (with its tracing: noisy)" in table
    slower = results_table(
        {"anderson": result("anderson", 12, True, 0.08), "forward": result("forward", 10, True, 0.081)}
    )
    assert "1.2x more f-evaluations" in slower and "about the same wall time" in slower  # never "0.8x fewer"
    assert "x fewer" not in slower
    table = results_table(
        {
            "anderson": result("anderson", 12, True, 0.02),
            "forward": result("forward", 100, False, 0.1, top=5),
        }
    )
    assert "at least 8.3x fewer" in table and "did not reach tol" in table and "Anderson says *cat*" in table
    assert "running" in results_table({"anderson": result("anderson", 12, True, 0.02)})


def test_residual_figure_layout():
    fig = figure_json(residual_figure(SolveSettings(tol=1e-3, beta=2.0)))
    assert fig["layout"]["yaxis"]["type"] == "log" and len(fig["data"]) == 2
    assert "beta=2" in fig["data"][0]["name"]
    assert fig["layout"]["shapes"][0]["y0"] == pytest.approx(1e-3)
    assert "title" not in fig["layout"] or not fig["layout"]["title"].get("text")  # the component labels it


# ----------------------------------------------------------------------------- models, cards, training log


def test_model_sources_choose_the_default(tmp_path, tiny_checkpoint):
    for name in ("b", "seed", "a"):
        save_checkpoint(small_model(), tmp_path / name)
    (tmp_path / "not-a-checkpoint").mkdir()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["a", "b", "seed"]
    assert model_sources(tmp_path) == ({"a": str(tmp_path / "a"), "b": str(tmp_path / "b"),
                                        "seed": str(tmp_path / "seed")}, "seed")  # fmt: skip
    shutil.copytree(tmp_path / "a", tmp_path / "cpu")
    assert model_sources(tmp_path)[1] == "cpu"
    shutil.copytree(tmp_path / "a", tmp_path / "large")  # the declared order decides, not the name order
    assert model_sources(tmp_path)[1] == "large" == DEFAULT_CHECKPOINTS[0]
    (tmp_path / "large" / "config.json").unlink()
    assert model_sources(tmp_path)[1] == "cpu"
    shutil.rmtree(tmp_path / "cpu")
    assert model_sources(tmp_path)[1] == "seed"
    (tmp_path / "seed" / "config.json").unlink()
    assert model_sources(tmp_path)[1] == "a"
    sources, default = model_sources(tmp_path, str(tiny_checkpoint))
    assert default == str(tiny_checkpoint) and list(sources) == [str(tiny_checkpoint), "a", "b"]
    sources, default = model_sources(tmp_path, str(tmp_path / "a"))  # listed once
    assert list(sources) == [str(tmp_path / "a"), "b"]
    with pytest.raises(FileNotFoundError, match="DEQ_MODEL"):
        model_sources(tmp_path / "nothing-here")


def test_load_models_skips_broken_checkpoints_but_not_a_named_default(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    save_checkpoint(small_model(), broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    models = load_models({"ok": str(tiny_checkpoint), "broken": str(broken)}, "ok")
    assert list(models) == ["ok"] and not models["ok"].training
    with pytest.raises(ValueError, match="safetensors"):
        load_models({"ok": str(tiny_checkpoint), "broken": str(broken)}, "broken")
    with pytest.raises(FileNotFoundError):
        load_models({"gone": str(tmp_path / "gone")}, "gone")
    # found in a directory rather than named: a bad default is skipped, the others still serve
    bad_config = tmp_path / "bad-config"
    save_checkpoint(small_model(), bad_config)
    data = json.loads((bad_config / "config.json").read_text())
    data["model"]["pool_size"] = 0  # once a ZeroDivisionError that stopped the app
    (bad_config / "config.json").write_text(json.dumps(data))
    sources = {"bad-config": str(bad_config), "broken": str(broken), "ok": str(tiny_checkpoint)}
    assert list(load_models(sources, "bad-config", fallback=True)) == ["ok"]
    with pytest.raises(ValueError, match="pool_size"):
        load_models({"bad-config": str(bad_config), "broken": str(broken)}, "bad-config", fallback=True)


def test_card_markdown(tiny_checkpoint):
    from deq.checkpoint import load_model

    text = card_markdown(load_model(tiny_checkpoint), "tiny")
    assert "78.3%" in text and "test CPU" in text and "3 epochs" in text and "`tiny`" in text
    assert "64,842 parameters" in text and "anderson" in text
    assert "no model card" in card_markdown(small_model())


def test_card_markdown_shows_the_equilibrium_evaluations_budget_and_notes():
    model = small_model()
    equilibrium = {"split": "test", "solver": {"solver": "forward", "tol": 1e-4, "max_iter": 100},
                   "images": 10000, "accuracy": 0.7918, "converged_fraction": 0.0,
                   "median_f_evals": 100.0}  # fmt: skip
    model.card = {
        "epochs": 11.051, "device": "NVIDIA H200", "train_config": {"epochs": 500, "time_budget_s": 400.0},
        "notes": "NOT a real equilibrium model",
        "evaluations": [equilibrium, {**equilibrium, "split": "val"},  # validation: not shown
                        {**equilibrium, "solver": {"solver": "anderson", "tol": 1e-2, "max_iter": 15}},
                        {"split": "test", "solver": "garbled"}],  # a foreign card: skipped, no error
    }  # fmt: skip
    text = card_markdown(model)
    assert "11.1 epochs (a 400 s wall-clock budget) on NVIDIA H200" in text and "of 500" not in text
    lines = [line for line in text.splitlines() if line.startswith("- Solved to")]
    assert lines == ["- Solved to tol 0.0001 (max_iter 100) with forward: 0.0% of 10,000 test images "
                     "converge, median 100 f-evaluations, accuracy 79.2%"]  # fmt: skip
    model.card["evaluations"] = [{**equilibrium, "flip": True, "device": "NVIDIA H200"}]
    assert "with forward on NVIDIA H200: 0.0%" in card_markdown(
        model
    ) and "(with test-time flips)" in card_markdown(model)
    assert "- Notes: NOT a real equilibrium model" in text


def test_card_markdown_shows_the_accuracy_by_budget_table():
    model = small_model()
    curve = {"split": "test", "images": 10000, "budgets": [1, 2, 50], "tol": 1e-4, "device": "CPU (x)",
             "anderson": [0.1, 0.5, 0.8], "forward": [0.1, 0.3, 0.79]}  # fmt: skip
    model.card = {"budget_curve": curve}
    lines = card_markdown(model).splitlines()
    start = next(i for i, line in enumerate(lines) if "Accuracy by solver budget" in line)
    assert "10,000 test images" in lines[start] and "tol 0.0001 on CPU (x)" in lines[start]
    assert lines[start + 2 : start + 6] == [
        "| f-evaluations k | 1 | 2 | 50 |", "|---|---|---|---|",
        "| Anderson | 10.0% | 50.0% | 80.0% |", "| forward iteration | 10.0% | 30.0% | 79.0% |",
    ]  # fmt: skip
    for garbled in ({**curve, "anderson": [0.1]}, {**curve, "budgets": None}, "x"):
        model.card = {"budget_curve": garbled}
        assert "Accuracy by solver budget" not in card_markdown(model)


def test_card_markdown_lists_a_fine_tuned_models_stages_and_total_time():
    from deq.card import lineage, total_train_wall_time_s

    model = small_model()
    first = {"command": "python train.py --preset cpu", "epochs": 15.0, "train_wall_time_s": 5400.0,
             "git_commit": "0123456789abcdef+dirty"}  # fmt: skip
    second = {"command": "python train.py --init-from a", "epochs": 2.0, "train_wall_time_s": 900.0,
              "init_from": {"checkpoint": "a", "card": first}}  # fmt: skip
    model.card = {"command": "python train.py --init-from b", "epochs": 6.5, "train_wall_time_s": 3600.0,
                  "init_from": {"checkpoint": "b", "card": second}}  # fmt: skip
    assert lineage(model.card) == [first, second, model.card]
    assert total_train_wall_time_s(model.card) == 9900.0
    lines = card_markdown(model).splitlines()
    assert "- Last of 3 training stages: trained 6.5 epochs in 60 min" in lines
    heading = "- Trained in 3 stages, each from the previous one's weights, 2.8 h (9,900 s) in all:"
    start = lines.index(heading)
    assert lines[start + 1 : start + 4] == [
        "  1. `python train.py --preset cpu`: 15 epochs, 90 min, commit `0123456789+dirty`",
        "  2. `python train.py --init-from a`: 2 epochs, 15 min",
        "  3. `python train.py --init-from b`: 6.5 epochs, 60 min",
    ]
    model.card = first  # trained in one go: no stage list; the commit keeps its "+dirty" mark
    assert "stages" not in card_markdown(model) and lineage(first) == [first]
    assert "at commit `0123456789+dirty`" in card_markdown(model)
    model.card = {**second, "init_from": {"checkpoint": "a", "card": {"epochs": "?"}}}  # garbled: no list
    assert "- Trained in" not in card_markdown(model)


def test_training_log_and_figures(tiny_checkpoint, tmp_path):
    records, problem = train_log(str(tiny_checkpoint))
    assert [r.epoch for r in records] == [1, 2, 3] and problem is None
    accuracy, residuals, steps = (figure_json(f) for f in training_figures(records))
    test_acc = next(t for t in accuracy["data"] if t["name"] == "test accuracy")
    assert test_acc["x"] == [1, 2, 3] and test_acc["y"][0] == pytest.approx(35.0)
    assert residuals["layout"]["yaxis"]["type"] == "log"
    assert {t["name"] for t in residuals["data"]} == {
        "forward solve (train)",
        "forward solve (test)",
    }  # no backward
    assert len(steps["data"]) == 2
    save_checkpoint(small_model(), tmp_path / "nolog")
    assert train_log(str(tmp_path / "nolog")) == ([], "it has no training log (`train_log.jsonl`).")
    assert all(len(f.data) == 0 for f in training_figures([]))
    (tmp_path / "nolog" / "train_log.jsonl").write_text('{"epoch": 1, "test_error": 0.5}\nnot json\n[1]\n')
    assert train_log(str(tmp_path / "nolog")) == ([], "its training log is damaged.")


# ----------------------------------------------------------------------------- the app's wiring


def test_app_wiring(app_module, app_catalogue, app_demo):
    demo = app_demo
    fns = {fn.api_name: fn for fn in demo.fns.values()}
    solve = fns["solve"]
    assert solve.trigger_mode == "always_last" and solve.queue and not solve.preprocess
    assert solve.concurrency_limit == app_module.CONCURRENCY
    assert [type(c).__name__ for c in solve.inputs] == ["Image", "Dropdown"] + ["Slider"] * 5 + ["Radio"]
    assert [type(c).__name__ for c in solve.outputs] == [
        "Plot", "Plot", "Label", "Markdown", "Markdown", "Image", "JSON"
    ]  # fmt: skip
    assert all(c.label for c in solve.outputs)  # named in the API, not value_22
    assert [c.precision for c in solve.inputs[4:7:2]] == [0, 0]  # m and max_iter are integers
    triggers = {(demo.blocks[block_id].__class__.__name__, event) for block_id, event in solve.targets}
    assert {
        ("Image", "change"),
        ("Button", "click"),
        ("Slider", "release"),
        ("Dropdown", "select"),
        ("Radio", "input"),
    } <= triggers
    assert sum(1 for _, event in solve.targets if event == "release") == 5
    assert demo._queue.max_size == app_module.QUEUE_SIZE
    assert "model_info" in fns
    card, note, *figures, budget = app_module.describe_model(app_catalogue, app_catalogue.default)
    assert "78.3%" in card and "3 epochs" in note and len(figures) == 3
    assert [t.name for t in budget.data] == ["Anderson", "forward iteration"]  # the card's curve


def test_app_solve_generator(app_module, app_catalogue):
    gr = pytest.importorskip("gradio")
    args = (app_catalogue.default, 1.0, -3, 5, -4, 20)
    frames = list(app_module.solve_request(app_catalogue, {"path": str(EXAMPLES / "frog.jpg")}, *args))
    plot, answers, label, table, status, preview, result = frames[-1]
    assert len(json.loads(plot.to_json())["data"]) == 2 and len(label) == 5
    assert len(json.loads(answers.to_json())["data"]) == 2
    assert "Anderson" in table and "Input: JPEG 32x32" in status
    assert plot.layout.title.text.startswith("Anderson: ")  # the verdict, in the chart's title
    assert [s["solver"] for s in result["solvers"]] == ["anderson", "forward"]
    assert json.loads(json.dumps(result, allow_nan=False)) == result  # plain JSON, no NaN
    for s in result["solvers"]:
        trace = s["trace"]
        assert len(trace["residual"]) == len(trace["ms"]) == len(trace["answer"]) == s["f_evals"]
        assert s["prediction"] in s["probabilities"] and len(s["wall_ms_runs"]) >= 3
    assert all(f[6] == gr.skip() for f in frames[:-1])  # the report comes once, at the end
    assert frames[0][5].size == (128, 128)  # the 32x32 input, enlarged
    assert all(f[5] == gr.skip() for f in frames[1:])  # sent once
    assert list(app_module.solve_request(app_catalogue, None, *args)) == [
        (None, None, None, "", "Upload an image or pick an example.", None, None)
    ]
    data_url = "data:image/jpeg;base64," + base64.b64encode((EXAMPLES / "frog.jpg").read_bytes()).decode()
    assert (
        list(app_module.solve_request(app_catalogue, {"url": data_url, "path": None}, *args))[-1][2] == label
    )
    with pytest.raises(gr.Error, match="links are not fetched"):
        next(
            app_module.solve_request(app_catalogue, {"url": "https://example.com/x.png", "path": None}, *args)
        )
    for bad_label in ("nope", ["a", "list"], {"a": 1}):
        with pytest.raises(gr.Error, match="Unknown model"):
            next(
                app_module.solve_request(
                    app_catalogue, {"path": str(EXAMPLES / "frog.jpg")}, bad_label, *args[1:]
                )
            )
        with pytest.raises(gr.Error, match="Unknown model"):
            app_module.describe_model(app_catalogue, bad_label)
    with pytest.raises(gr.Error, match="out of range"):  # once {"error": null} and a traceback
        next(
            app_module.solve_request(app_catalogue, {"path": str(EXAMPLES / "frog.jpg")}, *args[:-1], 10**400)
        )
    with pytest.raises(gr.Error, match="beta"):
        next(
            app_module.solve_request(
                app_catalogue,
                {"path": str(EXAMPLES / "frog.jpg")},
                app_catalogue.default,
                50.0,
                -3,
                5,
                -4,
                20,
            )
        )


@pytest.mark.parametrize(("name", "make", "message"), BAD_INPUTS)
def test_app_turns_bad_input_into_a_clear_ui_error(
    app_module, app_catalogue, tmp_path, monkeypatch, name, make, message
):
    gr = pytest.importorskip("gradio")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # stored as Gradio stores an upload
    with pytest.raises(gr.Error, match=message):
        next(
            app_module.solve_request(
                app_catalogue, {"path": str(make(tmp_path / name))}, app_catalogue.default, 1.0, -3, 5, -4, 20
            )
        )


def test_the_api_never_reads_server_files_it_did_not_store(app_module, app_catalogue, tmp_path, monkeypatch):
    gr = pytest.importorskip("gradio")
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    secret = tmp_path / "server-image.jpg"  # an image on the server, outside Gradio's uploads
    secret.write_bytes((EXAMPLES / "frog.jpg").read_bytes())
    args = (app_catalogue.default, 1.0, -3, 5, -4, 20)
    refusals = set()
    outside = (str(secret), str(tmp_path / "missing.jpg"), str(uploads / ".." / secret.name))
    for path in (*outside, ["x"], 7, "a\x00b"):
        with pytest.raises(gr.Error) as err:
            next(app_module.solve_request(app_catalogue, {"path": path}, *args))
        refusals.add(err.value.message)
    assert refusals == {"Only images uploaded to this app can be read."}  # reveals nothing
    (uploads / "frog.jpg").write_bytes(secret.read_bytes())
    assert list(app_module.solve_request(app_catalogue, {"path": str(uploads / "frog.jpg")}, *args))[-1][
        2
    ]  # a real upload
    assert list(app_module.solve_request(app_catalogue, {"path": str(EXAMPLES / "frog.jpg")}, *args))[-1][
        2
    ]  # an example
    huge = "data:image/png;base64," + "A" * (MAX_DATA_URL_CHARS + 4)
    with pytest.raises(gr.Error, match="over"):
        next(app_module.solve_request(app_catalogue, {"url": huge, "path": None}, *args))


def test_missing_model_is_a_clear_startup_error(app_module, monkeypatch, tmp_path):
    monkeypatch.setenv("DEQ_MODEL", str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="app.py cannot start: no checkpoint directory"):
        app_module.environment_catalogue()
    monkeypatch.delenv("DEQ_MODEL")
    monkeypatch.setenv("DEQ_CHECKPOINTS", str(tmp_path))
    with pytest.raises(SystemExit, match="No model to serve.*DEQ_MODEL"):
        app_module.environment_catalogue()


def test_app_warns_when_a_solver_diverges(app_module, app_catalogue):
    model = small_model()
    model.deq.f = NaNAfter(model.deq.f, 4)
    catalogue = Catalogue({"diverging": ServedModel("diverging", "-", model, [], None)}, "diverging")
    with pytest.warns(UserWarning, match="diverged"):  # gr.Warning outside a request warns
        frames = list(app_module.solve_request(catalogue, {"path": str(EXAMPLES / "cat.jpg")}, "diverging",
                                               3.0, -4, 5, -4, 50))  # fmt: skip
    plot, _, label, table, status, _, _ = frames[-1]
    assert "**diverged**" in table and "⚠️" in status and "NaN" not in plot.to_json()
    assert label is None or all(math.isfinite(v) for v in label.values())


def test_request_body_limit_answers_413_before_or_while_reading():
    import asyncio

    from deq.demo.limits import RequestBodyLimit

    calls = []

    async def app(scope, receive, send):  # reads the whole body, then answers 200
        calls.append(scope["path"])
        while (message := await receive())["type"] == "http.request" and message.get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def run(path, chunks, declared=None):
        sent = []
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                    for i, c in enumerate(chunks)]  # fmt: skip
        headers = [] if declared is None else [(b"content-length", str(declared).encode())]

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        limited = RequestBodyLimit(app, max_bytes=10, max_upload_bytes=100)
        asyncio.run(limited({"type": "http", "path": path, "headers": headers}, receive, send))
        return [m["status"] for m in sent if m["type"] == "http.response.start"]

    assert run("/gradio_api/queue/join", [b"12345"], declared=5) == [200]
    assert (
        run("/gradio_api/queue/join", [b"x"], declared=11) == [413]
        and calls.count("/gradio_api/queue/join") == 1
    )
    assert run("/gradio_api/queue/join", [b"123456", b"123456", b"1"]) == [413]  # one answer only
    assert run("/gradio_api/upload", [b"x" * 50], declared=50) == [200]
    assert run("/gradio_api/upload", [b"x"], declared=101) == [413]
    assert run("/gradio_api/queue/join", [b"x"], declared="lots") == [413]
    with pytest.raises(ValueError, match="max_bytes"):
        RequestBodyLimit(app, max_bytes=0)


def test_a_tolerance_below_float32s_reach_is_solved_in_float64():
    model = small_model()
    entry = ServedModel("m", "-", model, [], None, model64=float64_copy(model))
    assert entry.model_for(1e-4) is model and entry.model_for(1e-8) is entry.model64
    assert ServedModel("m", "-", model, [], None).model_for(1e-8) is model  # no copy: float32
    assert next(model.parameters()).dtype == torch.float32  # the shared model is untouched
    settings = SolveSettings(tol=1e-8, max_iter=300)
    final = list(stream_solve(entry.model_for(settings.tol), load_image(EXAMPLES / "cat.jpg"), settings,
                              replay_s=0))[-1]  # fmt: skip
    anderson = final.results["anderson"]
    assert anderson.dtype == "float64" and anderson.converged and anderson.residual < 1e-8
    assert "solved in float64" in final.status
    assert final.report["solvers"][0]["dtype"] == "float64"


def test_the_model_tab_draws_the_cards_accuracy_by_solver_budget():
    curve = {"split": "test", "images": 1000, "budgets": [1, 2, 4, 8], "tol": 1e-4,
             "anderson": [0.1, 0.3, 0.7, 0.8], "forward": [0.1, 0.3, 0.6, 0.8]}  # fmt: skip
    fig = figure_json(budget_figure(curve))
    assert [t["name"] for t in fig["data"]] == ["Anderson", "forward iteration"]
    assert fig["data"][0]["x"] == [1, 2, 4, 8] and fig["data"][1]["y"] == pytest.approx([10, 30, 60, 80])
    assert fig["layout"]["xaxis"]["type"] == "log"
    for broken in (None, {}, {**curve, "anderson": [0.1]}, {**curve, "budgets": "x"}):
        assert budget_figure(broken) is None


def test_the_replay_waits_instead_of_spinning():
    """A short race (a few f-evaluations) on screen for REPLAY_S: the consumer sleeps between the
    replay's steps rather than polling (it once burnt a core doing so)."""
    model, image = small_model(), load_image(EXAMPLES / "frog.jpg")
    warm_up(model)
    cpu = time.thread_time()
    frames = list(stream_solve(model, image, SolveSettings(tol=0.1)))
    assert frames[-1].final and len(frames[-1].results["anderson"].trace) < 10
    assert time.thread_time() - cpu < 0.3  # the frames' own work only (~0.05 s)
