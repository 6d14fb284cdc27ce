"""What every scheduler shares: config files, ``compatibles``, the output type."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..configuration import ConfigMixin, read_json
from ..hub import resolve_file
from ..utils import BaseOutput


@dataclass
class SchedulerOutput(BaseOutput):
    """The result of ``step``: the less noisy sample, and the model's estimate of the clean one."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class SchedulerMixin(ConfigMixin):
    """Base of all schedulers: ``from_pretrained`` / ``save_pretrained`` of ``scheduler_config.json``."""

    config_name = "scheduler_config.json"
    #: Names of the schedulers that can be built from this one's config (``from_config``).
    _compatibles: tuple[str, ...] = ()
    order = 1

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        **kwargs: Any,
    ):
        """Build from ``scheduler_config.json`` in a folder or Hub repo; extra kwargs override keys."""
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        path = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder=subfolder, **hub)
        return cls.from_config(read_json(path), **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        self.save_config(save_directory)

    @property
    def compatibles(self) -> list[type]:
        """Scheduler classes that accept this scheduler's config."""
        import diffusekit

        classes = []
        for name in dict.fromkeys([type(self).__name__, *self._compatibles]):
            try:
                classes.append(getattr(diffusekit, name))
            except (AttributeError, ImportError):  # a reference scheduler diffusekit does not have
                continue
        return classes

    def __len__(self) -> int:
        return self.config.num_train_timesteps
