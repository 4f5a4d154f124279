"""The worker's ports (workers/ports.py) and what implements them agree, method by method:
the real adapters (CeleryConsumer, MeshWorker) and the fakes the unit tests run the parts on.
A fake that drifted from the port would let a part's unit tests pass against an interface the
real worker does not have."""

from __future__ import annotations

import inspect

import pytest

from tests.unit.fakes import FakeConsumer, FakeEvents
from workers.consumer import CeleryConsumer
from workers.ports import ConsumerPort, CopyEvents
from workers.worker import MeshWorker


def _methods(protocol: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(fn)
        for name, fn in vars(protocol).items()
        if callable(fn) and not name.startswith("_")
    }


@pytest.mark.parametrize(
    ("protocol", "implementation"),
    [(ConsumerPort, CeleryConsumer), (ConsumerPort, FakeConsumer), (CopyEvents, MeshWorker), (CopyEvents, FakeEvents)],
)
def test_implementations_have_every_method_of_their_port(protocol, implementation):
    methods = _methods(protocol)
    assert methods, f"{protocol.__name__} declares no methods"
    for name, wanted in methods.items():
        have = getattr(implementation, name, None)
        assert callable(have), f"{implementation.__name__} lacks {protocol.__name__}.{name}"
        got = inspect.signature(have)
        assert list(got.parameters) == list(wanted.parameters), (
            f"{implementation.__name__}.{name}{got} does not match {protocol.__name__}.{name}{wanted}"
        )
        for p in wanted.parameters.values():
            if p.default is not inspect.Parameter.empty:
                assert got.parameters[p.name].default == p.default, f"{name}: default of {p.name}"
