"""Which config keys a piece of code reads: `recording` wraps a frozen dataclass config so that
every leaf key read from it is noted; code that serialises a whole config (records, fingerprints)
runs `paused`. The tests use it to hold each step's declared params (dseh.stages.STAGE_PARAMS) to
what the step really reads."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
_paused = threading.local()


@contextmanager
def paused() -> Iterator[None]:
    """Reads inside this block are not recorded (serialising a whole config is not a use of it)."""
    _paused.depth = getattr(_paused, "depth", 0) + 1
    try:
        yield
    finally:
        _paused.depth -= 1


def recording(cfg: T) -> tuple[T, set[str]]:
    """A copy of the dataclass `cfg` that adds every leaf key read from it (`labnet.beta`, ...) to
    the returned set."""
    keys: set[str] = set()

    def wrap(obj: Any, prefix: str) -> Any:
        cls = type(obj)

        def getattribute(self: Any, name: str) -> Any:
            v = object.__getattribute__(self, name)
            if name in cls.__dataclass_fields__ and not dataclasses.is_dataclass(v):
                if not getattr(_paused, "depth", 0):
                    keys.add(prefix + name)
            return v

        sub = type(cls.__name__, (cls,), {"__getattribute__": getattribute})
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}
        return sub(**{k: wrap(v, f"{prefix}{k}.") if dataclasses.is_dataclass(v) else v for k, v in values.items()})

    with paused():
        return wrap(cfg, ""), keys
