"""Text-to-image latent diffusion training in the Stable Diffusion layout (``diffusekit train --task ...``).

Two runs make a model (a third adapts it): ``--task vae`` trains an ``AutoencoderKL`` on the images; ``--task text-to-image``
then trains a small CLIP text encoder and a ``UNet2DConditionModel`` together on the VAE's latents,
dropping captions to ``""`` for classifier-free guidance, and saves a ``StableDiffusionPipeline``
folder (vae, text_encoder, tokenizer, unet, scheduler) that diffusekit and diffusers both load;
``--task lora`` trains a LoRA of such a pipeline's UNet attention layers (peft's ``LoraConfig``) and
saves it as ``pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights``.

Data: ``shapes`` or ``shapes-outlined`` (the synthetic captioned set of :mod:`diffusekit.training.shapes`, ``dataset_size``
images drawn from ``seed``) or a folder of images each with a caption in a ``.txt`` file of the
same name (the kohya / A1111 convention). Runs are seeded; under ``accelerate launch`` each process
takes its slice of every global batch (``--batch-size`` rows; the random draws are made for the whole
batch, so a sample gets the same ones however the batch is split) and the gradients are averaged with
one all-reduce a step, which leaves the models unwrapped (the VAE's loss calls ``encode`` and ``decode``).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import LOG_FILE, SAMPLES, TrainConfig
from .data import IMAGE_SUFFIXES, load_image_folder
from .ema import EMAWeights
from .loop import (BatchOrder, build_noise_scheduler, build_sampling_scheduler, denoising_loss, learning_rate_factor,
                   make_accelerator, own_rows, training_targets)

#: The synthetic data sets: ``--data NAME`` -> the drawing style of :func:`~diffusekit.training.shapes.render`.
SHAPES_DATA = {"shapes": "filled", "shapes-outlined": "outlined"}
#: Words every tokenizer of a shapes run knows as single tokens, beside those of the captions.
TOKENIZER_WORDS = ("a", "an", "and", "the", "on", "in", "at", "of", "with", "background")


@dataclass
class CaptionedImages:
    """uint8 images (N, 3, H, W) and one caption per image."""

    images: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """The images at ``indices`` as float32 in [-1, 1]."""
        return self.images[indices].float() / 127.5 - 1.0


def load_captioned(config: TrainConfig) -> CaptionedImages:
    """The captioned images of ``config.data``: ``"shapes"``, ``"shapes-outlined"`` or a folder with
    ``.txt`` captions."""
    if config.data in SHAPES_DATA:
        from .shapes import make_shapes

        images, scenes = make_shapes(config.dataset_size, seed=config.seed, resolution=config.resolution,
                                     style=SHAPES_DATA[config.data])
        return CaptionedImages(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                               [scene.caption for scene in scenes])
    root = Path(config.data)
    dataset = load_image_folder(root, config.resolution, channels=3)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    captions = []
    for path in files:
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            raise ValueError(f"--data {root}: {path.name} has no caption file {caption_file.name}")
        captions.append(caption_file.read_text(encoding="utf-8").strip())
    images = ((dataset.images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return CaptionedImages(images, captions)


def _optimizer(parameters, config: TrainConfig):
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, config.steps // 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, config.steps, warmup, config.min_lr_ratio))
    return optimizer, schedule


def _shard(accelerator) -> tuple[int, int]:
    """(this process, processes): which slice of every global batch is ours."""
    return accelerator.process_index, accelerator.num_processes


def _average_gradients(accelerator, parameters: list) -> None:
    """Make every process's gradients the mean over processes (one all-reduce of them all, flattened)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for parameter, chunk in zip(parameters, flat.split([g.numel() for g in grads])):
        parameter.grad = chunk.view_as(parameter).clone()


def _run_steps(config: TrainConfig, accelerator, step_loss, parameters, models: dict, optimizer, schedule) -> dict:
    """The shared optimisation loop: average, clip, step, EMA of each of ``models``, a JSON log line per
    step (main process only); returns the EMA copies."""
    from tqdm.auto import tqdm

    out, main, world = Path(config.out), accelerator.is_main_process, accelerator.num_processes
    emas = {name: EMAWeights(model, config.ema_decay) for name, model in models.items()}
    if main:
        out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (open(out / LOG_FILE, "a", encoding="utf-8", buffering=1) if main else contextlib.nullcontext()) as log, \
            tqdm(total=config.steps, desc=f"train {config.task}", disable=not (config.progress and main)) as bar:
        for step in range(1, config.steps + 1):
            loss, extra = step_loss()
            loss.backward()
            _average_gradients(accelerator, parameters)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            for name, model in models.items():
                emas[name].update(model, step)
            figures = torch.stack([loss.detach(), *extra.values()])
            if world > 1:
                figures = accelerator.reduce(figures, reduction="mean")
            record = {"step": step, "loss": figures[0].item(), "lr": lr,
                      "seconds": round(time.perf_counter() - started, 2),
                      **{name: value.item() for name, value in zip(extra, figures[1:])}, "processes": world}
            if main:
                log.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update()
    return {name: emas[name].copy_to(model).eval() for name, model in models.items()}


