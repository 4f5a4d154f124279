"""workers/consumer.py: the ConsumerPort over a (fake) Celery consumer: FIFO callbacks on the
consumer thread, queue consumption and its declare cache, QoS, requeues and the event buffer
(no worker, no Redis)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import redis
from celery.worker import state as worker_state

from mesh.models import Command
from mesh.protocol.keys import Keys
from workers.batcher import Batcher, BatchPolicy, Pending
from workers.consumer import COMMAND_ACK_DELAY_S, EVENT_BUFFER_LIMIT, EVENT_FLUSH_DELAY_S, CeleryConsumer
from workers.metrics import WorkerMetrics

KEYS = Keys("tcons")
NAME = "w1@test"


class FakeTaskConsumer:
    def __init__(self) -> None:
        self.queues: set[str] = set()
        self.auto_declare = True

    def consuming_from(self, queue: str) -> bool:
        return queue in self.queues


class FakeQoS:
    """kombu.common.QoS: `set` applies a count to the channel (`prev`); Celery's event loop
    applies `value` whenever the two differ (celery/worker/loops.py), as `update` does."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.prev = value  # applied by the loop's first turn
        self.sets: list[int] = []

    def set(self, value: int) -> None:
        self.sets.append(value)
        self.prev = value

    def update(self) -> None:
        self.set(self.value)


class FakeCeleryConsumer:
    """Celery's Consumer as CeleryConsumer uses it; `call_soon` only collects (the hub)."""

    def __init__(self) -> None:
        self.ready: list[tuple] = []
        self.lock = threading.Lock()
        self.task_consumer = FakeTaskConsumer()
        self.added: list[tuple[str, bool]] = []  # (queue, auto_declare during the add)
        self.cancelled: list[str] = []
        self.qos = FakeQoS(64)
        self.event_dispatcher = None

    def call_soon(self, fn, *args) -> None:
        with self.lock:
            self.ready.append((fn, args))

    def run_ready(self, reverse: bool = False) -> int:
        """Run the collected callbacks like kombu's hub: in any order (a set)."""
        with self.lock:
            todo, self.ready = self.ready, []
        for fn, args in reversed(todo) if reverse else todo:
            fn(*args)
        return len(todo)

    def add_task_queue(self, queue: str) -> None:
        self.added.append((queue, self.task_consumer.auto_declare))
        self.task_consumer.queues.add(queue)

    def cancel_task_queue(self, queue: str) -> None:
        self.cancelled.append(queue)
        self.task_consumer.queues.discard(queue)


class Req:
    """A Celery request as requeue reads it (hashable, like Celery's)."""

    def __init__(self, id: str, model_id: str) -> None:
        self.id = id
        self.delivery_info = {"routing_key": KEYS.model_queue(model_id)}
        self.rejected: list[bool] = []

    def reject(self, requeue: bool = False) -> None:
        self.rejected.append(requeue)


@pytest.fixture
def metrics():
    m = WorkerMetrics(NAME, port=0)
    yield m
    m.close()


@pytest.fixture
def celery_consumer():
    return FakeCeleryConsumer()


@pytest.fixture
def batcher():
    b = Batcher(lambda models: {m: 0 for m in models})
    yield b
    b.stop()


@pytest.fixture
def sent():
    return []


def make(celery_consumer, batcher, metrics, sent, prefetch_floor=64, send=None, max_buffered_bytes=0,
         max_message_bytes=0):  # fmt: skip
    return CeleryConsumer(
        celery_consumer, KEYS, NAME, batcher, metrics,
        send or (lambda worker, cmd: sent.append((worker, cmd))), prefetch_floor,
        max_buffered_bytes, max_message_bytes,
    )  # fmt: skip


@pytest.fixture
def port(celery_consumer, batcher, metrics, sent):
    return make(celery_consumer, batcher, metrics, sent)


# ------------------------------------------------------------------ call_soon


def test_call_soon_runs_on_the_hub_in_call_order_whatever_order_the_hub_picks(port, celery_consumer):
    ran = []
    for i in range(5):
        port.call_soon(ran.append, i)
    assert ran == []  # only scheduled: the consumer thread runs them
    assert celery_consumer.run_ready(reverse=True) == 5
    assert ran == [0, 1, 2, 3, 4]


