"""``python -m diffusekit.training`` (or ``accelerate launch -m diffusekit.training``): same as ``diffusekit train``."""

import argparse

from . import add_train_arguments, run_train_command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="diffusekit train", description="Train a UNet2DModel diffusion model.")
    run_train_command(add_train_arguments(parser).parse_args())