# -- the VAE ----------------------------------------------------------------------------------------

def build_vae(config: TrainConfig):
    """A fresh AutoencoderKL: ``vae_block_out_channels`` levels, so a factor 2**(levels - 1) down."""
    from ..models.autoencoder_kl import AutoencoderKL

    levels = len(config.vae_block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=config.latent_channels,
                         block_out_channels=tuple(config.vae_block_out_channels), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=8,
                         sample_size=config.resolution, scaling_factor=1.0)


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator, kl_weight: float,
             shard: tuple[int, int] = (0, 1)):
    """(loss, reconstruction MSE): pixel MSE + L1 of the decoded posterior sample, plus a small KL term.
    ``images`` is part ``shard`` of a global batch (the posterior noise is drawn for all of it)."""
    posterior = vae.encode(images).latent_dist
    shape = (posterior.mean.shape[0] * shard[1], *posterior.mean.shape[1:])
    noise = own_rows(torch.randn(shape, generator=generator), shard).to(images.device)
    decoded = vae.decode(posterior.mean + posterior.std * noise).sample
    mse = F.mse_loss(decoded, images)
    kl = posterior.kl().mean() / images[0].numel()
    return mse + F.l1_loss(decoded, images) + kl_weight * kl, mse


@torch.no_grad()
def latent_scaling_factor(vae, data: CaptionedImages, count: int = 512) -> float:
    """1 / the standard deviation of the latents of the first ``count`` images (SD's 0.18215, measured)."""
    device = next(vae.parameters()).device
    means = [vae.encode(data.batch(torch.arange(start, min(start + 64, count, len(data)))).to(device)).latent_dist.mean
             for start in range(0, min(count, len(data)), 64)]
    return float(1.0 / torch.cat(means).std())


def load_autoencoder_images(config: TrainConfig) -> CaptionedImages:
    """The images of a VAE run: for ``shapes`` data the dense variant (up to nine shapes an image, so
    colours and edges fill more of each batch), else ``config.data`` itself."""
    if config.data in SHAPES_DATA:
        from .shapes import make_dense_shapes

        images = make_dense_shapes(config.dataset_size, seed=config.seed, resolution=config.resolution,
                                   style=SHAPES_DATA[config.data])
        return CaptionedImages(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [""] * len(images))
    return load_captioned(config)


def train_vae(config: TrainConfig) -> Path:
    """Train an AutoencoderKL on ``config.data``; save it (with its measured ``scaling_factor``) to ``out``."""
    accelerator = make_accelerator()
    out, device, shard = Path(config.out), accelerator.device, _shard(accelerator)
    data = load_autoencoder_images(config)
    torch.manual_seed(config.seed)
    vae = build_vae(config).to(device).train()
    order, generator = BatchOrder(len(data), config.seed), torch.Generator().manual_seed(config.seed * 1_000)
    optimizer, schedule = _optimizer(vae.parameters(), config)

    def step_loss():
        rows = own_rows(order.take(config.batch_size * shard[1]), shard)
        loss, mse = vae_loss(vae, data.batch(rows).to(device), generator, config.vae_kl_weight, shard)
        return loss, {"mse": mse.detach()}

    averaged = _run_steps(config, accelerator, step_loss, list(vae.parameters()), {"vae": vae}, optimizer,
                          schedule)["vae"]
    if accelerator.is_main_process:
        averaged.register_to_config(scaling_factor=latent_scaling_factor(averaged, data))
        averaged.save_pretrained(out)
    accelerator.wait_for_everyone()
    return out


# -- text encoder and UNet --------------------------------------------------------------------------

