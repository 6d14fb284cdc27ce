"""pytest plugin (``-p standin_plugin``): diffusekit's classes stand in for diffusers' in the run.

Installed when pytest loads the plugin, before any conftest or test module imports diffusers.
"""

from __future__ import annotations

import logging

import diffusekit
import diffusers
from standin import install

FINDER = install(diffusers, diffusekit)


def _stand_in_for_lora_capability() -> None:
    """The reference's pipeline tests ask ``issubclass(pipeline_class, LoraBaseMixin)`` to decide whether a
    pipeline takes LoRA; diffusekit's pipelines take it through ``LoraLoaderMixin``, so that name stands in
    for the check. The reference's own loader mixins are built first, on their real base."""
    import diffusers.loaders.lora_base as lora_base
    import diffusers.loaders.lora_pipeline  # noqa: F401
    from diffusekit.loaders.lora import LoraLoaderMixin

    lora_base.LoraBaseMixin = LoraLoaderMixin


def _stand_in_for_adapter_capability() -> None:
    """The reference's model tests ask ``issubclass(model_class, PeftAdapterMixin)`` to decide whether a
    model takes adapters; diffusekit's models take them through its own ``PeftAdapterMixin``, so that
    class stands in for the check (after the reference's models are built on the real one)."""
    import diffusers.loaders.peft as peft
    import diffusers.models.modeling_utils  # noqa: F401
    from diffusekit.loaders.peft_adapters import PeftAdapterMixin

    peft.PeftAdapterMixin = PeftAdapterMixin


def _stand_in_for_cache_capability() -> None:
    """The reference's model cache tests ask ``issubclass(model_class, CacheMixin)``; diffusekit's
    models take caches through its own ``CacheMixin`` (models/cache.py), which stands in for the check."""
    import diffusers.models.cache_utils as cache_utils
    import diffusers.models.modeling_utils  # noqa: F401
    from diffusekit.models.cache import CacheMixin

    cache_utils.CacheMixin = CacheMixin


def _stand_in_for_lora_layer_type() -> None:
    """The reference's LoRA tests check that LoRA is in a model with ``isinstance(module, BaseTunerLayer)``
    (peft's layer base); LoRA files load into diffusekit's own layers (docs/compatibility.md, "Adapters:
    which layers"), so those count as tuner layers for that check. diffusekit itself never counts them so
    (``lora_layers.peft_layers``)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft the reference's LoRA tests skip
        return
    from diffusekit.loaders.lora_layers import LoraLayer

    BaseTunerLayer.register(LoraLayer)


class _ToReferenceLoggers(logging.Handler):
    """Hands diffusekit's loader log records to the handlers of the reference's loader loggers, where the
    reference's tests capture them (``CaptureLogger(logging.get_logger("diffusers.loaders.peft"))``), at the
    levels those loggers are set to. Only the wording is diffusekit's own."""

    TARGETS = ("diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline", "diffusers.loaders.peft")

    def emit(self, record: logging.LogRecord) -> None:
        for name in self.TARGETS:
            target = logging.getLogger(name)
            if target.isEnabledFor(record.levelno):
                for handler in target.handlers:
                    if record.levelno >= handler.level:
                        handler.handle(record)


def _log_to_reference_loggers() -> None:
    source = logging.getLogger("diffusekit.loaders")
    source.setLevel(logging.DEBUG)  # what reaches a test is decided by the reference's logger levels
    source.addHandler(_ToReferenceLoggers())


_stand_in_for_lora_capability()
_log_to_reference_loggers()
_stand_in_for_lora_layer_type()
_stand_in_for_adapter_capability()
_stand_in_for_cache_capability()


def pytest_report_header() -> str:
    placeholders = sum(1 for cls in FINDER.table.values() if cls.__module__ == "diffusekit.missing")
    return f"diffusekit stands in: {len(FINDER.table) - placeholders} classes, {placeholders} placeholders"
