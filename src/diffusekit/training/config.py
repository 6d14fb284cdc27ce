"""TrainConfig: every setting of a training run, and its command-line form (``diffusekit train``)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The class names of a class-conditional run, saved in its output folder (read by ``diffusekit generate``).
CLASS_LABELS_FILE = "class_labels.json"
#: Files a training run writes into its output folder besides the model.
LOG_FILE = "train_log.jsonl"
SAMPLES = "samples"
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: What a run trains: a pixel UNet2DModel, an AutoencoderKL, text encoder + UNet on VAE latents, or a
#: LoRA of a text-to-image pipeline's UNet.
TASKS = ("unet", "vae", "text-to-image", "lora")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Settings of :func:`diffusekit.training.train`. The first group mirrors ``diffusekit train``."""

    data: Any = "sklearn-digits"  # "sklearn-digits", "shapes", an image folder, an array or an ImageDataset
    task: str = "unet"
    resolution: int = 16
    steps: int = 3000  # optimizer steps (each one of grad_accum micro-batches)
    out: Path = Path("diffusekit-train")
    class_conditional: bool = False
    batch_size: int = 64  # per process, per micro-batch
    lr: float = 1e-3
    prediction_type: str = "epsilon"
    ema_decay: float = 0.999
    snr_gamma: float | None = None  # min-SNR loss weighting (Hang et al. 2023); None: plain MSE
    grad_accum: int = 1
    save_every: int = 1000  # 0: only at the end
    sample_every: int = 1000  # 0: never
    resume: Path | None = None  # a checkpoint folder, or an output folder (its latest checkpoint)
    seed: int = 0
    vae: Path | None = None  # text-to-image: the AutoencoderKL folder whose latents the UNet learns
    dataset_size: int = 16000  # images of the synthetic "shapes" data
    base: Path | None = None  # lora: the StableDiffusionPipeline folder the LoRA adapts
    lora_rank: int = 4

    # Not on the command line.
    labels: Any = None  # labels of an array dataset
    channels: int = 3  # of an image folder (sklearn-digits is always 1)
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_last_level: bool = True
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    warmup_steps: int = 200  # at most a fifth of the steps
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    null_class_prob: float = 0.1  # class-conditional: labels dropped to the null class this often
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) under CUDA, none on CPU
    sample_steps: int = 25  # DDIM steps of the sample grids
    sample_guidance_scale: float = 2.0
    progress: bool = True
    extra_model_config: dict = field(default_factory=dict)
    # VAE and text-to-image runs.
    vae_block_out_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    vae_kl_weight: float = 1e-6  # on the KL per pixel (Stable Diffusion's weight)
    text_width: int = 64  # CLIP text encoder hidden size (also the UNet's cross-attention width)
    text_layers: int = 3
    max_text_length: int = 32  # tokens, the tokenizer's model_max_length
    caption_dropout: float = 0.1  # captions dropped to "" this often (classifier-free guidance)

    def check(self) -> None:
        """Raise ValueError naming the setting that cannot work."""
        positive = ("resolution", "steps", "batch_size", "grad_accum", "num_train_timesteps", "sample_steps",
                "dataset_size", "lora_rank", "text_width", "text_layers", "max_text_length", "latent_channels")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("save_every", "sample_every", "warmup_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.task != "unet" and self.resume is not None:
            raise ValueError(f"--resume works for --task unet only, not {self.task}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"snr_gamma must be positive (or unset), got {self.snr_gamma}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.null_class_prob < 1.0:
            raise ValueError(f"null_class_prob must be in [0, 1), got {self.null_class_prob}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.task == "text-to-image":
            factor *= 2 ** (len(self.vae_block_out_channels) - 1)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} must be divisible by {factor} "
                             f"for {len(self.block_out_channels)} UNet levels")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of "
                             f"norm_num_groups {self.norm_num_groups}")

    def to_json(self) -> dict:
        """The JSON-ready settings (array data and labels are left out)."""
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("data", "labels") and not isinstance(value, (str, Path, type(None))):
                value = f"<{type(value).__name__}>"
            data[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return data


#: Settings a resumed run may change (the rest must match the run being resumed).
RESUMABLE_CHANGES = ("steps", "out", "resume", "save_every", "sample_every", "progress")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``diffusekit train`` options to ``parser``. Options left out stay None: they take
    :class:`TrainConfig`'s defaults, or the values of the run that ``--resume`` continues."""
    d = TrainConfig()
    option = parser.add_argument
    option("--data", required=True, help="an image folder (subfolders = classes; with --task text-to-image or lora, "
                                         "a NAME.txt caption beside each image), 'sklearn-digits', 'shapes' or "
                                         "'shapes-outlined'")
    option("--task", choices=TASKS, help="unet: a pixel UNet2DModel (default); vae: an AutoencoderKL; "
                                         "text-to-image: text encoder + UNet on the latents of --vae; "
                                         "lora: a LoRA of the UNet of --base")
    option("--vae", type=Path, help="--task text-to-image: the AutoencoderKL folder (from a --task vae run)")
    option("--base", type=Path, help="--task lora: the Stable Diffusion pipeline folder to adapt")
    option("--lora-rank", type=int, help=f"--task lora: rank of the LoRA matrices (default: {d.lora_rank})")
    option("--text-layers", type=int, help=f"--task text-to-image: CLIP text encoder layers (default: {d.text_layers})")
    option("--dataset-size", type=int, help=f"images of --data shapes (default: {d.dataset_size})")
    option("--beta-schedule", choices=BETA_SCHEDULES, help=f"default: {d.beta_schedule}")
    option("--resolution", type=int, help=f"square image side (default: {d.resolution})")
    option("--steps", type=int, required=True, help="optimizer steps to train for")
    option("--out", type=Path, required=True, help="output folder (a loadable pipeline)")
    option("--overwrite", action="store_true", help="replace the model, log, checkpoints and samples in a "
                                                     "non-empty --out (refused otherwise)")
    option("--class-conditional", action="store_true", default=None,
           help="condition on class labels, with a null class for classifier-free guidance")
    option("--batch-size", type=int, help=f"per process (default: {d.batch_size})")
    option("--lr", type=float, help=f"peak learning rate (default: {d.lr})")
    option("--prediction-type", choices=PREDICTION_TYPES, help=f"default: {d.prediction_type}")
    option("--ema-decay", type=float, help=f"default: {d.ema_decay}")
    option("--snr-gamma", type=float, help="weight each timestep's loss by min(SNR, gamma) (min-SNR; "
                                           "diffusers' --snr_gamma; 5 is the paper's; default: off)")
    option("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {d.grad_accum})")
    option("--save-every", type=int, help=f"checkpoint period in steps (default: {d.save_every})")
    option("--sample-every", type=int, help=f"sample-grid period in steps (default: {d.sample_every})")
    option("--resume", type=Path, help="checkpoint (or output) folder to resume from; unset options take "
                                       "that run's values, conflicting ones are refused")
    option("--seed", type=int, help=f"default: {d.seed}")
    option("--block-out-channels", type=_channel_list,
           help=f"UNet channels per level (default: {','.join(map(str, d.block_out_channels))})")
    option("--layers-per-block", type=int, help=f"default: {d.layers_per_block}")
    return parser


def _channel_list(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64,64, got {text!r}") from None
    if not channels or min(channels) < 1:
        raise argparse.ArgumentTypeError(f"channels must be positive, got {text!r}")
    return channels


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig settings given on the command line (options left out are None)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def config_from_args(args: argparse.Namespace, resumed: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of parsed ``diffusekit train`` arguments; with ``resumed`` (the settings saved
    with the checkpoint being resumed) unset options take its values, and given ones must agree."""
    given = given_settings(args)
    if resumed is None:
        return TrainConfig(**given)
    check_resume_conflicts(given, resumed)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(RESUMABLE_CHANGES) - {"data", "labels"}
    inherited = {k: _from_json(k, resumed[k]) for k in names if k in resumed and k not in given}
    return TrainConfig(**{**inherited, **given})


def _from_json(name: str, value: Any) -> Any:
    return tuple(value) if name.endswith("block_out_channels") and isinstance(value, list) else value


def check_resume_conflicts(given: dict[str, Any], resumed: dict[str, Any]) -> None:
    """ValueError naming every given option that differs from the run being resumed, with both values."""
    conflicts = []
    for name, value in given.items():
        if name in RESUMABLE_CHANGES or name not in resumed:
            continue
        saved = _from_json(name, resumed[name])
        if (str(value) if isinstance(value, Path) else value) != saved:
            conflicts.append(f"--{name.replace('_', '-')} {_shown(value)} (the resumed run has {_shown(saved)})")
    if conflicts:
        raise ValueError("--resume: options conflict with the run being resumed: " + "; ".join(conflicts)
                         + ". Leave them out to keep the run's values, or start a new run")


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