def test_a_failing_callback_does_not_drop_the_later_ones(port, celery_consumer):
    ran = []

    def boom():
        raise RuntimeError("callback failed")

    port.call_soon(ran.append, "first")
    port.call_soon(boom)
    port.call_soon(ran.append, "after")
    celery_consumer.run_ready(reverse=True)
    assert ran == ["first", "after"]
    port.call_soon(ran.append, "next time")  # and the FIFO keeps working
    celery_consumer.run_ready()
    assert ran == ["first", "after", "next time"]


# ------------------------------------------------------------------ consume / stop


def test_consume_adds_the_model_queue_once_and_wakes_our_own_consumer(port, celery_consumer, sent):
    queue = KEYS.model_queue("m")
    port.consume("m")
    assert celery_consumer.added == []  # nothing touches the channel off the consumer thread
    assert sent == [(NAME, Command(op="wake", model_id="m"))]
    celery_consumer.run_ready()
    assert celery_consumer.added == [(queue, True)]  # first time: declared
    port.consume("m")
    celery_consumer.run_ready()
    assert celery_consumer.added == [(queue, True)]  # already consuming: not added again


def test_consume_without_wake_sends_no_command(port, celery_consumer, sent):
    port.consume("m", wake=False)
    celery_consumer.run_ready()
    assert sent == []
    assert celery_consumer.added == [(KEYS.model_queue("m"), True)]


def test_a_failed_wake_only_costs_the_polling_interval(celery_consumer, batcher, metrics):
    def send(worker, cmd):
        raise ConnectionError("redis down")

    port = make(celery_consumer, batcher, metrics, [], send=send)
    port.consume("m")  # does not raise
    celery_consumer.run_ready()
    assert celery_consumer.added == [(KEYS.model_queue("m"), True)]


def test_a_queue_declared_before_is_added_without_declaring_it_again(port, celery_consumer):
    queue = KEYS.model_queue("m")
    port.consume("m")
    celery_consumer.run_ready()
    port.stop_consuming("m")
    celery_consumer.run_ready()
    assert celery_consumer.cancelled == [queue]
    port.consume("m")
    celery_consumer.run_ready()
    assert celery_consumer.added == [(queue, True), (queue, False)]
    assert celery_consumer.task_consumer.auto_declare is True  # restored after the add


class RefusingDeclares(FakeCeleryConsumer):
    """Redis refuses the declare's write (out of memory, here), as Celery's add_task_queue
    raises it: before the queue is added to the consumer set."""

    connection_errors = (ConnectionError,)

    def add_task_queue(self, queue: str) -> None:
        if self.task_consumer.auto_declare:
            self.added.append((queue, True))
            raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
        super().add_task_queue(queue)


def test_a_declare_redis_refuses_still_consumes_the_queue(batcher, metrics, caplog):
    """A failed declare left the model LOADED with its queue consumed by nobody: its requests
    waited forever. The declare only writes kombu's binding table, so the queue is consumed
    without it (and the declare is tried again at the next consume)."""
    celery_consumer = RefusingDeclares()
    port = make(celery_consumer, batcher, metrics, [])
    queue = KEYS.model_queue("m")
    port.consume("m")
    celery_consumer.run_ready()
    assert celery_consumer.task_consumer.consuming_from(queue)
    assert celery_consumer.added == [(queue, True), (queue, False)]
    assert celery_consumer.task_consumer.auto_declare is True
    assert any("declaring queue" in r.getMessage() and "OOM" in r.getMessage() for r in caplog.records)
    port.stop_consuming("m")
    port.consume("m")
    celery_consumer.run_ready()
    assert celery_consumer.added[2:] == [(queue, True), (queue, False)]  # not remembered as declared


def test_a_connection_error_while_declaring_is_left_to_celery(batcher, metrics):
    """A lost connection is Celery's to handle (it reconnects and consumes every queue again)."""

    class Disconnected(FakeCeleryConsumer):
        connection_errors = (ConnectionError,)

        def add_task_queue(self, queue: str) -> None:
            raise ConnectionError("redis down")

    celery_consumer = Disconnected()
    port = make(celery_consumer, batcher, metrics, [])
    with pytest.raises(ConnectionError):
        port._add_queue(KEYS.model_queue("m"))


def test_forget_declared_declares_that_queue_afresh(port, celery_consumer):
    qm, qn = KEYS.model_queue("m"), KEYS.model_queue("n")
    for model in ("m", "n"):
        port.consume(model)
    celery_consumer.run_ready()
    for model in ("m", "n"):
        port.stop_consuming(model)
    port.forget_declared("m")  # on the consumer thread, in order with the rest
    celery_consumer.run_ready()
    for model in ("m", "n"):
        port.consume(model)
    celery_consumer.run_ready()
    assert celery_consumer.added[2:] == [(qm, True), (qn, False)]