def build_tokenizer(config: TrainConfig, captions: list[str], folder: Path):
    """A CLIP tokenizer whose vocabulary is the captions' words (each one token), saved in ``folder``."""
    from ..tokenization import CLIPTokenizer, write_word_tokenizer

    from .shapes import grammar_words

    words = {word for caption in captions for word in caption.lower().split()} | set(TOKENIZER_WORDS)
    if config.data in SHAPES_DATA:
        words |= grammar_words()
    write_word_tokenizer(folder, words, model_max_length=config.max_text_length)
    return CLIPTokenizer.from_pretrained(folder)


def build_text_encoder(config: TrainConfig, tokenizer):
    """A fresh small ``CLIPTextModel`` for ``tokenizer``'s vocabulary."""
    from ..models.clip_text import CLIPTextConfig, CLIPTextModel

    width = config.text_width
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                                 projection_dim=width, num_hidden_layers=config.text_layers,
                                 num_attention_heads=max(1, width // 16),
                                 max_position_embeddings=config.max_text_length, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(text_config)


def build_conditional_unet(config: TrainConfig, latent_channels: int, latent_size: int):
    """A fresh UNet2DConditionModel with cross-attention on every level but the first."""
    from ..models.unet_2d_condition import UNet2DConditionModel

    levels = len(config.block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    options = dict(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                   block_out_channels=tuple(config.block_out_channels), down_block_types=down, up_block_types=up,
                   layers_per_block=config.layers_per_block, cross_attention_dim=config.text_width,
                   attention_head_dim=8, norm_num_groups=config.norm_num_groups)
    options.update(config.extra_model_config)
    return UNet2DConditionModel(**options)


@torch.no_grad()
def encode_latents(vae, data: CaptionedImages, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image (the UNet run samples from them)."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for start in range(0, len(data), batch):
        posterior = vae.encode(data.batch(torch.arange(start, min(start + batch, len(data)))).to(device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def sample_latents(means: torch.Tensor, stds: torch.Tensor, scale: float, generator: torch.Generator,
                   shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Part ``shard`` of a draw from the stored posteriors of a global batch, times the VAE's
    ``scaling_factor`` (noise from ``generator``, CPU)."""
    return own_rows((means + stds * torch.randn(means.shape, generator=generator)) * scale, shard)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, as the pipelines encode prompts."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def text_to_image_loss(unet, text_encoder, scheduler, latents: torch.Tensor, ids: torch.Tensor,
                       empty_ids: torch.Tensor, generator: torch.Generator, config: TrainConfig,
                       shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The denoising loss with captions dropped to ``""`` with probability ``caption_dropout``; the rows
    are part ``shard`` of a global batch, whose dropout, timesteps and noise are drawn whole."""
    batch = latents.shape[0] * shard[1]
    drop = own_rows(torch.rand((batch,), generator=generator) < config.caption_dropout, shard)
    ids = torch.where(drop[:, None].to(ids.device), empty_ids.expand_as(ids), ids)
    timesteps = own_rows(torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator), shard)
    noise = own_rows(torch.randn((batch, *latents.shape[1:]), generator=generator), shard)
    noisy, target = training_targets(scheduler, latents, noise.to(latents.device), timesteps.to(latents.device),
                                     config.prediction_type)
    hidden = text_encoder(ids)[0]
    prediction = unet(noisy, timesteps.to(latents.device), encoder_hidden_states=hidden).sample
    return denoising_loss(prediction, target, scheduler, timesteps.to(latents.device), config.prediction_type,
                          config.snr_gamma)


def train_text_to_image(config: TrainConfig) -> Path:
    """Train a text encoder and UNet on the latents of ``config.vae``; save a StableDiffusionPipeline to ``out``."""
    from ..models.autoencoder_kl import AutoencoderKL
    from ..tokenization import CLIPTokenizer

    if config.vae is None:
        raise ValueError("--task text-to-image needs --vae: a folder from a --task vae run (or any AutoencoderKL)")
    accelerator = make_accelerator()
    out, device = Path(config.out), accelerator.device
    data = load_captioned(config)
    vae = AutoencoderKL.from_pretrained(config.vae).to(device).eval()
    means, stds = encode_latents(vae, data)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        build_tokenizer(config, data.captions, out / "tokenizer")
    accelerator.wait_for_everyone()
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    torch.manual_seed(config.seed)
    text_encoder = build_text_encoder(config, tokenizer).to(device).train()
    unet = build_conditional_unet(config, means.shape[1], means.shape[-1]).to(device).train()
    noise_scheduler = build_noise_scheduler(config)
    parameters = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer, schedule = _optimizer(parameters, config)
    step_loss = _caption_step_loss(config, accelerator, unet, text_encoder, noise_scheduler, (means, stds),
                                   vae.config.scaling_factor, tokenizer, data.captions)
    averaged = _run_steps(config, accelerator, step_loss, parameters,
                          {"unet": unet, "text_encoder": text_encoder}, optimizer, schedule)
    if accelerator.is_main_process:
        _save_text_to_image(config, vae, averaged, tokenizer, noise_scheduler, data.captions[:16])
    accelerator.wait_for_everyone()
    return out


def _save_text_to_image(config: TrainConfig, vae, trained: dict, tokenizer, noise_scheduler,
                        sample_captions: list[str]) -> None:
    """Save the StableDiffusionPipeline of a run to ``config.out`` (and a sample grid if asked)."""
    from ..pipelines.stable_diffusion import StableDiffusionPipeline

    out = Path(config.out)
    sampler = build_sampling_scheduler(noise_scheduler)
    sampler.register_to_config(steps_offset=1)  # Stable Diffusion's, which its pipelines expect
    pipeline = StableDiffusionPipeline(vae=vae.cpu(), text_encoder=trained["text_encoder"].cpu(), tokenizer=tokenizer,
                                       unet=trained["unet"].cpu(), scheduler=sampler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(out)
    if config.sample_every:
        save_caption_samples(pipeline, sample_captions, out / SAMPLES / f"step-{config.steps:07d}.png", config)


def _caption_step_loss(config: TrainConfig, accelerator, unet, text_encoder, noise_scheduler, posteriors,
                       scale: float, tokenizer, captions: list[str]):
    """The ``step_loss`` of a text-to-image or LoRA run: a global batch of latents drawn from the
    stored ``posteriors`` (means, stds) and their captions; this process's rows' denoising loss."""
    device, shard = accelerator.device, _shard(accelerator)
    means, stds = posteriors
    ids, empty_ids = tokenize(tokenizer, captions), tokenize(tokenizer, [""]).to(device)
    order, generator = BatchOrder(len(captions), config.seed), torch.Generator().manual_seed(config.seed * 1_000)

    def step_loss():
        rows = order.take(config.batch_size * shard[1])
        latents = sample_latents(means[rows], stds[rows], scale, generator, shard).to(device)
        return text_to_image_loss(unet, text_encoder, noise_scheduler, latents, own_rows(ids[rows], shard).to(device),
                                  empty_ids, generator, config, shard), {}

    return step_loss


def save_caption_samples(pipeline, captions: list[str], path: Path, config: TrainConfig, per_row: int = 8) -> Path:
    """A grid of one sample per caption."""
    from ..pipelines.image_grid import make_image_grid

    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(captions, num_inference_steps=config.sample_steps, guidance_scale=config.sample_guidance_scale,
                      generator=torch.Generator().manual_seed(config.seed), height=config.resolution,
                      width=config.resolution).images
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = int(np.ceil(len(images) / per_row))
    images += [images[-1]] * (rows * per_row - len(images))
    make_image_grid(images, rows, per_row, gap=2).save(path)
    return path


# -- a LoRA of a trained pipeline --------------------------------------------------------------------

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def train_lora(config: TrainConfig) -> Path:
    """Train a LoRA of the UNet of ``config.base`` on ``config.data``; write ``pytorch_lora_weights.safetensors``."""
    from ..pipelines.stable_diffusion import StableDiffusionPipeline

    if config.base is None:
        raise ValueError("--task lora needs --base: the Stable Diffusion pipeline folder to adapt")
    try:
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict
    except ImportError:
        raise ImportError("--task lora needs peft: pip install peft") from None
    accelerator = make_accelerator()
    out = Path(config.out)
    data = load_captioned(config)
    pipe = StableDiffusionPipeline.from_pretrained(config.base).to(accelerator.device)
    means, stds = encode_latents(pipe.vae, data)
    for model in (pipe.unet, pipe.text_encoder, pipe.vae):
        model.requires_grad_(False)
    torch.manual_seed(config.seed)
    pipe.unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                     target_modules=list(LORA_TARGETS)))
    parameters = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer, schedule = _optimizer(parameters, config)
    pipe.text_encoder.eval()
    step_loss = _caption_step_loss(config, accelerator, pipe.unet, pipe.text_encoder, build_noise_scheduler(config),
                                   (means, stds), pipe.vae.config.scaling_factor, pipe.tokenizer, data.captions)
    _run_steps(config, accelerator, step_loss, parameters, {}, optimizer, schedule)
    if accelerator.is_main_process:
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    accelerator.wait_for_everyone()
    return out
