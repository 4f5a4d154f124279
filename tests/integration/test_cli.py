"""The `mesh` console script as a user runs it: subprocesses of the installed entry point.

User errors must print exactly one line (`error: ...`) on stderr, exit non-zero, and never
show a traceback; the commands of the quickstart must work end to end against real workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from mesh.tools.examples import SEED_DIGITS_INPUT, seed_digits_tensor

MESH = Path(sys.executable).parent / "mesh"


@pytest.fixture
def run(redis_url, prefix, tmp_path):
    """`run(*args, env=..., ok=...)`: the installed `mesh` script, in an empty directory."""
    assert MESH.is_file(), f"the `mesh` console script is not installed next to {sys.executable}: pip install -e ."
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    base.update(MESH_REDIS_URL=redis_url, MESH_PREFIX=prefix, COLUMNS="200", NO_COLOR="1")
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(MESH), *args], cwd=cwd, env={**base, **(env or {})}, input=stdin,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    return run


def assert_user_error(proc: subprocess.CompletedProcess, *words: str, code: int = 1) -> str:
    shown = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == code, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for word in words:
        assert word in lines[0], shown
    return lines[0]


def test_user_errors_are_one_line_without_traceback(run, tmp_path):
    good = tmp_path / "req.json"
    good.write_text(json.dumps([seed_digits_tensor()]))
    not_json = tmp_path / "bad.json"
    not_json.write_text("[1, 2")
    not_npy = tmp_path / "bad.npy"
    not_npy.write_bytes(b"this is not an array")
    odd = str(tmp_path / "[red]" / "[/x].json")  # printed as it is, never read as rich markup

    # (args, run's keywords, words the one line must hold, exit status)
    cases = [
        (("models", "status", "nosuch"), {}, ("model 'nosuch' not found",), 1),
        (("infer", "nosuch", str(good)), {}, ("NOT_FOUND", "nosuch"), 1),
        (("infer", "--vmodel", "nosuch", str(good)), {}, ("NOT_FOUND",), 1),
        (("infer", "m", str(tmp_path / "missing.json")), {}, ("no such file",), 1),
        (("infer", "m", odd), {}, (f"no such file: {odd}",), 1),
        (("infer", "m", str(not_json)), {}, ("is not JSON",), 1),
        (("infer", "m", str(not_npy)), {}, ("is not a .npy array",), 1),
        (("infer", "m", "-"), {"stdin": "{nope"}, ("standard input is not JSON",), 1),
        (("models", "register", "x" * 513, "--uri", "file:///x.joblib", "--runtime", "sklearn"), {},
         ("INVALID_ARGUMENT", "513 bytes"), 1),
        (("models", "register", "m", "--uri", "file:///x.joblib", "--runtime", "nope"), {},
         ("unknown runtime 'nope'",), 1),
        (("models", "register", "m", "--uri", "file:///x.joblib", "--runtime", "sklearn", "--sync"), {},
         ("--load-now",), 1),
        (("vmodels", "status", "nosuch"), {}, ("vmodel 'nosuch' not found",), 1),
        (("vmodels", "set", "v", "nosuch"), {}, ("NOT_FOUND", "nosuch"), 1),
        (("vmodels", "set", "v", "t", "--runtime", "sklearn"), {}, ("--uri and --runtime go together",), 1),
        (("vmodels", "set", "v", "t", "--max-batch-size", "4"), {}, ("--uri and --runtime",), 1),
        (("repository", "sync"), {}, ("MESH_MODEL_DIR",), 1),
        (("repository", "sync", "--model-dir", "relative/dir"), {}, ("absolute path",), 1),
        (("models", "list"), {"env": {"MESH_REDIS_URL": "redis://127.0.0.1:1/0"}}, ("cannot reach Redis",), 1),
        (("models", "list"), {"env": {"MESH_PREFIX": "bad prefix"}}, ("prefix",), 1),
        # usage errors: one line too, status 2
        (("infer",), {}, ("Missing argument",), 2),
        (("nosuchcommand",), {}, ("No such command",), 2),
        (("models", "register", "m", "--uri", "file:///x.joblib"), {}, ("--runtime",), 2),
        (("status", "--interval", "0"), {}, ("--interval",), 2),
    ]  # fmt: skip
    # independent commands, none of which changes anything: run side by side (each is a
    # Python process's start-up, ~1 s), checked in order
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = list(pool.map(lambda case: run(*case[0], **case[1]), cases))
    for (args, _, words, code), proc in zip(cases, procs):
        assert_user_error(proc, *words, code=code)


def test_quickstart_commands_end_to_end(run, workers, svm_path, mlp_path, tmp_path):
    w1 = workers("w1")
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": [seed_digits_tensor()]}))  # a whole V2 request body
    rows = tmp_path / "rows.npy"
    np.save(rows, np.array([SEED_DIGITS_INPUT, SEED_DIGITS_INPUT], dtype=np.float32))

    def ok(*args: str, **kw) -> str:
        proc = run(*args, **kw)
        assert proc.returncode == 0, f"mesh {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    out = ok("models", "register", "mnist-svm", "--uri", f"file://{svm_path}", "--runtime", "sklearn",
             "--load-now", "--sync")  # fmt: skip
    assert "Loaded" in out and w1.full_name in out
    answer = json.loads(ok("infer", "mnist-svm", str(request)))
    assert answer["model_name"] == "mnist-svm" and answer["outputs"][0]["data"] == [8]
    answer = json.loads(ok("infer", "mnist-svm", str(rows)))
    assert answer["outputs"][0]["data"] == [8, 8]
    answer = json.loads(ok("infer", "mnist-svm", "-", stdin=json.dumps([seed_digits_tensor()])))
    assert answer["outputs"][0]["data"] == [8]

    assert "UpToDate" in ok("vmodels", "set", "mnist", "mnist-svm")
    out = ok("vmodels", "set", "mnist", "mnist-mlp", "--uri", f"file://{mlp_path}", "--runtime", "sklearn",
             "--auto-delete", "--sync")  # fmt: skip
    assert "mnist-mlp" in out and "UpToDate" in out
    status = json.loads(ok("vmodels", "status", "mnist", "--json"))
    assert status["status"] == "DEFINED" and status["active_model_id"] == "mnist-mlp"
    assert status["transition_status"] == "UpToDate"
    answer = json.loads(ok("infer", "--vmodel", "mnist", str(request)))
    assert answer["model_name"] == "mnist-mlp" and answer["outputs"][0]["data"] == [8]
    assert "mnist-mlp" in ok("vmodels", "list")

    out = ok("status")
    assert w1.full_name in out and "mnist-svm" in out and "mnist-mlp" in out and "Loaded" in out
    config = json.loads(ok("models", "status", "mnist-svm", "--config", "--json"))
    assert config["state"] == "LOADED" and config["config"]["max_batch_size"]["source"] in ("global", "default")

    # the repository: one published version becomes digits@1 and the vmodel digits
    version = tmp_path / "repo" / "digits" / "1"
    version.mkdir(parents=True)
    (version / "model.joblib").write_bytes(svm_path.read_bytes())
    (version / "_READY").write_text("{}")
    out = ok("repository", "sync", "--model-dir", str(tmp_path / "repo"))
    assert "digits@1" in out and "registered" in out
    report = json.loads(ok("repository", "sync", "--json", env={"MESH_MODEL_DIR": str(tmp_path / "repo")}))
    assert report["ok"] and report["versions"] == {"digits": [1]} and not report["registered"]
    assert "digits@1" in ok("models", "list")

    assert "auto-deleted mnist-mlp" in ok("vmodels", "delete", "mnist")
    assert "not found" in ok("vmodels", "delete", "mnist")
    assert "unregistered" in ok("models", "unregister", "mnist-svm")


def test_mesh_up_runs_the_stack_and_ctrl_c_stops_all_of_it(redis_url, prefix, tmp_path):
    import signal

    from mesh.tools.launcher import wait_flower_ready, wait_for
    from mesh.tools.launcher import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_REDIS_URL=redis_url, MESH_PREFIX=prefix, MESH_HEARTBEAT_INTERVAL_S="0.5", COLUMNS="200",
               MESH_GATEWAY_GRPC_PORT="0", MESH_GATEWAY_HTTP_PORT="0")  # fmt: skip
    out = tmp_path / "up.out"
    flower_port, exporter_port = free_port(), free_port()
    with open(out, "wb") as sink:
        up = subprocess.Popen(
            [str(MESH), "up", "--workers", "1", "--flower-port", str(flower_port), "--metrics-port", "0",
             "--exporter-port", str(exporter_port)],
            cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "Ctrl-C stops everything" in out.read_text() or up.poll() is not None,
                 timeout=120, interval=0.2, what="mesh up to start")  # fmt: skip
        text = out.read_text()
        assert up.poll() is None, text
        pids = [int(line.split("pid ")[1].split()[0]) for line in text.splitlines() if " pid " in line]
        names = [line.split()[0] for line in text.splitlines() if " pid " in line]
        assert names == ["worker-w1", "beat", "flower", "gateway"], text
        # the gateway answers on the ports it announced
        (gateway_line,) = [line for line in text.splitlines() if line.startswith("gateway") and "grpc " in line]
        http_url = gateway_line.split("http ", 1)[1].split()[0]
        assert requests.get(f"{http_url}/health/live", timeout=10).json() == {"live": True}
        status = subprocess.run([str(MESH), "status"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "w1@" in status.stdout, status.stdout + status.stderr
        # the mesh's signals: served by `mesh up` itself, and as JSON by `mesh status --json`
        assert f"http://127.0.0.1:{exporter_port}/metrics" in text, text
        signals = requests.get(f"http://127.0.0.1:{exporter_port}/metrics", timeout=10).text
        assert f'mesh_signals_up{{mesh="{prefix}"}} 1.0' in signals, signals
        as_json = subprocess.run([str(MESH), "status", "--json"], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        assert as_json.returncode == 0, as_json.stderr
        reading = json.loads(as_json.stdout)
        assert reading["prefix"] == prefix and reading["signals"]["workers"] == 1, reading
        assert [w["name"].split("@")[0] for w in reading["workers"]] == ["w1"], reading
        assert reading["workers"][0]["labels"] == {} and reading["signals"]["pools"][0]["pool"] == "default", reading
        assert reading["signals"]["pools"][0]["workers"] == 1, reading
        # Flower asks for the generated login, shown once, and refuses cross-site requests
        user, password = text.split("login ", 1)[1].split()[:3:2]
        api = f"http://127.0.0.1:{flower_port}/api/workers"
        wait_flower_ready(flower_port, timeout=60)
        assert requests.get(api, timeout=10).status_code == 401
        assert requests.get(api, auth=(user, "wrong"), timeout=10).status_code == 401
        assert requests.get(api, auth=(user, password), timeout=10).status_code == 200
        forged = requests.post(f"http://127.0.0.1:{flower_port}/api/task/async-apply/mesh.rebalance",
                               auth=(user, password), headers={"Sec-Fetch-Site": "cross-site"}, json={}, timeout=10)  # fmt: skip
        assert forged.status_code == 403
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
        assert up.wait(timeout=90) == 0, out.read_text()
    except BaseException:
        # stop everything it started before failing: Ctrl-C first (`mesh up` stops its
        # children, which run in sessions of their own and outlive a SIGKILL of its group: a
        # failed run left a worker and Flower behind), then SIGKILL, then its children by pid
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)
            try:
                up.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
        for line in out.read_text().splitlines():
            if " pid " in line:
                with contextlib.suppress(ProcessLookupError, ValueError, IndexError):
                    os.kill(int(line.split("pid ")[1].split()[0]), signal.SIGKILL)
        raise
    assert "stopped 4 processes" in out.read_text()
    for pid in pids:  # every child is gone (reaped by mesh up)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
