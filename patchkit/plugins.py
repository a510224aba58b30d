"""Plugin manager: built-in plugins first, then entry points of group "patchkit".

Entry points are loaded one at a time, sorted by distribution and name; one that fails to
import, or whose hook raises or returns something unusable, is recorded and skipped.
`PATCHKIT_DISABLE_PLUGIN_AUTOLOAD=1` turns entry-point loading off; `PATCHKIT_PLUGINS=a,b` loads
only the entry points named; `PATCHKIT_STRICT_PLUGINS=1` re-raises the first failure (for CI).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .architecture import Architecture

log = logging.getLogger("patchkit")
hookimpl = pluggy.HookimplMarker("patchkit")
DISTRIBUTION = "patchkit-llm"  # on the package index; its `patchkit` is another project (the import name stays)
BUILTINS = ("patchkit.architectures", "patchkit.kernels.providers")


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)


@dataclass
class PluginError:
    plugin: str
    distribution: str
    error: str


class Plugins:
    """What the plugins registered: architectures by name and model type, providers by name."""

    def __init__(self, autoload: bool | None = None):
        self.pm = pluggy.PluginManager("patchkit")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.errors: list[PluginError] = []
        self.skipped: list[str] = []
        self.architectures: dict[str, type[Architecture]] = {}
        self.model_types: dict[str, type[Architecture]] = {}
        self.plugin_of: dict[str, str] = {}  # architecture name -> plugin that registered it
        self.providers: dict = {}
        for name in BUILTINS:
            self.pm.register(importlib.import_module(name), name=name)
            self.info[name] = PluginInfo(name, DISTRIBUTION, _version(DISTRIBUTION))
        if autoload is None:
            autoload = os.environ.get("PATCHKIT_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
        if autoload:
            self._load_entry_points()
        self._load_errors = list(self.errors)
        self.collect()

    def _fail(self, plugin: str, dist: str, err: BaseException) -> None:
        self.errors.append(PluginError(plugin, dist, f"{type(err).__name__}: {err}"))
        log.warning("patchkit: plugin %r (%s) skipped: %s: %s", plugin, dist, type(err).__name__, err)
        if os.environ.get("PATCHKIT_STRICT_PLUGINS", "") not in ("", "0"):
            raise err

    def _load_entry_points(self) -> None:
        eps = importlib.metadata.entry_points(group="patchkit")
        allowed = os.environ.get("PATCHKIT_PLUGINS")
        allowed = None if allowed is None else {name.strip() for name in allowed.split(",") if name.strip()}
        for ep in sorted(eps, key=lambda e: (e.dist.name if e.dist else "", e.name)):
            dist = ep.dist.name if ep.dist else "?"
            if allowed is not None and ep.name not in allowed:
                self.skipped.append(f"{ep.name} ({dist}): not in PATCHKIT_PLUGINS")
                continue
            if self.pm.is_blocked(ep.name) or self.pm.has_plugin(ep.name):
                continue
            try:
                self.pm.register(ep.load(), name=ep.name)
            except Exception as err:
                self._fail(ep.name, dist, err)
                continue
            self.info[ep.name] = PluginInfo(ep.name, dist, ep.dist.version if ep.dist else "?")

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register an in-process plugin (an object or module with `@hookimpl` functions)."""
        name = self.pm.register(plugin, name=name)
        self.info[name] = PluginInfo(name, "(in process)", "")
        self.collect()
        return name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.info.pop(name, None)
        self.collect()

    def _results(self, hook: str):
        """(plugin name, item) for every item every plugin's `hook` returns, in registration order."""
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            dist = self.info.get(impl.plugin_name, PluginInfo(impl.plugin_name, "?", "?")).distribution
            try:
                items = list(impl.function() or ())
            except Exception as err:
                self._fail(impl.plugin_name, dist, err)
                continue
            for item in items:
                yield impl.plugin_name, dist, item

    def collect(self) -> None:
        from patchkit.kernels import Provider, clear_cache

        self.errors = list(self._load_errors)
        self.architectures, self.model_types, self.providers, self.plugin_of = {}, {}, {}, {}
        for name, info in self.info.items():
            plugin = self.pm.get_plugin(name)
            info.hooks = [h.name for h in self.pm.get_hookcallers(plugin) or ()] if plugin is not None else []
        for plugin, dist, arch in self._results("patchkit_architectures"):
            try:
                self._add_architecture(arch)
            except (TypeError, ValueError) as err:
                self._fail(plugin, dist, err)
            else:
                self.plugin_of[arch.name] = plugin
        for plugin, dist, provider in self._results("patchkit_kernel_providers"):
            if not isinstance(provider, Provider):
                self._fail(plugin, dist, TypeError(f"patchkit_kernel_providers returned {provider!r}, not a Provider"))
            elif provider.name in self.providers and not provider.overrides:
                self._fail(plugin, dist, ValueError(f"kernel provider {provider.name!r} is already registered; "
                                                    "set overrides=True to replace it"))
            else:
                self.providers[provider.name] = provider
        clear_cache()

    def _add_architecture(self, arch) -> None:
        if not (isinstance(arch, type) and issubclass(arch, Architecture)):
            raise TypeError(f"patchkit_architectures returned {arch!r}, not an Architecture subclass")
        missing = [a for a in ("name", "module", "prefix") if not isinstance(getattr(arch, a, None), str)]
        if missing:
            raise TypeError(f"architecture {arch.__qualname__} does not set {', '.join(missing)}")
        known = self.architectures.get(arch.name)
        if known is not None and not arch.overrides:
            raise ValueError(f"architecture {arch.name!r} is already registered by {known.__module__}; "
                             "set overrides = True on the class to replace it")
        if known is not None:
            self.model_types = {t: a for t, a in self.model_types.items() if a is not known}
        self.architectures[arch.name] = arch
        for model_type in (arch.name, *arch.model_types):
            self.model_types[model_type] = arch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


_manager: Plugins | None = None
_manager_lock = threading.Lock()


def manager() -> Plugins:
    global _manager
    if _manager is None:
        with _manager_lock:
            if _manager is None:
                _manager = Plugins()
    return _manager


def reload(autoload: bool | None = None) -> Plugins:
    """Rebuild the plugin manager from scratch (re-reads entry points)."""
    global _manager
    with _manager_lock:
        _manager = Plugins(autoload)
    return _manager
