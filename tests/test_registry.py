"""The house rules: one solver registry that every door uses, architectures by registry, and a
library that loads no UI."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import make_cifar_folder

import train
from deq import ARCHITECTURES, Architecture, DEQClassifier, DEQFixedPoint, ModelConfig, ResNetCell
from deq.checkpoint import load_model
from deq.demo import inference
from deq.demo.catalogue import Catalogue, ServedModel
from deq.demo.inference import SolveSettings
from deq.demo.stream import stream_solve
from deq.solvers import SOLVERS, Monitor, check_solver_kwargs, lookup, register_solver, unregister_solver

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


# ----------------------------------------------------------------------------- a toy solver


def damped(f, z0, *, tol=1e-2, max_iter=50, damping=0.5, callback=None, check_every=None):
    """Damped forward iteration z <- (1 - damping) z + damping f(z): a solver in ten lines."""
    mon = Monitor(z0, tol, max_iter, callback, check_every)
    z, n = mon.z0, 0
    for n in range(1, max_iter + 1):
        fz = f(z.view(mon.shape)).reshape(z.shape)
        if mon.observe(z, fz) or n == max_iter:
            break
        z = (1 - damping) * z + damping * fz
    return mon.finish("damped", n)


def check_damping(damping):
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping!r}")


@pytest.fixture
def toy_solver():
    """``damped``, registered in this one place for the test, then removed."""
    register_solver("damped", damped, check_damping, label="damped iteration")
    yield "damped"
    unregister_solver("damped")


def test_a_registered_solver_works_in_the_layer_with_its_own_options(toy_solver):
    torch.manual_seed(0)
    cell = ResNetCell(8, 8, 4, 0.01)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    layer = DEQFixedPoint(cell, solver=toy_solver, damping=0.8, tol=1e-6, max_iter=200)
    z, info = layer(x)
    assert info.forward.solver == "damped" and info.forward.converged
    torch.testing.assert_close(cell(z, x), z, atol=1e-4, rtol=1e-4)
    z.sum().backward()  # the implicit backward solves with it too
    assert info.backward.solver == "damped" and info.backward.converged and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="damping must be in"):
        DEQFixedPoint(cell, solver=toy_solver, damping=0.0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['m'\] for solver 'damped'"):
        DEQFixedPoint(cell, solver=toy_solver, m=5)


def test_a_registered_solver_trains_evaluates_and_races(toy_solver, tmp_path, capsys):
    data = make_cifar_folder(tmp_path / "cifar", per_class=2, test_per_class=1)
    out = tmp_path / "run"
    train.main(["--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "20",
                "--solver", toy_solver, "--solver-option", "damping=0.7", "--f-max-iter", "4",
                "--b-max-iter", "4", "--no-progress"])  # fmt: skip
    capsys.readouterr()  # train.py's log lines
    model = load_model(out)
    assert model.config.solver == "damped" and model.config.solver_kwargs["damping"] == 0.7
    assert model.config.backward_kwargs["damping"] == 0.7  # the same solver backward, the same options

    from deq.evaluate import main as evaluate_main

    evaluate_main(
        [str(out), "--data", str(data), "--solver", toy_solver, "--tol", "1e-3", "--max-iter", "30"]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["solver"]["solver"] == "damped" and report["images"] == 10

    settings = SolveSettings(tol=1e-3, max_iter=30)
    final = list(stream_solve(model, torch.rand(1, 3, 32, 32), settings, race=(toy_solver, "forward")))[-1]
    assert list(final.results) == ["damped", "forward"] and "damped iteration" in final.table
    speedup = next(line for line in final.table.splitlines() if line.startswith("**Speed-up"))
    assert "damped iteration" in speedup  # compared with the race's baseline, the last solver
    assert [t.name for t in final.figure.data] == ["damped iteration", "forward iteration"]


def test_the_apps_race_is_one_list(toy_solver, monkeypatch):
    app = pytest.importorskip("app")
    monkeypatch.setattr(inference, "RACE", ("anderson", toy_solver, "forward"))
    model = DEQClassifier(ModelConfig(n_channels=16, n_inner_channels=16, n_groups=4)).eval()
    catalogue = Catalogue({"toy": ServedModel("toy", "-", model, [], None)}, "toy")
    frames = app.solve_request(catalogue, {"path": str(EXAMPLES / "cat.jpg")}, "toy", 1.0, -3, 5, -4, 30)
    *_, (plot, _, _, table, _, _, _) = frames
    assert [t.name.split(" (")[0] for t in plot.data] == ["Anderson", "damped iteration", "forward iteration"]
    assert table.count("| damped iteration |") == 1 and "Speed-up of Anderson over forward iteration" in table


def test_the_registry_refuses_what_it_cannot_serve(toy_solver):
    assert lookup(toy_solver).own_options == ("damping",)
    with pytest.raises(ValueError, match="already registered"):
        register_solver(toy_solver, damped)
    with pytest.raises(ValueError, match=r"lacks \['callback', 'check_every'\]"):
        register_solver("bare", lambda f, z0, *, tol=1e-2, max_iter=50: (z0, None))
    with pytest.raises(ValueError, match=r"needs a default; \['depth'\] have none"):
        register_solver("nodefault", lambda f, z0, *, depth, tol=1e-2, max_iter=50, callback=None,
                        check_every=None: 0)  # fmt: skip
    with pytest.raises(ValueError, match="fn must be callable"):
        register_solver("nothing", None)
    with pytest.raises(ValueError, match="name must be"):
        register_solver("two words", damped)
    with pytest.raises(ValueError, match="solver must be one of"):
        check_solver_kwargs("newton", {})
    assert not {"bare", "nothing", "nodefault"} & set(SOLVERS)
    with pytest.raises(ValueError, match="solver must be one of.*registered with register_solver"):
        ModelConfig(backward_solver="newton")
    with pytest.raises(
        ValueError, match="damping must be in"
    ):  # backward options checked for the backward solver
        ModelConfig(backward_solver=toy_solver, backward_kwargs={"damping": 2.0})


def test_architectures_come_from_a_registry():
    assert {"seed", "large"} <= set(ARCHITECTURES)
    tiny = Architecture(
        stem=lambda c: torch.nn.Conv2d(3, c.n_channels, 3, stride=4, padding=1),
        head=lambda c: torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c.n_channels, c.n_classes)
        ),  # fmt: skip
    )
    from deq.model import register_architecture

    register_architecture("tiny-test", tiny)
    try:
        model = DEQClassifier(ModelConfig(arch="tiny-test", n_channels=8, n_inner_channels=8, n_groups=4))
        logits, stats = model.eval().predict(
            torch.rand(2, 3, 32, 32), solver="forward", tol=1e-3, max_iter=40
        )
        assert logits.shape == (2, 10) and stats.solver == "forward"
        with pytest.raises(ValueError, match="already registered"):
            register_architecture("tiny-test", tiny)
    finally:
        ARCHITECTURES.pop("tiny-test")
    with pytest.raises(ValueError, match="arch must be one of"):
        ModelConfig(arch="tiny-test")


# ----------------------------------------------------------------------------- the library loads no UI


def test_the_library_imports_no_ui():
    code = (
        "import sys, deq, deq.checkpoint, deq.hub, deq.evaluate, deq.card, deq.data, deq.demo; "
        "print([m for m in ('gradio', 'plotly') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_apps_rooms_import_ui_libraries():
    library = [p for p in (ROOT / "deq").rglob("*.py") if "demo" not in p.relative_to(ROOT / "deq").parts]
    assert library and all(not _imported_modules(p) & {"gradio", "plotly"} for p in library)
    rooms = list((ROOT / "deq" / "demo").glob("*.py"))
    assert rooms and all("gradio" not in _imported_modules(p) for p in rooms)  # only app.py wires gradio
    plots = {p.name for p in rooms if "plotly" in _imported_modules(p)}
    assert plots <= {"figures.py", "stream.py"}


def test_a_solver_without_early_exit_is_left_alone(toy_solver):
    torch.manual_seed(0)
    layer, x = DEQFixedPoint(ResNetCell(8, 16, 4, 0.05), tol=1e-5, max_iter=200), torch.randn(5, 8, 6, 6)
    with torch.no_grad():
        z, stats = layer.eval().solve(x, solver=toy_solver)
        assert not stats.early_exit
        with pytest.raises(ValueError, match=f"early_exit: solver '{toy_solver}' does not take it"):
            layer.solve(x, solver=toy_solver, early_exit=True)


def test_a_layer_set_to_exit_early_still_runs_a_solver_without_it(toy_solver):
    """The layer's early_exit goes with its own solver; another solver gets what the call asks."""
    torch.manual_seed(0)
    layer = DEQFixedPoint(ResNetCell(8, 16, 4, 0.05), tol=1e-5, max_iter=200, early_exit=True).eval()
    x = torch.randn(5, 8, 6, 6)
    with torch.no_grad():
        assert layer.solve(x)[1].early_exit
        assert layer.solve(x, solver=toy_solver)[1].converged
