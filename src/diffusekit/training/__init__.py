"""Training UNet2DModel diffusion models (``diffusekit train``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .config import TrainConfig, add_train_arguments, config_from_args


def __getattr__(name: str):
    """``train`` (and torch with it) is imported only when used, so the CLI parser stays light."""
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_train_command(args: argparse.Namespace) -> Path:
    """Run ``diffusekit train`` from parsed arguments; print and return the output folder."""
    from .checkpoint import prepare_output, resumed_settings
    from .loop import train

    config = config_from_args(args, resumed_settings(args.resume) if args.resume is not None else None)
    main_process = os.environ.get("RANK", "0") == "0"  # under accelerate launch, the other ranks leave --out alone
    if main_process:  # before train() makes the process group, so the others cannot write to --out yet
        prepare_output(config.out, config.resume, overwrite=getattr(args, "overwrite", False))
    if config.task == "unet":
        out = train(config)
    else:
        from .text_to_image import train_lora, train_text_to_image, train_vae

        config.check()
        out = {"vae": train_vae, "text-to-image": train_text_to_image, "lora": train_lora}[config.task](config)
    if main_process:  # one line, also under accelerate launch
        print(f"saved pipeline to {out}")
    return out


__all__ = ["TrainConfig", "add_train_arguments", "run_train_command", "train"]
