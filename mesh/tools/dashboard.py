"""`mesh status`: the pool at a glance, workers and models, as rich tables.

`render_status(client)` returns a rich renderable (the CLI prints it); `status_text(client)`
renders it to plain text. Reads are bulk (heartbeats, the registry, one pipeline of queue
lengths); per-model status is computed only for the rows shown.
"""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mesh.models import ModelRecord
from mesh.protocol.labels import format_labels
from mesh.tools.display import visible

if TYPE_CHECKING:
    from mesh.client import MeshClient


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _short(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(visible(n) for n in names[:limit])
    return shown + (f" +{len(names) - limit}" if len(names) > limit else "")


def _capacity_bar(used: int, capacity: int, width: int = 8) -> Text:
    """`█████░░░ 61% 1.3 GB`: green, yellow from 70 %, red from 90 %."""
    frac = min(1.0, used / capacity) if capacity else 0.0
    filled = round(frac * width)
    style = "red" if frac >= 0.9 else "yellow" if frac >= 0.7 else "green"
    bar = Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"), f" {frac * 100:.0f}% {_bytes(used)}")
    bar.no_wrap = True
    return bar


def _transitions_table(client: MeshClient, limit: int) -> Table | None:
    """VModels whose cutover is pending: active and target, the target's copies, since when."""
    pending = client.vmodels.vstore.pending_transitions()
    if not pending:
        return None
    table = Table(title=f"Transitions in progress ({len(pending)})", title_justify="left", expand=False)
    for col in ("VModel", "Active", "Target", "Target copies", "Transition", "Since"):
        table.add_column(col)
    for vmodel_id in pending[:limit]:
        st = client.get_vmodel_status(vmodel_id)
        if not st.in_transition:
            continue  # completed between the two reads
        rec = client.vmodels.get(vmodel_id)
        loaded = sum(1 for c in st.target_model_copies if c.state.value == "LOADED")
        need = max(1, sum(1 for c in st.active_model_copies if c.state.value == "LOADED"))
        word = st.transition_status or "-"
        table.add_row(
            visible(vmodel_id),
            f"{visible(st.active_model_id)} ({st.active_model_serving_state})",
            f"{visible(st.target_model_id)} ({st.target_model_serving_state})",
            f"{loaded}/{need} loaded",
            Text(word, style="red" if word == "BlockedByFailedLoad" else "cyan"),
            f"{time.time() - rec.updated_at:.0f}s ago" if rec else "-",
        )
    return table


def _queue_depths(client: MeshClient, model_ids: list[str]) -> dict[str, int]:
    steps = list(client.app.conf.broker_transport_options.get("priority_steps", [0]))
    out: dict[str, int] = {}
    # a thousand models per round trip: one pipeline for 100,000 would hold all the replies at once
    for i in range(0, len(model_ids), 1000):
        out.update(client.store.queue_depths(model_ids[i : i + 1000], steps))
    return out


def render_status(client: MeshClient, *, limit: int = 50) -> Any:
    """Workers (capacity, used, models, rate) and models (state, copies, rate, queue depth).

    Models are listed busiest first (request rate, then queue depth, then copies), at most
    `limit` of them; a footer says how many more there are.
    """
    workers = client.list_workers()
    records: list[ModelRecord] = client.list_models()
    ids = [r.model_id for r in records]
    depths = _queue_depths(client, ids)
    rate: dict[str, float] = {}
    loaded_on: dict[str, list[str]] = {}
    for w in workers:
        for m in w.models:
            rate[m.model_id] = rate.get(m.model_id, 0.0) + m.request_rate
            loaded_on.setdefault(m.model_id, []).append(w.name)

    wt = Table(title=f"Workers ({len(workers)})", title_justify="left", expand=False)
    for col, justify in (("Worker", "left"), ("State", "left"), ("Capacity", "right"), ("Used", "left"),
                         ("Models", "left"), ("Loading", "left"), ("Req/s", "right")):  # fmt: skip
        wt.add_column(col, justify=justify)  # type: ignore[arg-type]
    for w in sorted(workers, key=lambda w: w.name):
        ids_here = sorted((m.model_id for m in w.models), key=lambda m: -rate.get(m, 0.0))
        wt.add_row(
            # its pool (MESH_WORKER_LABELS); Text: rich would take "[...]" for markup
            Text(f"{visible(w.name)} [{visible(format_labels(w.labels))}]") if w.labels else visible(w.name),
            Text("draining", style="yellow") if w.shutting_down else Text("up", style="green"),
            _bytes(w.capacity_bytes),
            _capacity_bar(w.used_bytes, w.capacity_bytes),
            f"{len(w.models)}: {_short(ids_here)}" if w.models else "-",
            _short(sorted(w.loading)) if w.loading else "-",
            f"{w.request_rate:.1f}",
        )

    def busy(r: ModelRecord) -> tuple:
        m = r.model_id
        return (-rate.get(m, 0.0), -depths.get(m, 0), -len(loaded_on.get(m, [])), m)

    shown = sorted(records, key=busy)[:limit]
    mt = Table(title=f"Models ({len(records)})", title_justify="left", expand=False)
    for col, justify in (("Model", "left"), ("State", "left"), ("Copies", "left"), ("Failed", "right"),
                         ("Req/s", "right"), ("Queue", "right"), ("Min/Max", "right")):  # fmt: skip
        mt.add_column(col, justify=justify)  # type: ignore[arg-type]
    styles = {"Loaded": "green", "Loading": "cyan", "Standby": "dim", "FailedToLoad": "red"}
    for rec in shown:
        st = client.get_model_status(rec.model_id)
        words = st.state.serving_state
        copies = [f"{c.worker}{'' if c.state.value == 'LOADED' else ' (loading)'}" for c in st.copies]
        lo, hi = rec.info.min_copies, rec.info.max_copies
        mt.add_row(
            visible(rec.model_id),
            Text(words, style=styles.get(words, "")),
            f"{len(st.copies)}: {_short(copies, 3)}" if copies else "0",
            str(len(st.failed_copies)),
            f"{rate.get(rec.model_id, 0.0):.1f}",
            str(depths.get(rec.model_id, 0)),
            f"{'-' if lo is None else lo}/{'-' if hi is None else hi}",
        )
    parts: list[Any] = [wt, mt]
    if len(records) > len(shown):
        parts.append(Text(f"... and {len(records) - len(shown)} more models", style="dim"))
    transitions = _transitions_table(client, limit)
    if transitions is not None:
        parts.append(transitions)
    raw = client.store.last_rebalance()
    if raw:
        from mesh.control.rebalance import RebalanceReport

        last = RebalanceReport.model_validate_json(raw)
        ago = time.time() - last.started_at
        did = ", ".join(f"{k} {v}" for k, v in sorted(last.counts.items())) or "nothing to do"
        parts.append(Text(f"last rebalance {ago:.0f}s ago ({last.duration_s * 1000:.0f} ms): {did}", style="dim"))
    else:
        parts.append(Text("no rebalance has run yet (is celery beat running?)", style="dim"))
    return Group(*parts)


def status_text(client: MeshClient, *, width: int = 120, limit: int = 50) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(render_status(client, limit=limit))
    return console.export_text()


__all__ = ["render_status", "status_text"]
