"""`Architecture`: a declarative description of what patchkit replaces in one model family.

A family states its name; its transformers module (`transformers.models.<name>.modeling_<name>`),
class-name prefix (transformers' own: `Qwen3Moe` for `qwen3_moe`, from its config class name) and model
types (`(<name>,)`) follow from it unless set; `tiny_config` merges into the parent's. Each op is
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


def camel_case(name: str) -> str:
    """transformers' class-name prefix of model type `name`: `Qwen3Moe` for qwen3_moe, `SmolLM3` for smollm3."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = CONFIG_MAPPING_NAMES.get(name)
    if config and config.endswith("Config"):
        return config[: -len("Config")]
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


class Architecture:
    """Base class of architecture plugins. Instances carry the chosen backend."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]] = ()  # default: (name,)
    module: ClassVar[str]  # default: transformers.models.<name>.modeling_<name>
    prefix: ClassVar[str]  # default: transformers' CamelCase (its config class name without "Config")
    config_class: ClassVar[str] = ""  # defaults to f"{prefix}Config" in transformers
    overrides: ClassVar[bool] = False  # replace a registered architecture of the same name
    shared_ops: ClassVar[tuple[str, ...]] = ()  # ops served by patches all families share (patchkit.integrations)
    tiny_config: ClassVar[dict[str, Any]] = {}  # the verifier's tiny model: merged into the parent's
    # the model classes whose forward computes the loss (`{head}` in a path), `{prefix}` filled in; the verifier
    # builds the first. A vision-language wrapper: `{prefix}ForConditionalGeneration`
    heads: ClassVar[tuple[str, ...]] = ("{prefix}ForCausalLM",)
    # a vision-language wrapper whose language model comes from another family (LLaVA's `text_config`): the model
    # type patched with it when it is patched by name; a config or model names its own
    text_model_type: ClassVar[str | None] = None
    tiny_multimodal: ClassVar[dict[str, Any]] = {}  # a wrapper's tiny config; `tiny_config` is its `text_config`
    fallbacks: ClassVar[dict[str, str]] = {}  # op -> why its replacement may run the original on the tiny model

    _factories: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "name" in own:  # transformers' naming: models/<name>/modeling_<name>.py, classes <Name>RMSNorm, ...
            if "module" not in own:
                cls.module = f"transformers.models.{cls.name}.modeling_{cls.name}"
            if "prefix" not in own:
                cls.prefix = camel_case(cls.name)
            if "model_types" not in own:
                cls.model_types = (cls.name,)
        if "tiny_config" in own:
            cls.tiny_config = {**super(cls, cls).tiny_config, **own["tiny_config"]}
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
        return [*seen, *(op for op in cls.shared_ops if op not in seen)]

    @classmethod
    def differences(cls) -> dict[str, Any]:
        """What this class changes relative to its parent: settings it sets and op factories it overrides."""
        identity = {"name", "model_types", "module", "prefix", "config_class", "tiny_config", "overrides", "_factories",
                    "shared_ops", "fallbacks", "tiny_multimodal"}
        return {k: v for k, v in vars(cls).items() if not k.startswith("__") and k not in identity}

    @classmethod
    def parent(cls) -> str | None:
        base = next((b for b in cls.__mro__[1:] if issubclass(b, Architecture) and "name" in vars(b)), None)
        return base.name if base else None

    @classmethod
    def load_module(cls):
        return importlib.import_module(cls.module)

    @classmethod
    def model_class(cls, kind: str | None = None, head: int = 0):
        """The model class `{prefix}{kind}`, by default `heads[head]`."""
        name = cls.heads[head].format(prefix=cls.prefix) if kind is None else f"{cls.prefix}{kind}"
        return getattr(cls.load_module(), name)

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
            heads = [head.format(prefix=self.prefix) for head in self.heads]
            out.extend((op, path.format(prefix=self.prefix, head=head), factory)
                       for path in paths for head in (heads if "{head}" in path else heads[:1]))
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} backend={self.backend!r}>"