def test_forget_every_declared_queue(port, celery_consumer):
    qm = KEYS.model_queue("m")
    port.consume("m")
    celery_consumer.run_ready()
    port.stop_consuming("m")
    celery_consumer.run_ready()
    port.forget_declared()  # None: all of them (a Redis that came back lost the bindings)
    port.consume("m")
    celery_consumer.run_ready()
    assert celery_consumer.added == [(qm, True), (qm, True)]


def test_stop_consuming_cancels_only_a_queue_being_consumed(port, celery_consumer):
    port.stop_consuming("never-consumed")
    celery_consumer.run_ready()
    assert celery_consumer.cancelled == []
    port.consume("m")
    port.stop_consuming("m")
    port.stop_consuming("m")
    celery_consumer.run_ready(reverse=True)  # still add, cancel, (nothing) in call order
    assert celery_consumer.cancelled == [KEYS.model_queue("m")]


def test_no_task_consumer_yet_means_nothing_is_added_or_cancelled(port, celery_consumer):
    celery_consumer.task_consumer = None
    port.consume("m")
    port.stop_consuming("m")
    celery_consumer.run_ready()
    assert celery_consumer.added == [] and celery_consumer.cancelled == []


# ------------------------------------------------------------------ prefetch


def test_prefetch_is_twice_the_served_batch_sizes_above_the_floor(port, celery_consumer, batcher):
    port.update_prefetch()
    celery_consumer.run_ready()
    assert celery_consumer.qos.sets == []  # nothing served: the floor (64), already set
    batcher.open("a", BatchPolicy(max_batch_size=8, max_batch_delay_s=0.0))
    batcher.open("b", BatchPolicy(max_batch_size=32, max_batch_delay_s=0.0))
    port.update_prefetch()
    celery_consumer.run_ready()
    assert celery_consumer.qos.sets == [2 * (8 + 32)]
    batcher.close("b")
    port.update_prefetch()
    celery_consumer.run_ready()
    assert celery_consumer.qos.sets == [80, 64]  # back to the floor, not 16


def test_prefetch_floor_wins_over_a_small_budget(celery_consumer, batcher, metrics, sent):
    port = make(celery_consumer, batcher, metrics, sent, prefetch_floor=100)
    batcher.open("a", BatchPolicy(max_batch_size=8, max_batch_delay_s=0.0))
    port.update_prefetch()
    celery_consumer.run_ready()
    assert celery_consumer.qos.sets == [100]


def test_prefetch_set_by_the_worker_is_celerys_qos_value_too(port, celery_consumer, batcher):
    """Celery's event loop applies `qos.value` whenever it differs from what was set last
    (celery/worker/loops.py): a prefetch set without it was undone on the next loop turn."""
    batcher.open("a", BatchPolicy(max_batch_size=40, max_batch_delay_s=0.0))
    port.update_prefetch()
    celery_consumer.run_ready()
    assert celery_consumer.qos.value == celery_consumer.qos.prev == 80


MB = 1_000_000


def buffer(port, batcher, n: int, nbytes: int) -> None:
    """`n` requests of `nbytes` arrive (the consumer thread's on_request)."""
    for i in range(n):
        assert batcher.add("big", Req(f"r{i}", "big"), nbytes=nbytes)
        port.admitted(nbytes)


def test_the_byte_bound_lowers_the_prefetch_to_what_still_fits(celery_consumer, metrics, sent):
    """Issue 21, finding 6: a worker took a prefetch's worth of 16 MB requests (~9 GiB)."""
    batcher = Batcher(lambda models: {m: 0 for m in models}, on_release=lambda n: port.released(n))
    port = make(celery_consumer, batcher, metrics, sent, max_buffered_bytes=10 * MB, max_message_bytes=MB)
    batcher.open("big", BatchPolicy(max_batch_size=32, max_batch_delay_s=60.0))
    port.update_prefetch()
    celery_consumer.run_ready()
    assert celery_consumer.qos.value == 10  # 10 messages of the estimated size fit, not 64
    buffer(port, batcher, 4, MB)
    assert celery_consumer.qos.value == 4 + 6  # the 4 held and 6 more
    buffer(port, batcher, 6, MB)
    assert batcher.buffered_bytes() == 10 * MB
    assert celery_consumer.qos.value == 10  # full: nothing more until the buffer drains
    assert metrics.registry.get_sample_value("mesh_buffered_bytes_max") == 10 * MB
    # a batch taken frees room: computed again on the consumer thread
    assert len(batcher.take(timeout=5).items) == 10  # idle: its queue is empty
    assert celery_consumer.run_ready() == 1
    # its 10 messages are still unacked: they take the room until acked, not more
    assert celery_consumer.qos.value == 10


