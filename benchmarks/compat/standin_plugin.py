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
    """Hands diffusekit's log records to the handlers of the reference's loggers where its tests capture
    them (``CaptureLogger(logging.get_logger("diffusers.loaders.peft"))``; the pipeline loader's components
    loaded, the SD pipeline's truncated prompts), at the levels those loggers are set to. Only the wording
    is diffusekit's own."""

    def __init__(self, targets: tuple[str, ...]) -> None:
        super().__init__()
        self.targets = targets

    def emit(self, record: logging.LogRecord) -> None:
        for name in self.targets:
            target = logging.getLogger(name)
            if target.isEnabledFor(record.levelno):
                for handler in target.handlers:
                    if record.levelno >= handler.level:
                        handler.handle(record)


#: diffusekit logger -> the reference's loggers its records also go to.
LOG_TARGETS = {
    "diffusekit.loaders": ("diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline", "diffusers.loaders.peft"),
    "diffusekit.pipelines": ("diffusers.pipelines.pipeline_utils",
                             "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"),
}


def _log_to_reference_loggers() -> None:
    for source_name, targets in LOG_TARGETS.items():
        source = logging.getLogger(source_name)
        source.setLevel(logging.DEBUG)  # what reaches a test is decided by the reference's logger levels
        source.addHandler(_ToReferenceLoggers(targets))


_stand_in_for_lora_capability()
_log_to_reference_loggers()
_stand_in_for_lora_layer_type()
_stand_in_for_adapter_capability()
_stand_in_for_cache_capability()


def pytest_report_header() -> str:
    placeholders = sum(1 for cls in FINDER.table.values() if cls.__module__ == "diffusekit.missing")
    return f"diffusekit stands in: {len(FINDER.table) - placeholders} classes, {placeholders} placeholders"


def pytest_collection_finish(session) -> None:
    """The reference's pipeline tests ask ``issubclass(pipeline_class, IPAdapterMixin)`` (the name imported
    from ``diffusers.loaders``); diffusekit's pipelines take IP-Adapters through its own ``IPAdapterMixin``,
    which stands in for that name in the test modules only (the reference's own pipelines keep theirs)."""
    import sys

    import diffusers.loaders.ip_adapter as reference
    from diffusekit.loaders.ip_adapter import IPAdapterMixin

    for name, module in list(sys.modules.items()):
        if name.startswith("tests.") and getattr(module, "IPAdapterMixin", None) is reference.IPAdapterMixin:
            module.IPAdapterMixin = IPAdapterMixin
