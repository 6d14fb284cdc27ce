"""The training loop: UNet2DModel denoising training with accelerate, EMA, checkpoints and samples.

Runs on one CPU, one GPU or, under ``accelerate launch``, several GPUs or machines (each process
takes its slice of every global batch; gradients are averaged by accelerate).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import (checkpoint_dir, find_checkpoint, load_checkpoint, load_process_rng, save_checkpoint,
                         save_process_rng)
from .config import LOG_FILE, SAMPLES, TrainConfig
from .data import ImageDataset, load_dataset, save_class_names
from .ema import EMAWeights


# -- model, schedulers, targets ---------------------------------------------------------------------

def build_unet(config: TrainConfig, channels: int, num_classes: int = 0):
    """A fresh UNet2DModel; class-conditional models get ``num_classes + 1`` embeddings (the last is null)."""
    from ..models.unet_2d import UNet2DModel

    levels = len(config.block_out_channels)
    down = ["DownBlock2D"] * levels
    if config.attention_last_level:
        down[-1] = "AttnDownBlock2D"
    up = [name.replace("Down", "Up") for name in reversed(down)]
    options = dict(
        sample_size=config.resolution, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(config.block_out_channels), down_block_types=tuple(down),
        up_block_types=tuple(up), layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups, attention_head_dim=8,
        num_class_embeds=num_classes + 1 if num_classes else None,
    )
    options.update(config.extra_model_config)
    return UNet2DModel(**options)


def build_noise_scheduler(config: TrainConfig):
    """The DDPMScheduler whose forward process the model is trained on."""
    from ..schedulers.ddpm import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type)


def build_sampling_scheduler(noise_scheduler):
    """The DDIMScheduler shipped with the trained pipeline (same noise schedule, fast sampling).

    ``clip_sample`` is off: clipping the predicted clean image while keeping the unclipped noise
    prediction makes guided samples (guidance above about 2) degrade into speckle.
    """
    from ..schedulers.ddim import DDIMScheduler

    c = noise_scheduler.config
    return DDIMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                         beta_start=c.beta_start, beta_end=c.beta_end, prediction_type=c.prediction_type,
                         clip_sample=False)


def training_targets(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy input, regression target) for a batch: epsilon or v-prediction."""
    noisy = scheduler.add_noise(clean, noise, timesteps)
    if prediction_type == "epsilon":
        return noisy, noise
    if prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(clean, noise, timesteps)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, scheduler, timesteps: torch.Tensor,
                   prediction_type: str, snr_gamma: float | None = None) -> torch.Tensor:
    """Mean squared error; with ``snr_gamma``, each sample weighted by min(SNR, gamma) / SNR for
    epsilon targets and min(SNR, gamma) / (SNR + 1) for v targets (min-SNR weighting, Hang et al. 2023)."""
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    error = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = snr.clamp(max=snr_gamma)
    weight = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    return (weight * error).mean()


def drop_labels(labels: torch.Tensor, null_class: int, prob: float, generator: torch.Generator,
                shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``prob`` (classifier-free guidance training)."""
    drop = own_rows(torch.rand((labels.shape[0] * shard[1],), generator=generator), shard) < prob
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


def own_rows(draw: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """Part ``index`` of ``count`` equal parts of a draw made for the whole global batch."""
    index, count = shard
    size = draw.shape[0] // count
    return draw[index * size:(index + 1) * size]


def compute_loss(model, scheduler, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                 prediction_type: str, null_class: int | None = None, null_class_prob: float = 0.0,
                 shard: tuple[int, int] = (0, 1), snr_gamma: float | None = None) -> torch.Tensor:
    """Mean squared error (min-SNR weighted with ``snr_gamma``) of the model's prediction at random timesteps; randomness from ``generator`` (CPU).

    ``images`` is part ``index`` of ``count`` equal parts of a global batch (``shard``; one process:
    ``(0, 1)``). Timesteps, noise and dropped labels are drawn for the whole global batch and each
    process keeps its rows, so every sample gets the same draws however the batch is split.
    """
    batch, count = images.shape[0], shard[1]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch * count,), generator=generator)
    noise = torch.randn((batch * count, *images.shape[1:]), generator=generator, dtype=torch.float32)
    timesteps = own_rows(timesteps, shard).to(images.device)
    noise = own_rows(noise, shard).to(images.device, images.dtype)
    noisy, target = training_targets(scheduler, images, noise, timesteps, prediction_type)
    if labels is not None and null_class is not None and null_class_prob > 0:
        labels = drop_labels(labels, null_class, null_class_prob, generator, shard)
    prediction = model(noisy, timesteps, class_labels=labels).sample
    return denoising_loss(prediction, target, scheduler, timesteps, prediction_type, snr_gamma)


def learning_rate_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class BatchOrder:
    """Shuffled passes over the dataset; pass ``e`` uses a permutation seeded by (seed, e).

    The state is just (epoch, position), so a resumed run draws the same batches.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.size, self.seed, self.epoch, self.position = size, seed, epoch, position
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator)

    def take(self, count: int) -> torch.Tensor:
        parts, needed = [], count
        while needed:
            chunk = self._order[self.position:self.position + needed]
            parts.append(chunk)
            needed -= chunk.numel()
            self.position += chunk.numel()
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
        return torch.cat(parts)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


