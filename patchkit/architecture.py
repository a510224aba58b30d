"""`Architecture`: a declarative description of what patchkit replaces in one model family.

A family states its transformers module, its class-name prefix and its model types; each op is
a method marked `@replaces(op, *paths)` that receives the original object and returns its
replacement. Paths are attribute paths inside the module, with `{prefix}` filled in, so a
subclass for another family inherits every op and restates only what differs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar

_MARK = "__patchkit_replaces__"


def replaces(op: str, *paths: str) -> Callable[[Callable], Callable]:
    """Mark an `Architecture` method as the factory of `op`'s replacement for each of `paths`."""

    def mark(factory: Callable) -> Callable:
        setattr(factory, _MARK, (op, paths))
        return factory

    return mark


class Architecture:
    """Base class of architecture plugins. Instances carry the chosen backend."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]] = ()
    module: ClassVar[str]
    prefix: ClassVar[str]
    config_class: ClassVar[str] = ""  # defaults to f"{prefix}Config" in transformers
    overrides: ClassVar[bool] = False  # replace a registered architecture of the same name
    tiny_config: ClassVar[dict[str, Any]] = {}  # overrides for the verifier's tiny model

    _factories: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        factories = dict(cls._factories)
        for attr, value in vars(cls).items():
            if hasattr(value, _MARK):
                factories[attr] = getattr(value, _MARK)
        cls._factories = factories

    def __init__(self, backend: str = "auto", enabled: dict[str, bool] | None = None):
        self.backend = backend
        self.enabled = {op: (enabled or {}).get(op, True) for op in self.ops()}

    @classmethod
    def ops(cls) -> list[str]:
        """The ops this architecture patches, in declaration order."""
        seen: dict[str, None] = {}
        for attr, (op, _) in cls._factories.items():
            if getattr(cls, attr) is not None:
                seen[op] = None
        return list(seen)

    @classmethod
    def parent(cls) -> str | None:
        base = next((b for b in cls.__mro__[1:] if issubclass(b, Architecture) and "name" in vars(b)), None)
        return base.name if base else None

    @classmethod
    def load_module(cls):
        return importlib.import_module(cls.module)

    @classmethod
    def model_class(cls, kind: str = "ForCausalLM"):
        return getattr(cls.load_module(), f"{cls.prefix}{kind}")

    @classmethod
    def config_type(cls):
        import transformers

        return getattr(transformers, cls.config_class or f"{cls.prefix}Config")

    def targets(self) -> list[tuple[str, str, Callable]]:
        """(op, attribute path, factory) for every enabled op."""
        out = []
        for attr, (op, paths) in self._factories.items():
            factory = getattr(self, attr)
            if factory is None or not self.enabled.get(op, False):
                continue
            out.extend((op, path.format(prefix=self.prefix), factory) for path in paths)
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} backend={self.backend!r}>"
