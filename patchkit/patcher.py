"""Apply and restore an architecture's replacements: atomic, exact, idempotent, thread-safe.

A module that is not imported yet is patched the moment it is, through a meta-path finder
that wraps its loader; nothing is imported up front.
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import sys
import threading
from dataclasses import dataclass, field

from .architecture import Architecture

log = logging.getLogger("patchkit")
_MISSING = object()
lock = threading.RLock()


class PatchError(RuntimeError):
    """A patch could not be applied; nothing was changed."""


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # pragma: no cover - transformers is a dependency
        return "unknown"


@dataclass
class Applied:
    arch: Architecture
    options: tuple
    saved: list[tuple[object, str, object]] = field(default_factory=list)  # owner, attr, own value or _MISSING


_applied: dict[str, Applied] = {}
_pending: dict[str, dict[str, Applied]] = {}  # module name -> arch name -> patch waiting for the import


def _options(arch: Architecture) -> tuple:
    return (type(arch), arch.backend, tuple(sorted(arch.enabled.items())))


def _resolve(module, path: str, arch: Architecture, op: str):
    owner, *rest = path.split(".")
    holder, attr = module, owner
    for part in rest:
        holder = getattr(holder, attr, _MISSING)
        if holder is _MISSING:
            break
        attr = part
    if holder is _MISSING or not hasattr(holder, attr):
        raise PatchError(
            f"{module.__name__}.{path} does not exist in transformers {_transformers_version()}, so the "
            f"{arch.name!r} architecture cannot be patched; nothing was changed. Pin a transformers version "
            f"patchkit supports (see `pip show patchkit`) or disable that op, e.g. patch({arch.name!r}, "
            f"{op}=False)."
        )
    return holder, attr


def _install(record: Applied, module) -> None:
    arch = record.arch
    plan = []
    for op, path, factory in arch.targets():
        owner, attr = _resolve(module, path, arch, op)
        original = getattr(owner, attr)
        replacement = factory(original)
        if callable(replacement) and callable(original) and hasattr(replacement, "__code__"):
            functools.update_wrapper(replacement, original)
        if hasattr(replacement, "__code__"):
            replacement.__patchkit__ = (arch.name, op)
        own = vars(owner).get(attr, _MISSING) if isinstance(owner, type) else getattr(owner, attr)
        plan.append((owner, attr, own, replacement))
    for owner, attr, own, replacement in plan:
        record.saved.append((owner, attr, own))
        setattr(owner, attr, replacement)


def _restore(record: Applied) -> None:
    for owner, attr, own in reversed(record.saved):
        if own is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, own)
    record.saved.clear()


def apply(arch: Architecture) -> bool:
    """Patch `arch` (or queue it until its module is imported). Returns False if already so patched."""
    with lock:
        current = _applied.get(arch.name) or _pending.get(arch.module, {}).get(arch.name)
        if current is not None and current.options == _options(arch):
            return False
        if current is not None:
            restore(arch.name)
        record = Applied(arch, _options(arch))
        module = sys.modules.get(arch.module)
        if module is None:
            _watch()
            _pending.setdefault(arch.module, {})[arch.name] = record
            log.debug("patchkit: %s will be patched when %s is imported", arch.name, arch.module)
            return True
        try:
            _install(record, module)
        except BaseException:
            _restore(record)
            if current is not None:
                apply(current.arch)
            raise
        _applied[arch.name] = record
        log.info("patchkit: patched %s (%s)", arch.name, ", ".join(op for op, on in arch.enabled.items() if on))
        return True


def restore(name: str) -> bool:
    """Undo the patch of architecture `name`. Returns False if it was not patched."""
    with lock:
        for waiting in _pending.values():
            if waiting.pop(name, None) is not None:
                return True
        record = _applied.pop(name, None)
        if record is None:
            return False
        _restore(record)
        return True


def state(name: str) -> Applied | None:
    with lock:
        return _applied.get(name) or next((w[name] for w in _pending.values() if name in w), None)


def _on_import(module) -> None:
    with lock:
        for name, record in list(_pending.pop(module.__name__, {}).items()):
            try:
                _install(record, module)
            except PatchError as err:
                _restore(record)
                log.error("patchkit: %s", err)
                continue
            _applied[name] = record


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _on_import(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_finder = _Finder()


def _watch() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
