"""Flower in a real browser: its tasks page shows a mesh request by model name.

Flower is started by the test (mesh.tools.launcher.start_flower) against a real worker; headless
Chromium (Debian's `chromium`, installed by scripts/ensure-test-tools) loads the pages. The
tasks page is rendered client-side from Flower's datatable API, so the DOM is dumped after a
virtual-time budget that lets those requests finish; a task's own page is server-rendered.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from mesh.tools.launcher import free_port, start_flower, wait_flower_ready, wait_for

from .test_foundation import seed_tensor, sklearn_info

MODEL = "mnist-svm"


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is not installed: run scripts/ensure-test-tools (apt-get install chromium)")
    return exe


def dump_dom(url: str, profile: Path, budget_ms: int = 5000) -> str:
    """The page's DOM after `budget_ms` of virtual time (scripts and XHRs run, no real wait)."""
    proc = subprocess.run(
        [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}", "--dump-dom", url,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


def test_flower_tasks_page_shows_the_request_by_model_name(client, workers, mesh_env, svm_path, seed_input, tmp_path):
    chromium()  # fail first, and clearly, if the browser is missing
    workers("w1")
    port = free_port()
    flower = start_flower(mesh_env, tmp_path / "logs", port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_flower_ready(port, flower)
        client.register_model(MODEL, sklearn_info(svm_path))
        result = client.infer(model_id=MODEL, inputs=[seed_tensor(seed_input)])
        assert result.get(timeout=60)["outputs"][0]["data"] == [8]

        def succeeded() -> bool:
            task = requests.get(f"{base}/api/task/info/{result.id}", timeout=5)
            return task.status_code == 200 and task.json().get("state") == "SUCCESS"

        wait_for(succeeded, timeout=60, interval=0.2, what="flower to see the request succeed")

        tasks_page = dump_dom(f"{base}/tasks", tmp_path / "chromium")
        assert f"mesh.infer[{MODEL}]" in tasks_page, tasks_page[-3000:]
        assert result.id in tasks_page

        task_page = dump_dom(f"{base}/task/{result.id}", tmp_path / "chromium")
        assert f"mesh.infer[{MODEL}]" in task_page, task_page[-3000:]
        assert "SUCCESS" in task_page
    finally:
        flower.stop()
