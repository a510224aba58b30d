"""Providers and dispatch: every op is one function, each backend a `Provider` that implements it."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

OPS = ("rms_norm", "apply_rope", "swiglu", "geglu", "fused_linear_cross_entropy", "linear_log_probs", "lora_linear",
       "lora_mlp")


class BackendError(RuntimeError):
    """A backend was asked for that cannot run the op on the tensor's device."""


@dataclass(frozen=True)
class Provider:
    """Implementations of some ops for some devices.

    `devices` are the device types it can run on (None: any). `auto_devices` are those where
    `backend="auto"` may pick it; among those, the highest `priority` that has the op wins.
    `overrides=True` lets a plugin replace a provider of the same name; `check(device_type)`, when
    given, says why the provider cannot run there (or None), for conditions beyond the device.
    """

    name: str
    ops: Mapping[str, Callable] = field(default_factory=dict)
    devices: tuple[str, ...] | None = None
    auto_devices: tuple[str, ...] = ()
    priority: int = 0
    description: str = ""
    overrides: bool = False
    check: Callable[[str], str | None] | None = None  # replaces the `devices` test when given

    def unavailable(self, device_type: str) -> str | None:
        """Why this provider cannot run on `device_type`, or None when it can."""
        if self.check is not None:
            return self.check(device_type)
        if self.devices is None or device_type in self.devices:
            return None
        return f"backend {self.name!r} runs on {', '.join(self.devices)}, not on {device_type!r}"


def _providers() -> dict[str, Provider]:
    from patchkit.plugins import manager

    return manager().providers


_resolved: dict[tuple[str, str, str], Callable] = {}  # a plain dict: torch.compile traces through it


def resolve(op: str, backend: str, device_type: str) -> Callable:
    """The implementation of `op` that `backend` gives for `device_type` (cached; see `clear_cache`)."""
    key = (op, backend, device_type)
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _resolve(op, backend, device_type)
    return fn


def _resolve(op: str, backend: str, device_type: str) -> Callable:
    """`auto`: the highest-priority provider offered there that has the op, else torch's. An explicit backend: its
    implementation, after checking it can run on the device (a `BackendError` says why not); an op it lacks runs the
    `torch` provider's, which has every op (the LoRA ops, matmuls, are torch's alone)."""
    providers = _providers()
    if backend == "auto":
        candidates = [p for p in providers.values()
                      if op in p.ops and device_type in p.auto_devices and p.unavailable(device_type) is None]
        if not candidates:
            candidates = [providers["torch"]]
        return max(candidates, key=lambda p: p.priority).ops[op]
    provider = providers.get(backend)
    if provider is None:
        raise BackendError(f"unknown backend {backend!r}; known backends: auto, {', '.join(providers)}")
    reason = provider.unavailable(device_type)
    if reason:
        raise BackendError(f"{reason}; use backend='auto' or move the model to a supported device")
    if op not in provider.ops and op in providers["torch"].ops:
        return providers["torch"].ops[op]
    if op not in provider.ops:
        raise BackendError(f"backend {backend!r} has no {op!r}; it provides {', '.join(provider.ops)}")
    return provider.ops[op]


def clear_cache() -> None:
    _resolved.clear()


def device_types() -> list[str]:
    """The device types a model can be on here: cpu, and the accelerator torch sees (cuda, xpu, mps...)."""
    types = ["cpu"]
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is not None and accelerator.type not in types:
        types.append(accelerator.type)
    return types


def prepare(backend: str) -> None:
    """Resolve every op of `backend` for every device type here, when a patch is applied: a forward (eager or
    compiled) then only reads a dict. A backend that cannot run on a device type raises when a tensor there
    reaches the op, with its reason."""
    for device_type in device_types():
        for op in OPS:
            try:
                resolve(op, backend, device_type)
            except BackendError:
                pass


@dataclass
class Served:
    """What ran while `serving()` recorded: kernel calls per op, and fallbacks per (patched op, reason)."""

    kernels: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)


_served: Served | None = None  # recording is off (None) but in the verifier


@contextlib.contextmanager
def serving() -> Iterator[Served]:
    """Record which kernels the ops call and where patched code fell back to the original (the verifier)."""
    global _served
    prior, _served = _served, Served()
    try:
        yield _served
    finally:
        _served = prior


def served(op: str) -> None:
    """Count one call of kernel `op` (dispatch does; so does an op that bypasses dispatch)."""
    if _served is not None:
        _served.kernels[op] += 1


def fell_back(op: str, reason: str) -> None:
    """Note that the replacement of patched op `op` ran the original instead, and why."""
    if _served is not None:
        _served.fallbacks[op, reason] += 1


def dispatch(op: str, backend: str, device: torch.device) -> Callable:
    if _served is not None:
        _served.kernels[op] += 1
    return resolve(op, backend, device.type)
