"""patchkit: fused kernels for Hugging Face causal LMs, patched in and out exactly.

    import patchkit
    patchkit.patch("llama")        # every Llama model, existing or future, runs the fused paths
    patchkit.unpatch("llama")      # every original object is back, `is`-identical
"""

from __future__ import annotations

import difflib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import integrations, patcher
from .generation import for_inference, for_training, generate
from .architecture import Architecture, replaces
from .kernels import BackendError, Provider
from .patcher import PatchError
from . import plugins
from .plugins import hookimpl, manager

from . import architectures  # noqa: E402  (callable: `patchkit.architectures()` lists the names)

try:
    __version__ = version(plugins.DISTRIBUTION)
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "Architecture", "BackendError", "Patch", "PatchError", "Provider", "UnknownArchitectureError", "UsageError",
    "architectures", "backends", "for_inference", "for_training", "generate", "hookimpl", "is_patched", "patch",
    "patched", "replaces", "unpatch", "verify",
]


class UnknownArchitectureError(PatchError, ValueError):
    """The target names no registered architecture."""


class UsageError(TypeError):
    """`patch()` was given an argument it does not take: a target of another type, an unknown op. A `TypeError`,
    as Python's own for a bad argument; the CLI reports it (like `PatchError`, `BackendError`) in one line."""


class Patch:
    """Handle of one `patch()` call; a context manager that undoes exactly what that call did.

    Patches of one family stack: the latest one's options are live. `unpatch()` takes this handle's patch out:
    where it was live, the patch below it becomes live again (or the family is restored when none is left);
    where a later patch is live, nothing changes. Nested `with patched(...)` blocks thus leave the outer block's
    patch as it was. `patchkit.unpatch(family)` takes out every handle's patch at once."""

    def __init__(self, names: list[str], backend: str):
        self.architectures, self.backend = names, backend
        self._held: list[str] = []

    def unpatch(self) -> None:
        with patcher.lock:
            for name in reversed(self._held):
                patcher.release(name, self)
            self._held = []
            integrations.sync()

    @staticmethod
    def for_inference(model):
        """`patchkit.for_inference(model)`."""
        return for_inference(model)

    @staticmethod
    def for_training(model):
        """`patchkit.for_training(model)`."""
        return for_training(model)

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        return f"<Patch {', '.join(self.architectures)} backend={self.backend!r}>"


def _unwrap(model: Any) -> Any:
    for attr in ("_orig_mod", "module", "get_base_model"):  # torch.compile's, DDP/accelerate wrappers, then PEFT
        inner = getattr(model, attr, None)
        if inner is not None:
            model = _unwrap(inner() if callable(inner) and attr == "get_base_model" else inner)
    return model


def _model_types(target: Any) -> list[str]:
    config = getattr(_unwrap(target), "config", target)
    types = [getattr(config, "model_type", None)]
    if hasattr(config, "get_text_config"):
        types.append(getattr(config.get_text_config(), "model_type", None))
    return [t for t in types if t]


TARGETS = "an architecture name, a model type, a config, a model (PEFT-wrapped too), a list of those, or None"


def _resolve(target: Any) -> list[type[Architecture]]:
    registry = manager()
    if target is None:
        return list(registry.architectures.values())
    if isinstance(target, (list, tuple, set)):
        return [arch for item in target for arch in _resolve(item)]
    keys = [target] if isinstance(target, str) else _model_types(target)
    if not keys:
        raise UsageError(f"patchkit takes {TARGETS}; got {type(target).__name__} {target!r:.80}")
    found = [registry.model_types[key] for key in keys if key in registry.model_types]
    if found and isinstance(target, str) and found[0].text_model_type in registry.model_types:
        found.append(registry.model_types[found[0].text_model_type])  # a wrapper by name: its usual language model
    if found:  # a vision-language wrapper and the family of its language model, once each
        return list(dict.fromkeys(found))
    known = sorted(registry.model_types)
    close = difflib.get_close_matches(str(keys[0]).lower(), known, n=1, cutoff=0.5)
    raise UnknownArchitectureError(
        f"no patchkit architecture for {keys[0]!r}{f' (did you mean {close[0]!r}?)' if close else ''}; known "
        f"architectures and model types: {', '.join(known)}. Install a plugin that adds it (see `patchkit plugins`) "
        f"or subclass patchkit.architectures.Llama.")


def _check_backend(backend: str, target: Any, archs: list[type[Architecture]]) -> None:
    providers = manager().providers
    if backend != "auto" and backend not in providers:
        raise BackendError(f"unknown backend {backend!r}; known backends: auto, {', '.join(providers)}")
    params = getattr(_unwrap(target), "parameters", None)
    if backend != "auto" and callable(params):
        device = next(params(), None)
        reason = device is not None and providers[backend].unavailable(device.device.type)
        if reason:
            raise BackendError(f"{reason}; the model is on {device.device}. Use backend='auto' or move it.")


def patch(target: Any = None, *, backend: str = "auto", **ops: bool) -> Patch:
    """Patch the architecture(s) of `target`: a name, a model type, a config, a model (PEFT too) or None (all).

    `ops` switch single ops off or on (`rms_norm=False`). Idempotent and atomic: on a missing
    attribute nothing changes and `PatchError` says which. A second patch of a family stacks on the first
    (its options are live until its handle is unpatched; see `Patch`).
    """
    archs = _resolve(target)
    known_ops = {op for arch in archs for op in arch.ops()}
    unknown = sorted(set(ops) - known_ops)
    if unknown:
        raise UsageError(f"unknown op(s) {', '.join(unknown)}; the ops are {', '.join(sorted(known_ops))}")
    _check_backend(backend, target, archs)
    handle = Patch([a.name for a in archs], backend)
    with patcher.lock:
        try:
            for arch in archs:
                patcher.hold(arch(backend, {op: bool(on) for op, on in ops.items()}), handle)
                handle._held.append(arch.name)
        except BaseException:
            handle.unpatch()
            raise
        integrations.sync()
    return handle


def unpatch(target: Any = None) -> None:
    """Restore every object the patches of `target`'s architecture(s) replaced, whichever handles hold them."""
    with patcher.lock:
        for arch in _resolve(target):
            patcher.clear(arch.name)
        integrations.sync()


def patched(target: Any = None, **kwargs: Any) -> Patch:
    """`with patchkit.patched("llama"): ...` — patched inside the block, restored after it."""
    return patch(target, **kwargs)


def is_patched(target: Any = None) -> bool:
    return all(patcher.state(arch.name) is not None for arch in _resolve(target))


def backends() -> dict[str, dict[str, Any]]:
    """Every kernel provider: its ops, the devices it runs on, and where `backend="auto"` picks it."""
    return {name: {"ops": sorted(p.ops), "devices": list(p.devices) if p.devices is not None else ["any"],
                   "auto": list(p.auto_devices), "priority": p.priority, "description": p.description}
            for name, p in manager().providers.items()}


def verify(target: Any = None, **kwargs: Any):
    """Compare patched and unpatched runs of a tiny random model; see `patchkit.parity.verify`."""
    from .parity import verify as _verify

    return _verify(target, **kwargs)