def test_small_requests_keep_the_whole_budget(celery_consumer, batcher, metrics, sent):
    port = make(celery_consumer, batcher, metrics, sent, max_buffered_bytes=256 * MB, max_message_bytes=32 * MB)
    batcher.open("big", BatchPolicy(max_batch_size=32, max_batch_delay_s=60.0))
    port.update_prefetch()
    celery_consumer.run_ready()
    assert celery_consumer.qos.value == 8  # at first a message may be as large as accepted
    buffer(port, batcher, 40, 1000)  # the size estimate comes down with every small message
    assert celery_consumer.qos.value == 64  # the batch budget, the bytes no longer bind


# ------------------------------------------------------------------ requeue


def requeued(metrics, model):
    return metrics.registry.get_sample_value("mesh_requests_total", {"model": model, "outcome": "requeued"})


def test_requeue_now_rejects_with_requeue_and_counts_it(port, celery_consumer, metrics):
    reqs = [Req("r1", "m"), Req("r2", "m"), Req("r3", "other"), Req("r4", "forged")]
    metrics.sweep(["m", "other"])  # served here; "forged" is not
    for r in reqs:
        worker_state.task_reserved(r)
    try:
        port.requeue([Pending(r) for r in reqs], now=True)
        assert [r.rejected for r in reqs] == [[True], [True], [True], [True]]
        assert celery_consumer.ready == []  # on this (the consumer) thread, at once
        assert requeued(metrics, "m") == 2 and requeued(metrics, "other") == 1
        # a routing key names no label of its own unless its model is served here
        assert requeued(metrics, "forged") is None and requeued(metrics, "_unknown") == 1
        # no longer among Celery's reserved requests (else they would leak there)
        assert not any(r in worker_state.reserved_requests for r in reqs)
    finally:
        for r in reqs:
            worker_state.task_ready(r)


def test_requeue_from_another_thread_goes_through_the_consumer_thread(port, celery_consumer, metrics):
    r = Req("r1", "m")
    metrics.sweep(["m"])  # served here
    port.requeue([Pending(r)])
    assert r.rejected == []
    celery_consumer.run_ready()
    assert r.rejected == [True]
    assert requeued(metrics, "m") == 1


def test_requeue_with_wait_returns_once_the_consumer_thread_rejected(port, celery_consumer):
    r = Req("r1", "m")
    stop = threading.Event()

    def hub():
        while not stop.is_set():
            celery_consumer.run_ready()
            stop.wait(0.01)  # the hub's next loop turn

    t = threading.Thread(target=hub, daemon=True)
    t.start()
    try:
        port.requeue([Pending(r)], wait_s=5)
        assert r.rejected == [True]
    finally:
        stop.set()
        t.join(5)


def test_requeue_of_nothing_does_nothing(port, celery_consumer, metrics):
    port.requeue([], now=True)
    port.requeue([])
    assert celery_consumer.ready == []
    assert requeued(metrics, "m") is None


# ------------------------------------------------------------------ events


def test_event_dispatcher_buffers_mesh_events_with_the_task_events(port, celery_consumer):
    assert port.event_dispatcher() is None
    d = SimpleNamespace(on_send_buffered=lambda: None, buffer_group={"task"}, buffer_limit=24)
    celery_consumer.event_dispatcher = d
    assert port.event_dispatcher() is d
    assert d.buffer_group == {"task", "mesh"}
    assert d.buffer_limit == EVENT_BUFFER_LIMIT
    assert port.event_dispatcher() is d and d.buffer_group == {"task", "mesh"}


class FakeHub:
    """kombu's Hub, as far as a delayed call goes: `call_later` only records it."""

    def __init__(self) -> None:
        self.later: list[tuple[float, object, tuple]] = []

    def call_later(self, delay, fn, *args):
        self.later.append((delay, fn, args))

    def run_due(self) -> None:
        due, self.later = self.later, []
        for _, fn, args in due:
            fn(*args)


