"""Apply and restore an architecture's replacements: atomic, exact, idempotent, thread-safe.

A module that is not imported yet is patched the moment it is, through a meta-path finder
that wraps its loader; nothing is imported up front.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import logging
import sys
import threading
from dataclasses import dataclass, field

import torch

from .architecture import Architecture

log = logging.getLogger("patchkit")
_MISSING = object()
lock = threading.RLock()
TESTED_TRANSFORMERS = "5.25"  # the release series the test suite runs against (pyproject: >=5.23,<6)


class PatchError(RuntimeError):
    """A patch could not be applied; nothing was changed."""


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # pragma: no cover - transformers is a dependency
        return "unknown"


def _drift(what: str, arch: Architecture, op: str) -> PatchError:
    return PatchError(
        f"{what} in transformers {_transformers_version()} (patchkit is tested with transformers "
        f"{TESTED_TRANSFORMERS}.x), so the {arch.name!r} architecture cannot be patched; nothing was changed and "
        f"the model runs as transformers ships it. Install transformers {TESTED_TRANSFORMERS}.x, or leave that op "
        f"out: patch({arch.name!r}, {op}=False). Then run `patchkit verify`.")


def _unaccepted(original, replacement) -> str | None:
    """A parameter of `original` that calls may use and `replacement` would mishandle, or None.

    Positional parameters must line up: a differently named parameter is tolerated only where
    both are required (Gemma's `x` for Llama's `hidden_states`), never against an optional one.
    Parameters with defaults or keyword-only ones must be accepted by name.
    """
    try:
        old, new = inspect.signature(original), inspect.signature(replacement, follow_wrapped=False)
    except (TypeError, ValueError):  # builtins, modules: nothing to compare
        return None
    params = list(new.parameters.values())
    kinds = {p.kind for p in params}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for i, p in enumerate(old.parameters.values()):
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if i >= len(positional):
                if p.VAR_POSITIONAL not in kinds:
                    return p.name
                continue
            mine = positional[i]
            optional = p.default is not p.empty or mine.default is not mine.empty
            if i and mine.name != p.name and optional:
                return p.name
        if (p.kind is p.KEYWORD_ONLY or p.default is not p.empty) and p.kind is not p.POSITIONAL_ONLY:
            if p.name not in names and p.VAR_KEYWORD not in kinds:
                return p.name
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.kind not in kinds:
            return ("*" if p.kind is p.VAR_POSITIONAL else "**") + p.name
    return None


@dataclass
class Applied:
    arch: Architecture
    options: tuple
    saved: list[tuple[object, str, object]] = field(default_factory=list)  # owner, attr, own value or _MISSING


_applied: dict[str, Applied] = {}
_pending: dict[str, dict[str, Applied]] = {}  # module name -> arch name -> patch waiting for the import
_held: dict[str, list[tuple[object, Architecture]]] = {}  # arch name -> (handle, patch) of live handles, oldest first


def _options(arch: Architecture) -> tuple:
    return (type(arch), arch.backend, tuple(sorted(arch.enabled.items())))


def _resolve(module, path: str, arch: Architecture, op: str):
    # interned: CPython's type-attribute cache keeps a reference to every distinct name string it sees
    owner, *rest = (sys.intern(part) for part in path.split("."))
    holder, attr = module, owner
    for part in rest:
        holder = getattr(holder, attr, _MISSING)
        if holder is _MISSING:
            break
        attr = part
    if holder is _MISSING or not hasattr(holder, attr):
        raise _drift(f"{module.__name__}.{path} does not exist", arch, op)
    function_module = _function_module(module, path)
    if function_module is not None:  # the class's forward is what gets replaced
        return type(function_module), "forward"
    return holder, attr


def _function_module(module, path: str) -> torch.nn.Module | None:
    """The module standing for the function at `path`, or None: Hugging Face `kernels` makes a function like
    apply_rotary_pos_emb an `nn.Module` instance, and each model holds private instances of its class (pickled
    by the name)."""
    found = None if "." in path else getattr(module, path, None)
    return found if isinstance(found, torch.nn.Module) else None


def _conflicts(arch: Architecture, targets) -> set[str]:
    """Other architectures whose live patches sit on the resolved `targets` of `arch`."""
    marks = (getattr(getattr(owner, attr), "__patchkit__", None) for *_, owner, attr in targets)
    return {mark[0] for mark in marks if mark and mark[0] != arch.name}


def make(module, path: str, factory, original):
    """What `factory` makes of `original` (found at `path` by `_resolve`), in the form installed there: where a
    function is a module (see `_resolve`), the factory sees the function and its result becomes the forward."""
    function_module = _function_module(module, path)
    if function_module is None:
        return factory(original)
    function = factory(function_module.forward)

    def forward(self, *args, **kwargs):
        return function(*args, **kwargs)

    signature = inspect.signature(function)
    forward.__signature__ = signature.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()])
    return forward


def _owner_plugin(name: str) -> str:
    from .plugins import manager

    return manager().plugin_of.get(name, "?")


def _install(record: Applied, module) -> None:
    arch = record.arch
    from patchkit import kernels

    kernels.prepare(arch.backend)  # dispatch resolved now, not in a forward: dynamo reads a dict
    targets = [(op, path, factory, *_resolve(module, path, arch, op)) for op, path, factory in arch.targets()]
    others = _conflicts(arch, targets)
    if others and not arch.overrides:
        raise PatchError(
            f"architecture {arch.name!r} (plugin {_owner_plugin(arch.name)}) would replace what "
            + ", ".join(f"{o!r} (plugin {_owner_plugin(o)})" for o in sorted(others))
            + " patched; nothing was changed. Unpatch that first, or set `overrides = True` on the class that "
            "should win.")
    for other in others:
        log.warning("patchkit: %s overrides the patch of %s", arch.name, other)
        clear(other)
    plan = []
    made = vars(arch).setdefault("_made", {})  # a patch applied again (a stacked one live again) installs the same
    for op, path, factory, owner, attr in targets:
        original = getattr(owner, attr)
        earlier, replacement = made.get(path, (None, None))
        if earlier is not original:
            replacement = make(module, path, factory, original)
            made[path] = (original, replacement)
        missing = _unaccepted(original, replacement)
        if missing:
            raise _drift(f"{module.__name__}.{path}{inspect.signature(original)} takes {missing!r}, which "
                         "patchkit's replacement does not accept,", arch, op)
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


def apply(arch: Architecture, *, check_module: bool = True) -> bool:
    """Patch `arch` (or queue it until its module is imported). Returns False if already so patched.

    `check_module=False` queues a module that is not imported yet without importing its parent packages
    (for integrations with optional libraries, whose presence the caller checked)."""
    with lock:
        current = _applied.get(arch.name) or _pending.get(arch.module, {}).get(arch.name)
        if current is not None and current.options == _options(arch):
            return False
        if current is not None:
            restore(arch.name)
        record = Applied(arch, _options(arch))
        module = sys.modules.get(arch.module)
        if module is None and check_module:
            try:
                found = importlib.util.find_spec(arch.module) is not None  # imports parent packages only
            except ImportError:
                found = False
            if not found:
                raise PatchError(f"architecture {arch.name!r} names module {arch.module!r}, which transformers "
                                 f"{_transformers_version()} does not have; nothing was changed")
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
        for module_name, waiting in list(_pending.items()):
            if waiting.pop(name, None) is not None:
                if not waiting:
                    del _pending[module_name]
                _unwatch()
                return True
        record = _applied.pop(name, None)
        if record is None:
            return False
        _restore(record)
        return True


def hold(arch: Architecture, handle: object) -> None:
    """Apply `arch` for `handle`, on top of the family's earlier patches: the latest patch's options are live."""
    with lock:
        apply(arch)
        _held.setdefault(arch.name, []).append((handle, arch))


def release(name: str, handle: object) -> None:
    """Take `handle`'s patch of `name` out of the stack. Where it was live, the one below it becomes live again,
    or, where none is left, every original comes back; a patch lower down goes without changing anything."""
    with lock:
        stack = _held.get(name, [])
        mine = [i for i, (holder, _) in enumerate(stack) if holder is handle]
        if not mine:
            return
        live = mine[-1] == len(stack) - 1
        del stack[mine[-1]]
        if not live:
            return
        if stack:
            apply(stack[-1][1])
        else:
            del _held[name]
            restore(name)


def clear(name: str) -> bool:
    """Undo every patch of `name`, whichever handles hold them. Returns False if it was not patched."""
    with lock:
        _held.pop(name, None)
        return restore(name)


def records() -> list[Applied]:
    """Every applied or waiting patch."""
    with lock:
        return [*_applied.values(), *(r for waiting in _pending.values() for r in waiting.values())]


def state(name: str) -> Applied | None:
    with lock:
        return _applied.get(name) or next((w[name] for w in _pending.values() if name in w), None)


def _on_import(module) -> None:
    with lock:
        waiting = _pending.pop(module.__name__, {})
        _unwatch()
        for name, record in waiting.items():
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


def _unwatch() -> None:
    """Take the finder out again once no patch waits for an import."""
    if not _pending and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
