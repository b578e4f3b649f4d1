"""What the package's patches share (:mod:`.sdpa_patch`, :mod:`.layer_norm_patch`): reference-counted
replacement of module attributes by routers, and a once-per-reason fallback log.

Install / uninstall are counted per target under one lock (nest freely, from any thread); the last uninstall
puts back the exact object that was there before the first install.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

lock = threading.RLock()


@dataclass
class Patch:
    namespace: Any
    name: str
    original: Callable
    router: Callable
    count: int
    kind: str  # which patch installed it ("sdpa", "layer_norm")


#: (id(namespace), name) -> Patch, for every patched attribute of every patch
patches: dict = {}


def install_routers(targets: Iterable[tuple], make_router: Callable[[Callable], Callable], kind: str) -> None:
    """Replace each ``(namespace, name)`` of ``targets`` by ``make_router(original)`` (or count one more
    install of a replacement already there); ``kind`` names the patch."""
    with lock:
        for ns, name in targets:
            key = (id(ns), name)
            p = patches.get(key)
            if p is None:
                original = getattr(ns, name)
                router = make_router(original)
                setattr(ns, name, router)
                patches[key] = Patch(ns, name, original, router, 1, kind)
            elif p.kind != kind:
                raise RuntimeError(f"install: {getattr(ns, '__name__', ns)}.{name} is patched by the {p.kind} patch")
            else:
                p.count += 1


def uninstall_routers(targets: Iterable[tuple]) -> None:
    """Undo one :func:`install_routers` of each target; the last one restores the original object."""
    with lock:
        targets = list(targets)
        missing = [f"{getattr(ns, '__name__', ns)}.{n}" for ns, n in targets if (id(ns), n) not in patches]
        if missing:
            raise RuntimeError(f"uninstall: no matching install() for {', '.join(missing)}")
        for ns, name in targets:
            key = (id(ns), name)
            p = patches[key]
            p.count -= 1
            if p.count:
                continue
            del patches[key]
            if getattr(ns, name) is p.router:
                setattr(ns, name, p.original)
            else:
                warnings.warn(
                    f"flowmap_kernels: {getattr(ns, '__name__', ns)}.{name} was replaced by someone else after "
                    f"install(); leaving their object in place", RuntimeWarning, stacklevel=3)


def is_patched(namespace, name: str) -> bool:
    with lock:
        return (id(namespace), name) in patches


def patched_names(namespace, kind: str) -> list:
    """The attributes of ``namespace`` that the ``kind`` patch has replaced."""
    with lock:
        return [p.name for (i, _), p in patches.items() if i == id(namespace) and p.kind == kind]


class FallbackLog:
    """Calls a patch ran the original function for: counts per reason, one ``category`` warning per reason."""

    def __init__(self, function: str, category: type, consequence: str):
        self.function, self.category, self.consequence = function, category, consequence
        self._lock = threading.Lock()
        self._counts: dict = {}
        self._warned: set = set()

    def note(self, reason: str, message: str) -> None:
        _note(self, reason, message)

    def counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._warned.clear()


@torch.compiler.assume_constant_result  # under torch.compile: run once when traced (a lock does not trace)
def _note(log: FallbackLog, reason: str, message: str) -> None:
    with log._lock:
        log._counts[reason] = log._counts.get(reason, 0) + 1
        first = reason not in log._warned
        log._warned.add(reason)
    if first:
        warnings.warn(
            f"flowmap_kernels: {log.function} falls back to the original function: {message} "
            f"(warned once per reason; {log.consequence})", log.category, stacklevel=5)
