"""What the `mesh` CLI shows for UTF-8 ids (mesh/tools/cli.py, mesh/tools/display.py): the id as
people wrote it, never its encoded form in queue names; columns that line up in display cells
whatever the id's characters (CJK, combining marks); ids that cannot pass for something else
(control characters, bidirectional overrides escaped). In the test process, on a real Redis, no
workers: the commands run through typer's runner with the module's console writing to a buffer."""

from __future__ import annotations

import io
import json
import time

import pytest
import redis
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from mesh.broker.transport import POP_AND_RECORD, pop_keys_args
from mesh.models import (
    CopyInfo, CopyState, LoadedModel, ModelInfo, ModelState, ModelStatus, VModelState, VModelStatus, WorkerState,
)  # fmt: skip
from mesh.protocol.ids import encode_id
from mesh.protocol.keys import Keys
from mesh.tools import cli
from mesh.tools.display import ljust_cells, visible

WIDE = "模型-一"  # two cells a character but the dash
ACCENTED = "modèle-入力"  # its queue holds mod%C3%A8le-%E5%85%A5%E5%8A%9B
COMBINING = "mode\u0301le"  # é as e + U+0301: seven code points, six cells
SEPARATORS = "│┃"


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """What the CLI prints, plain text, 200 columns wide."""
    buf = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=buf, width=200, markup=False, color_system=None))
    return buf


@pytest.fixture
def mesh(redis_url: str, prefix: str, shown: io.StringIO, monkeypatch: pytest.MonkeyPatch):
    """`mesh(*args)`: run a command on this test's mesh; returns what it printed."""
    from mesh import MeshClient

    # (not MESH_PREFIX: get_settings() and the default Celery app are made once a process)
    monkeypatch.setattr(cli, "_client", lambda: MeshClient(redis_url=redis_url, prefix=prefix))

    def run(*args: str) -> str:
        start = shown.tell()
        result = CliRunner().invoke(cli.app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        shown.seek(start)
        return shown.read()

    return run


def separator_columns(line: str) -> list[int]:
    """The display columns of a table line's cell separators."""
    return [cell_len(line[:i]) for i, ch in enumerate(line) if ch in SEPARATORS]


def assert_aligned(table: str) -> None:
    """Every row of a rich table has its separators at the header's display columns."""
    rows = [line for line in table.splitlines() if line and line[0] in SEPARATORS]
    assert len(rows) >= 2, table
    header = separator_columns(rows[0])
    assert len(header) >= 3, table
    for row in rows[1:]:
        assert separator_columns(row) == header, f"misaligned row {row!r} in\n{table}"


def rows_of(table: str) -> list[list[str]]:
    """The cells of a rich table's body rows, stripped."""
    rows = [line for line in table.splitlines() if line.startswith("│")]
    return [[c.strip() for c in line.strip(SEPARATORS).split("│")] for line in rows]


# ------------------------------------------------------------------ display helpers


def test_ljust_cells_pads_to_display_width_not_code_points():
    assert ljust_cells(WIDE, 10) == WIDE + "   "  # 7 cells + 3
    assert ljust_cells(COMBINING, 8) == COMBINING + "  "  # (str.ljust: one space)
    assert ljust_cells("x" * 12, 4) == "x" * 12  # never cut


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (WIDE, WIDE), (ACCENTED, ACCENTED), (COMBINING, COMBINING), ("🤖 bot", "🤖 bot"),
        ("a b:c*d/e?f%g", "a b:c*d/e?f%g"), ("👨\u200d👩", "👨\u200d👩"),  # a zero-width joiner is text
        ("a\x1b[31mred", "a\\x1b[31mred"), ("a\tb\nc", "a\\x09b\\x0ac"), ("x\u202eyz", "x\\u202eyz"),
        ("\x85", "\\x85"), ("id-\udcff", "id-\\udcff"),
    ],
)  # fmt: skip
def test_visible_escapes_only_what_is_not_text(text: str, expected: str):
    assert visible(text) == expected
    assert visible(expected) == expected


# ------------------------------------------------------------------ dead letters


def _dead_letter(r: redis.Redis, keys: Keys, queue: str, tag: str) -> None:
    """A message on `queue` dead-lettered by the pop script, as a worker's pop does it."""
    lst = keys.queue_list_key(queue, 0)
    envelope = {"body": "e30=", "headers": {"id": f"id-{tag}", "task": "mesh.infer"},
                "properties": {"delivery_tag": tag, "delivery_info": {"exchange": "", "routing_key": queue}}}  # fmt: skip
    r.lpush(lst, json.dumps(envelope))
    r.hset(keys.deliveries, tag, 5)
    k, a = pop_keys_args(keys.kombu_prefix, [lst], now=time.time(), most=1, holder="w1@h.a", max_deliveries=5)
    assert r.register_script(POP_AND_RECORD)(keys=k, args=a)[2::3] == [1]


