"""Methods by name. A new method is one file with a `@register` dataclass: the runtime never changes."""
from __future__ import annotations

from typing import Callable

from edgekv.errors import EdgeKVError
from edgekv.methods.base import Method

METHODS: dict[str, Callable[..., Method]] = {}


def register(name: str, factory: Callable[..., Method] | None = None):
    """Register a Method class (decorator) or a factory under `name`."""

    def deco(obj):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = obj
        return obj

    return deco(factory) if factory is not None else deco


def get_method(name: str, **kwargs) -> Method:
    """An instance of the method called `name` with its defaults (overridden by kwargs)."""
    try:
        factory = METHODS[name]
    except KeyError:
        raise EdgeKVError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None
    return factory(**kwargs)


def uses_queries(name: str) -> bool:
    """Whether the method `name` reads a captured question window: it needs one, or (`auto`) picks by it.
    Without it a model can be loaded with no query capture (no per-node callback, no window batch)."""
    method = get_method(name)
    return method.needs_queries or hasattr(method, "resolve")