class FakeDispatcher:
    """Celery's EventDispatcher, as far as buffering goes: each buffered event calls
    `on_send_buffered`, `flush` publishes what is buffered."""

    def __init__(self, on_send_buffered) -> None:
        self.on_send_buffered = on_send_buffered
        self.buffer_group, self.buffer_limit = {"task"}, 24
        self.buffered, self.published = 0, []

    def send(self) -> None:
        self.buffered += 1
        self.on_send_buffered()

    def flush(self) -> None:
        self.published.append(self.buffered)
        self.buffered = 0


def test_events_of_many_requests_share_one_delayed_flush(port, celery_consumer):
    celery_consumer.hub = hub = FakeHub()
    celery_consumer.event_dispatcher = d = FakeDispatcher(lambda: pytest.fail("Celery's per-turn flush"))
    port.event_dispatcher()
    for _ in range(9):  # three requests' received/started/succeeded
        d.send()
    assert [(delay, args) for delay, _, args in hub.later] == [(EVENT_FLUSH_DELAY_S, (d,))]
    hub.run_due()
    assert d.published == [9]
    d.send()  # the next event schedules the next flush
    assert len(hub.later) == 1
    hub.run_due()
    assert d.published == [9, 1]


def test_a_lost_flush_timer_does_not_hold_events_back(port, celery_consumer):
    celery_consumer.hub = hub = FakeHub()
    celery_consumer.event_dispatcher = d = FakeDispatcher(lambda: None)
    port.event_dispatcher()
    d.send()
    hub.later.clear()  # the timer went with a lost connection: the flush never runs
    d.send()
    assert hub.later == [], "a flush is still due: no second one yet"
    port._flush_scheduled_at -= 5.0  # long past its delay
    d.send()
    assert len(hub.later) == 1
    hub.run_due()
    assert d.published == [3]


def test_an_unbuffered_dispatcher_is_left_alone(port, celery_consumer):
    d = SimpleNamespace(on_send_buffered=None, buffer_group=set(), buffer_limit=24)
    celery_consumer.event_dispatcher = d
    assert port.event_dispatcher() is d
    assert d.buffer_group == set() and d.buffer_limit == 24


# ------------------------------------------------------------------ command acks


class CommandMessage:
    """A kombu message of another transport (so `ack_many` acks it by itself)."""

    def __init__(self, fail: bool = False) -> None:
        self.channel = SimpleNamespace(qos=None)
        self.acknowledged = False
        self.fail = fail

    def ack(self) -> None:
        if self.fail:
            raise ConnectionError("lost")
        self.acknowledged = True


def test_commands_are_acked_together_after_a_delay(port, celery_consumer):
    celery_consumer.hub = hub = FakeHub()
    messages = [CommandMessage() for _ in range(3)]
    for m in messages:
        port.ack_soon(m)
    assert [(delay, fn) for delay, fn, _ in hub.later] == [(COMMAND_ACK_DELAY_S, port.flush_acks)]
    assert not any(m.acknowledged for m in messages), "acked one by one"
    hub.run_due()
    assert all(m.acknowledged for m in messages)
    later = CommandMessage()
    port.ack_soon(later)  # the next command schedules the next flush
    assert len(hub.later) == 1
    hub.run_due()
    assert later.acknowledged


def test_without_an_event_loop_a_command_is_acked_at_once(port, celery_consumer):
    m = CommandMessage()
    port.ack_soon(m)
    assert m.acknowledged


def test_a_lost_ack_timer_does_not_hold_acks_back(port, celery_consumer):
    celery_consumer.hub = hub = FakeHub()
    first = CommandMessage()
    port.ack_soon(first)
    hub.later.clear()  # the timer went with a lost connection
    port._acks_scheduled_at -= 5.0  # long past its delay
    second = CommandMessage()
    port.ack_soon(second)
    hub.run_due()
    assert first.acknowledged and second.acknowledged


def test_acks_held_across_a_lost_connection_are_dropped_and_a_failed_ack_is_logged(port, celery_consumer, caplog):
    celery_consumer.hub = hub = FakeHub()
    gone = CommandMessage()
    port.ack_soon(gone)
    port.drop_acks()  # the connection was lost: Redis puts the message back
    hub.run_due()
    assert not gone.acknowledged
    port.ack_soon(CommandMessage(fail=True))
    hub.run_due()  # nothing raised into the event loop
    assert "acking 1 command(s) failed" in caplog.text