# -- the loop ---------------------------------------------------------------------------------------

def _mixed_precision(config: TrainConfig) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(mixed_precision: str = "no"):
    """accelerate's ``Accelerator``: one process, or the process group of ``accelerate launch`` or
    ``torchrun`` (gloo on a machine without CUDA)."""
    try:
        from accelerate import Accelerator
    except ImportError:
        raise ImportError("training needs accelerate: pip install 'diffusekit[train]'") from None
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _make_pipeline(unet, noise_scheduler, class_conditional: bool):
    if class_conditional:
        from ..pipelines.class_conditional import ClassConditionalPipeline

        return ClassConditionalPipeline(unet=unet, scheduler=build_sampling_scheduler(noise_scheduler))
    from ..pipelines.ddim import DDIMPipeline

    return DDIMPipeline(unet=unet, scheduler=build_sampling_scheduler(noise_scheduler))


def _ema_copy(model, ema: EMAWeights):
    """A new model (float32 where averaged) holding the EMA weights; draws no random numbers."""
    state = {key: ema.shadow[key].clone() if key in ema.shadow else value.detach().clone()
             for key, value in model.state_dict().items()}
    with torch.device("meta"):
        averaged = type(model).from_config(dict(model.config))
    averaged.load_checked_state_dict(state, source="EMA weights")
    return averaged.eval()


def save_sample_grid(pipeline, path: Path, config: TrainConfig, num_classes: int, per_row: int = 8) -> Path:
    """A grid of samples: one row per class (up to 10), or 4 rows when unconditional."""
    from ..pipelines.image_grid import make_image_grid

    generator = torch.Generator().manual_seed(config.seed)
    pipeline.set_progress_bar_config(disable=True)
    if num_classes:
        rows = min(num_classes, 10)
        labels = [c for c in range(rows) for _ in range(per_row)]
        images = pipeline(class_labels=labels, guidance_scale=config.sample_guidance_scale,
                          num_inference_steps=config.sample_steps, generator=generator).images
    else:
        rows = 4
        images = pipeline(batch_size=rows * per_row, num_inference_steps=config.sample_steps,
                          generator=generator).images
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 64 // config.resolution)
    make_image_grid(images, rows, per_row, scale=scale, gap=2).save(path)
    return path


