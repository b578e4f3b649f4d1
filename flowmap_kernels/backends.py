"""Backend registry: one place that decides which implementation runs an op.

Every op (attention, modulated_layer_norm, ...) owns an :class:`OpRegistry`. Implementations register
under a backend name; :func:`use_backend` / :func:`set_backend` select a name for all ops at once.

Names
-----
``"auto"``      each op's own preference list, first implementation that is available and supports the
                inputs (attention: Triton for CUDA tensors, else the blockwise PyTorch path).
``"naive"``     plain differentiable PyTorch ops: the reference.
``"torch"``     exact fused formulas written in PyTorch (attention: blockwise, memory linear in N).
``"triton"``    Triton kernels (CUDA tensors).
``"extension"`` the compiled C++/CUDA extension (DiT primitives).

A name selects the implementation of every op that has one under that name; an op without it (say
``"triton"`` for a normalisation) uses its automatic choice. A name that an op has but cannot run on the
given inputs is an error that says why, never a silent fallback.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

BACKEND_NAMES = ("auto", "naive", "torch", "triton", "extension")

_state = threading.local()
_global_default = ["auto"]


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend: unknown name {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    return name


def get_backend() -> str:
    """The backend name in force in this thread (``use_backend`` scope, else ``set_backend``'s)."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _global_default[0]


def set_backend(name: str) -> None:
    """Select the backend for all ops process-wide (``use_backend`` scopes still take precedence)."""
    _global_default[0] = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: run ops with backend ``name`` inside the block (thread-local, nests)."""
    _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


class BackendUnavailableError(RuntimeError):
    """The selected backend cannot run this call (not installed, wrong device, unsupported option)."""


@dataclass
class Implementation:
    """One backend's implementation of an op.

    ``available()`` says whether it can run in this install at all (cached); ``supports(explicit=...,
    **problem)`` returns ``None`` when it can run the given problem, else a short reason (``explicit`` is
    True when the user named this backend, False when "auto" is choosing).
    """

    backend: str
    impl: Any
    available: Callable[[], bool] = lambda: True
    supports: Callable[..., Optional[str]] = lambda explicit=False, **_: None
    _available_cache: Optional[bool] = field(default=None, repr=False)

    def is_available(self) -> bool:
        if self._available_cache is None:
            try:
                self._available_cache = bool(self.available())
            except Exception:  # an import or probe failing means "not available", not a crash
                self._available_cache = False
        return self._available_cache


class OpRegistry:
    """Implementations of one op, keyed by backend name, with the op's ``auto`` preference order."""

    def __init__(self, op: str, auto_order: tuple[str, ...]):
        self.op = op
        self.auto_order = auto_order
        self.impls: dict[str, Implementation] = {}
        _REGISTRIES[op] = self

    def register(self, backend: str, impl: Any, *, available=None, supports=None) -> None:
        if backend == "auto" or backend not in BACKEND_NAMES:
            raise ValueError(f"register: backend must be one of {BACKEND_NAMES[1:]}, got {backend!r}")
        kwargs = {}
        if available is not None:
            kwargs["available"] = available
        if supports is not None:
            kwargs["supports"] = supports
        self.impls[backend] = Implementation(backend, impl, **kwargs)

    def usable(self) -> list[str]:
        """Backend names with an implementation that is available in this install."""
        return [n for n, i in self.impls.items() if i.is_available()]

    def resolve(self, name: Optional[str] = None, **problem) -> Implementation:
        """The implementation to run for ``problem`` under backend ``name`` (default: the one in force)."""
        name = _check_name(name or get_backend())
        if name != "auto" and name in self.impls:
            impl = self.impls[name]
            if not impl.is_available():
                raise BackendUnavailableError(f"{self.op}: backend {name!r} is not available in this install")
            reason = impl.supports(explicit=True, **problem)
            if reason is not None:
                raise BackendUnavailableError(f"{self.op}: backend {name!r} cannot run this call: {reason}")
            return impl
        reasons = []
        for cand in self.auto_order:
            impl = self.impls.get(cand)
            if impl is None or not impl.is_available():
                continue
            reason = impl.supports(explicit=False, **problem)
            if reason is None:
                return impl
            reasons.append(f"{cand}: {reason}")
        raise BackendUnavailableError(f"{self.op}: no backend can run this call ({'; '.join(reasons)})")

    def backend_name(self, name: Optional[str] = None, **problem) -> str:
        """The name of :meth:`resolve`'s implementation: an op's single dispatch point. While torch.compile
        traces, the choice is made eagerly (:func:`_resolve_outside_trace`) and is a constant of the graph."""
        if torch.compiler.is_compiling():
            return _resolve_outside_trace(self.op, name or get_backend(), **problem)
        return self.resolve(name, **problem).backend


_REGISTRIES: dict[str, OpRegistry] = {}


@torch.compiler.assume_constant_result
def _resolve_outside_trace(op: str, name: str, **problem) -> str:
    """``OpRegistry.resolve`` run outside Dynamo's trace: the first resolution probes availability with importlib
    (e.g. ``import triton``), which Dynamo cannot trace (a graph break under fullgraph=True). The name is a
    constant of the compiled graph; guards still cover the problem's fields (constants: no symbolic size, see
    :func:`flowmap_kernels._autodiff.concrete_int`), dtype and device."""
    return _REGISTRIES[op].resolve(name, **problem).backend
