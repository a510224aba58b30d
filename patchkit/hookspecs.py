"""patchkit's hook specifications. Implement them with `@patchkit.hookimpl`; all take keyword arguments only."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("patchkit")


@hookspec
def patchkit_architectures() -> list[type]:
    """Return `Architecture` subclasses this plugin contributes.

    Built-in plugins are read first, then entry points sorted by distribution and name. A name
    that is already registered is an error unless the class sets `overrides = True`.
    """


@hookspec
def patchkit_kernel_providers() -> list:
    """Return `patchkit.kernels.Provider` objects: implementations of ops for some devices.

    Same ordering rule as `patchkit_architectures`; a name that is already registered is an
    error unless the provider sets `overrides=True`.
    """