def train(config: TrainConfig) -> Path:
    """Train a UNet2DModel as ``config`` says; return the output folder, a loadable pipeline.

    The folder holds the EMA weights as a pipeline (``ClassConditionalPipeline`` when
    class-conditional, else ``DDIMPipeline``), ``checkpoints/``, ``samples/`` and ``train_log.jsonl``.
    """
    from tqdm.auto import tqdm

    config.check()
    out = Path(config.out)
    accelerator = make_accelerator(_mixed_precision(config))
    rank, world = accelerator.process_index, accelerator.num_processes

    channels = 1 if isinstance(config.data, str) and config.data == "sklearn-digits" else config.channels
    dataset: ImageDataset = load_dataset(config.data, config.resolution, labels=config.labels, channels=channels)
    num_classes = dataset.num_classes if config.class_conditional else 0
    if config.class_conditional and dataset.labels is None:
        raise ValueError("--class-conditional needs labelled data (class subfolders, labels=, or sklearn-digits)")

    noise_scheduler = build_noise_scheduler(config)
    # The same stream on every process: each draws for the global batch and keeps its rows (compute_loss).
    generators = {"noise": torch.Generator().manual_seed(config.seed * 1_000)}
    step, order = 0, BatchOrder(len(dataset), config.seed)
    resume_from = find_checkpoint(config.resume) if config.resume is not None else None
    if resume_from is not None:
        from ..models.unet_2d import UNet2DModel

        model = UNet2DModel.from_pretrained(resume_from / "unet").train()
        if model.config.in_channels != dataset.images.shape[1]:
            raise ValueError(f"--resume {resume_from}: model has {model.config.in_channels} channels, "
                             f"data has {dataset.images.shape[1]}")
        num_classes = (model.config.num_class_embeds or 1) - 1
    else:
        torch.manual_seed(config.seed)
        model = build_unet(config, dataset.images.shape[1], num_classes)
    null_class = num_classes if num_classes else None

    ema = EMAWeights(model, config.ema_decay)
    warmup = min(config.warmup_steps, config.steps // 5)  # short runs still reach the peak rate
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, config.steps, warmup, config.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    if resume_from is not None:
        ema_state, optimizer_state, trainer_state = load_checkpoint(resume_from)
        ema.load_state_dict(ema_state)
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
        if accelerator.scaler is not None and trainer_state.get("grad_scaler"):
            accelerator.scaler.load_state_dict(trainer_state["grad_scaler"])
        step = trainer_state["step"]
        order = BatchOrder(len(dataset), config.seed, **trainer_state["data_order"])
        load_process_rng(resume_from, rank, generators)

    def checkpoint() -> None:
        folder = checkpoint_dir(out, step)
        if accelerator.is_main_process:
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            save_checkpoint(folder, model=accelerator.unwrap_model(model), ema_state=ema.state_dict(),
                            optimizer_state=optimizer.state_dict(), trainer_state={
                                "step": step, "data_order": order.state(), "lr_scheduler": lr_scheduler.state_dict(),
                                "grad_scaler": scaler, "num_classes": num_classes, "config": config.to_json()})
        accelerator.wait_for_everyone()
        folder.mkdir(parents=True, exist_ok=True)
        save_process_rng(folder, rank, generators)
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if num_classes:
            save_class_names(out, dataset)
    log = open(out / LOG_FILE, "a", encoding="utf-8") if accelerator.is_main_process else None
    bar = tqdm(total=config.steps, initial=step, desc="train", disable=not (config.progress and accelerator.is_main_process))
    model.train()
    try:
        while step < config.steps:
            total = 0.0
            for micro in range(config.grad_accum):
                indices = order.take(config.batch_size * world)[rank * config.batch_size:(rank + 1) * config.batch_size]
                images = dataset.images[indices].to(device)
                labels = dataset.labels[indices].to(device) if num_classes else None
                sync = micro == config.grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss = compute_loss(model, noise_scheduler, images, labels, generators["noise"],
                                        config.prediction_type, null_class, config.null_class_prob, (rank, world),
                                        config.snr_gamma)
                    accelerator.backward(loss / config.grad_accum)
                total += loss.detach().float() / config.grad_accum
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            ema.update(accelerator.unwrap_model(model), step)
            loss_value = accelerator.reduce(total, "mean").item() if world > 1 else total.item()
            bar.set_postfix(loss=f"{loss_value:.4f}")
            bar.update()
            if log is not None:
                log.write(json.dumps({"step": step, "loss": loss_value, "lr": lr, "processes": world}) + "\n")
            if (config.save_every and step % config.save_every == 0) or step == config.steps:
                checkpoint()
            if config.sample_every and step % config.sample_every == 0 and accelerator.is_main_process:
                sample_model = _ema_copy(accelerator.unwrap_model(model), ema)
                pipeline = _make_pipeline(sample_model, noise_scheduler, bool(num_classes))
                save_sample_grid(pipeline, out / SAMPLES / f"step-{step:07d}.png", config, num_classes)
    finally:
        bar.close()
        if log is not None:
            log.close()

    if accelerator.is_main_process:
        final = _ema_copy(accelerator.unwrap_model(model), ema)
        _make_pipeline(final, noise_scheduler, bool(num_classes)).save_pretrained(out)
    accelerator.wait_for_everyone()
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Save a checkpoint's EMA weights as a loadable pipeline folder ``out`` (e.g. to ship an earlier step)."""
    from ..models.unet_2d import UNet2DModel

    folder = find_checkpoint(checkpoint)
    ema_state, _, trainer_state = load_checkpoint(folder)
    settings = trainer_state["config"]
    config = TrainConfig(num_train_timesteps=settings["num_train_timesteps"], beta_schedule=settings["beta_schedule"],
                         prediction_type=settings["prediction_type"])
    model = UNet2DModel.from_pretrained(folder / "unet")
    ema = EMAWeights(model, 0.0)
    ema.load_state_dict(ema_state)
    pipeline = _make_pipeline(_ema_copy(model, ema), build_noise_scheduler(config), trainer_state["num_classes"] > 0)
    pipeline.save_pretrained(out)
    return Path(out)