def test_dead_letters_list_shows_the_decoded_model_id_and_json_keeps_the_queue(mesh, redis_url, prefix):
    r, keys = redis.Redis.from_url(redis_url), Keys(prefix)
    _dead_letter(r, keys, keys.model_queue(ACCENTED), "t-accented")
    _dead_letter(r, keys, keys.model_queue(WIDE), "t-wide")
    _dead_letter(r, keys, keys.model_queue("plain"), "t-plain")
    _dead_letter(r, keys, keys.worker_queue("w1@h"), "t-worker")
    _dead_letter(r, keys, f"{prefix}.model.%zz", "t-made-up")  # a producer's name, no id's encoding

    table = mesh("dead-letters", "list")
    assert "%C3" not in table and "%E5" not in table, table
    where = {row[1]: row[0] for row in rows_of(table)}
    assert where == {
        "t-accented": ACCENTED, "t-wide": WIDE, "t-plain": "plain",
        "t-worker": f"{prefix}.worker.w1@h", "t-made-up": f"{prefix}.model.%zz",  # other queues: their name
    }  # fmt: skip
    assert_aligned(table)

    entries = {e["tag"]: e for e in json.loads(mesh("dead-letters", "list", "--json"))}
    assert entries["t-accented"]["model"] == ACCENTED
    assert entries["t-accented"]["queue"] == f"{prefix}.model.{encode_id(ACCENTED)}" == keys.model_queue(ACCENTED)
    assert entries["t-accented"]["list"] == keys.model_queue(ACCENTED)
    assert entries["t-wide"]["model"] == WIDE and entries["t-plain"]["model"] == "plain"
    assert entries["t-worker"]["model"] is None and entries["t-worker"]["queue"] == f"{prefix}.worker.w1@h"
    assert entries["t-made-up"]["model"] is None and entries["t-made-up"]["queue"] == f"{prefix}.model.%zz"
    assert entries["t-wide"]["message"]["headers"]["id"] == "id-t-wide"


# ------------------------------------------------------------------ the other listings


def test_models_workers_and_status_show_ids_as_written_and_aligned(mesh, client, prefix):
    ids = [WIDE, ACCENTED, COMBINING, "plain-model"]
    for model_id in ids:
        client.register_model(model_id, ModelInfo(runtime="sklearn", uri="file:///nowhere/m.joblib"))
    now = time.time()
    loaded = [LoadedModel(model_id=m, size_bytes=2**20, last_used=now, loaded_at=now) for m in ids[:2]]
    client.store.write_heartbeat(
        WorkerState(name="w1@h", host="h", pid=1, capacity_bytes=2**30, used_bytes=2**21, models=loaded,
                    started_at=now, updated_at=now),
        ttl_s=60,
    )  # fmt: skip

    listing = mesh("models", "list")
    assert {row[0] for row in rows_of(listing)} == set(ids)
    assert "%" not in listing, listing
    assert_aligned(listing)

    workers = mesh("workers")
    assert f"{WIDE}, {ACCENTED}" in workers and "%" not in workers, workers
    assert_aligned(workers)

    status = mesh("status")
    assert all(m in status for m in ids) and "%E" not in status, status
    tables = ["┏" + t for t in status.split("┏")[1:]]  # each from its top border
    assert len(tables) == 2, status  # workers, models
    for table in tables:
        assert_aligned(table)


def test_vmodels_list_shows_ids_as_written_and_aligned(mesh, client):
    client.register_model(WIDE, ModelInfo(runtime="sklearn", uri="file:///nowhere/a.joblib"))
    client.register_model("plain-model", ModelInfo(runtime="sklearn", uri="file:///nowhere/b.joblib"))
    client.set_vmodel("虚拟-v", WIDE)
    client.set_vmodel("plain-v", "plain-model")
    listing = mesh("vmodels", "list")
    assert {(row[0], row[1]) for row in rows_of(listing)} == {("虚拟-v", WIDE), ("plain-v", "plain-model")}
    assert_aligned(listing)


def test_an_id_with_control_characters_cannot_pass_for_something_else(mesh, client):
    odd = "evil\x1b[2J\u202etxt.exe\nsecond line"
    client.register_model(odd, ModelInfo(runtime="sklearn", uri="file:///nowhere/m.joblib"))
    listing = mesh("models", "list")
    assert "\x1b" not in listing and "\u202e" not in listing
    assert "evil\\x1b[2J\\u202etxt.exe\\x0asecond line" in listing
    assert_aligned(listing)


# ------------------------------------------------------------------ status lines (no tables)


def _state_column(text: str, label: str, word: str) -> int:
    """The display column where `word` starts on the line labelled `label`."""
    [line] = [line for line in text.splitlines() if line.strip().startswith(label)]
    return cell_len(line[: line.index(word, len(label) + 2)])


@pytest.mark.parametrize(("active", "target"), [(WIDE, "plain-target"), ("plain", COMBINING), (WIDE * 5, "x")])
def test_vmodel_status_lines_up_the_states_of_wide_ids(shown, active, target):
    st = VModelStatus(
        vmodel_id="虚拟", status=VModelState.TRANSITIONING, active_model_id=active, target_model_id=target,
        active_model_state=ModelState.LOADED, target_model_state=ModelState.LOADING,
        active_model_copies=[CopyInfo(worker="w1@h", state=CopyState.LOADED, since=time.time())],
    )  # fmt: skip
    cli._print_vmodel_status(st)
    text = shown.getvalue()
    assert _state_column(text, "active", "Loaded") == _state_column(text, "target", "Loading"), text
    # a space between an id and its state, however long the id
    assert f"{active} " in text and f"{target} " in text, text


def test_model_status_lines_up_the_copies_of_wide_worker_names(shown):
    now = time.time()
    st = ModelStatus(model_id=WIDE, state=ModelState.LOADED, copies=[
        CopyInfo(worker="作業者-一@h", state=CopyState.LOADED, since=now),
        CopyInfo(worker="w2@h", state=CopyState.LOADING, since=now),
    ])  # fmt: skip
    cli._print_model_status(WIDE, st)
    text = shown.getvalue()
    lines = [line for line in text.splitlines() if line.strip().startswith("copy")]
    starts = {cell_len(line[: line.index("LOAD")]) for line in lines}
    assert len(lines) == 2 and len(starts) == 1, text
