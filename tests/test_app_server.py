"""The app served on 127.0.0.1 and driven with gradio_client, as a remote user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def curves(plot: dict) -> list[list]:
    """The y values of the plot's traces, from gr.Plot's output {"type": "plotly", "plot": json}."""
    assert plot["type"] == "plotly"
    return [trace["y"] for trace in json.loads(plot["plot"])["data"]]


def solve(client: Client, path: Path, log10_tol: float = -3, max_iter: int = 30):
    return client.submit(handle_file(str(path)), beta=1.0, log10_tol=log10_tol, m=5, log10_lam=-4,
                         max_iter=max_iter, api_name="/solve")  # fmt: skip


def test_streamed_solve_sends_intermediate_plots_and_a_final_label(client):
    # tol 1e-8 is out of float32's reach: the server solves in float64, and reaches it
    job = solve(client, EXAMPLES / "horse.jpg", log10_tol=-8, max_iter=300)
    frames = list(job)
    assert len(frames) >= 4
    plot, answers, label, table, status, _, result = job.result()
    evals = [s["f_evals"] for s in result["solvers"]]
    partial = [curves(f[0]) for f in frames[:-1]]
    assert any(len(a) + len(f) < sum(evals) for a, f in partial)  # intermediate updates of the plot
    assert [len(a) + len(f) for a, f in partial] == sorted(len(a) + len(f) for a, f in partial)
    assert all(s["dtype"] == "float64" and s["converged"] and s["residual"] < 1e-8 for s in result["solvers"])
    assert [len(y) for y in curves(plot)] == evals
    assert len(label["confidences"]) == 5 and label["label"] == label["confidences"][0]["label"]
    assert "| Anderson |" in table and "| forward iteration |" in table
    assert status.startswith("Done")


def test_corrupt_upload_gets_an_error_and_the_server_keeps_answering(client, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    with pytest.raises(AppError, match="not an image|corrupt"):
        solve(client, bad).result()
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(AppError, match="empty"):
        solve(client, empty).result()
    plot, _, label, *_ = solve(client, EXAMPLES / "truck.jpg").result()
    assert len(curves(plot)) == 2 and len(label["confidences"]) == 5


def test_a_raw_api_call_cannot_make_the_server_read_its_own_files(client, tmp_path):
    server_image = tmp_path / "server-side.jpg"  # outside Gradio's upload folder
    server_image.write_bytes((EXAMPLES / "cat.jpg").read_bytes())
    for payload in ({"path": str(server_image)}, {"path": str(tmp_path / "absent.jpg")}):
        with pytest.raises(AppError, match="Only images uploaded to this app can be read"):
            client.submit(payload, beta=1.0, log10_tol=-3, m=5, log10_lam=-4, max_iter=30,
                          api_name="/solve").result()  # fmt: skip
    assert solve(client, server_image).result()[2]  # the same file uploaded is fine


def _post(url: str, headers: dict, body_chunks) -> int:
    """Status of a raw POST to the app (http.client: no client-side limits)."""
    import http.client
    from urllib.parse import urlparse

    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        conn.putrequest("POST", "/gradio_api/queue/join")
        for key, value in {"Content-Type": "application/json", **headers}.items():
            conn.putheader(key, value)
        conn.endheaders()
        for chunk in body_chunks:
            conn.send(chunk)
        return conn.getresponse().status
    except (BrokenPipeError, ConnectionResetError):
        return 413  # the server answered and closed while the body was still being sent
    finally:
        conn.close()


def test_oversized_request_bodies_are_refused_without_reading_them(client, app_url):
    import resource

    from deq.demo.limits import MAX_JSON_BODY_BYTES

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    before = rss_mb()
    chunk = b"A" * 2**20
    for _ in range(5):
        # declared 400 MB: refused from the header alone
        assert _post(app_url, {"Content-Length": str(400 * 2**20)}, [b"{"]) == 413
        # no declared length (chunked): refused once it passes the limit
        n = MAX_JSON_BODY_BYTES // len(chunk) + 3
        chunked = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(n))
        assert _post(app_url, {"Transfer-Encoding": "chunked"}, [*chunked, b"0\r\n\r\n"]) == 413
    assert rss_mb() - before < 200  # peak memory of the process (server in a thread) stays bounded
    assert solve(client, EXAMPLES / "ship.jpg").result()[2]  # and the server keeps answering


def test_model_info_endpoint(client):
    card, note, accuracy, residuals, steps, budget = client.predict(api_name="/model_info")
    assert "78.3%" in card and "3 epochs" in note
    assert len(json.loads(accuracy["plot"])["data"]) == 2
    assert [t["name"] for t in json.loads(budget["plot"])["data"]] == ["Anderson", "forward iteration"]


def test_python_app_py_serves_where_gradio_env_says(tiny_checkpoint, tmp_path):
    """`python app.py` takes host and port from GRADIO_SERVER_NAME/PORT (as on Spaces)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DEQ_MODEL": str(tiny_checkpoint), "DEQ_CHECKPOINTS": str(tmp_path),
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as response:
                    assert json.load(response)["title"].startswith("Deep Equilibrium Model")
                    return
            except OSError:
                time.sleep(0.5)
        pytest.fail(
            f"python app.py did not serve on port {port}: {proc.stdout.read() if proc.poll() else ''}"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_api_is_documented_typed_and_an_mcp_tool(client, app_url):
    """Named, described parameters with integer types where they are integers, named outputs,
    and the solve offered as an MCP tool (the server runs with mcp_server=True)."""
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/solve"]
    params = {p["parameter_name"]: p for p in info["parameters"]}
    assert list(params) == ["image", "model_label", "beta", "log10_tol", "m", "log10_lam", "max_iter",
                            "x_axis"]  # fmt: skip
    assert (ROOT / params["image"]["example_input"]["path"]).is_file()  # a shipped image
    assert params["m"]["type"]["type"] == params["max_iter"]["type"]["type"] == "integer"
    assert [r["label"] for r in info["returns"]][-1] == "Result (JSON)"
    assert not any(r["label"].startswith("value_") for r in info["returns"])
    with urllib.request.urlopen(app_url.rstrip("/") + "/gradio_api/mcp/schema", timeout=30) as response:
        tools = json.loads(response.read())
    solve_tools = [t for t in tools if t["name"].endswith("solve")]
    assert solve_tools and "deep equilibrium model" in solve_tools[0]["description"]
    properties = solve_tools[0]["inputSchema"]["properties"]
    assert set(properties) == set(params)
    assert all(p.get("description") for p in properties.values())  # from the docstring's Args
