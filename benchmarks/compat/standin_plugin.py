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


_stand_in_for_lora_capability()
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


class _PipelineLogsToReference(logging.Handler):
    """Hands diffusekit's pipeline log records to the handlers of the reference's pipeline loggers, where its
    tests capture them (``CaptureLogger(logging.get_logger("diffusers.pipelines.pipeline_utils"))``: the
    components loaded; the SD pipeline's logger: truncated prompts), at those loggers' levels. The wording is
    diffusekit's own."""

    TARGETS = ("diffusers.pipelines.pipeline_utils", "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")

    def emit(self, record) -> None:
        for name in self.TARGETS:
            target = logging.getLogger(name)
            if target.isEnabledFor(record.levelno):
                for handler in target.handlers:
                    if record.levelno >= handler.level:
                        handler.handle(record)


def _pipeline_logs_to_reference() -> None:
    source = logging.getLogger("diffusekit.pipelines")
    source.setLevel(logging.DEBUG)  # what reaches a test is decided by the reference's logger levels
    source.addHandler(_PipelineLogsToReference())


_pipeline_logs_to_reference()
