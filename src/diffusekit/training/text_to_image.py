"""Text-to-image latent diffusion training in the Stable Diffusion layout (``diffusekit train --task ...``).

Two runs make a model (a third adapts it): ``--task vae`` trains an ``AutoencoderKL`` on the images; ``--task text-to-image``
then trains a small CLIP text encoder and a ``UNet2DConditionModel`` together on the VAE's latents,
dropping captions to ``""`` for classifier-free guidance, and saves a ``StableDiffusionPipeline``
folder (vae, text_encoder, tokenizer, unet, scheduler) that diffusekit and diffusers both load;
``--task lora`` trains a LoRA of such a pipeline's UNet attention layers (peft's ``LoraConfig``) and
saves it as ``pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights``.

Data: ``shapes`` or ``shapes-outlined`` (the synthetic captioned set of :mod:`diffusekit.training.shapes`, ``dataset_size``
images drawn from ``seed``) or a folder of images each with a caption in a ``.txt`` file of the
same name (the kohya / A1111 convention). Runs are single-process and seeded.
"""

from __future__ import annotations

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
                   training_targets)

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


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _optimizer(parameters, config: TrainConfig):
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, config.steps // 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, config.steps, warmup, config.min_lr_ratio))
    return optimizer, schedule


def _run_steps(config: TrainConfig, out: Path, step_loss, parameters, models: dict, optimizer, schedule) -> dict:
    """The shared optimisation loop: clip, step, EMA of each of ``models``, a JSON log line per step."""
    from tqdm.auto import tqdm

    emas = {name: EMAWeights(model, config.ema_decay) for name, model in models.items()}
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / LOG_FILE, "a", encoding="utf-8", buffering=1) as log, \
            tqdm(total=config.steps, desc=f"train {config.task}", disable=not config.progress) as bar:
        for step in range(1, config.steps + 1):
            loss, extra = step_loss()
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            for name, model in models.items():
                emas[name].update(model, step)
            record = {"step": step, "loss": loss.item(), "lr": lr, "seconds": round(time.perf_counter() - started, 2),
                      **extra}
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


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator, kl_weight: float):
    """(loss, reconstruction MSE): pixel MSE + L1 of the decoded posterior sample, plus a small KL term."""
    posterior = vae.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(images.device)
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
    out, device = Path(config.out), _device()
    data = load_autoencoder_images(config)
    torch.manual_seed(config.seed)
    vae = build_vae(config).to(device).train()
    order, generator = BatchOrder(len(data), config.seed), torch.Generator().manual_seed(config.seed * 1_000)
    optimizer, schedule = _optimizer(vae.parameters(), config)

    def step_loss():
        loss, mse = vae_loss(vae, data.batch(order.take(config.batch_size)).to(device), generator,
                             config.vae_kl_weight)
        return loss, {"mse": mse.item()}

    averaged = _run_steps(config, out, step_loss, list(vae.parameters()), {"vae": vae}, optimizer, schedule)["vae"]
    averaged.register_to_config(scaling_factor=latent_scaling_factor(averaged, data))
    averaged.save_pretrained(out)
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


def sample_latents(means: torch.Tensor, stds: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """A draw from the stored posteriors, times the VAE's ``scaling_factor`` (noise from ``generator``, CPU)."""
    return (means + stds * torch.randn(means.shape, generator=generator)) * scale


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, as the pipelines encode prompts."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def text_to_image_loss(unet, text_encoder, scheduler, latents: torch.Tensor, ids: torch.Tensor,
                       empty_ids: torch.Tensor, generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """The denoising loss with captions dropped to ``""`` with probability ``caption_dropout``."""
    batch = latents.shape[0]
    drop = torch.rand((batch,), generator=generator) < config.caption_dropout
    ids = torch.where(drop[:, None].to(ids.device), empty_ids.expand_as(ids), ids)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    noisy, target = training_targets(scheduler, latents, noise.to(latents.device), timesteps.to(latents.device),
                                     config.prediction_type)
    hidden = text_encoder(ids)[0]
    prediction = unet(noisy, timesteps.to(latents.device), encoder_hidden_states=hidden).sample
    return denoising_loss(prediction, target, scheduler, timesteps.to(latents.device), config.prediction_type,
                          config.snr_gamma)


def train_text_to_image(config: TrainConfig) -> Path:
    """Train a text encoder and UNet on the latents of ``config.vae``; save a StableDiffusionPipeline to ``out``."""
    from ..models.autoencoder_kl import AutoencoderKL
    from ..pipelines.stable_diffusion import StableDiffusionPipeline

    if config.vae is None:
        raise ValueError("--task text-to-image needs --vae: a folder from a --task vae run (or any AutoencoderKL)")
    out, device = Path(config.out), _device()
    data = load_captioned(config)
    vae = AutoencoderKL.from_pretrained(config.vae).to(device).eval()
    means, stds = encode_latents(vae, data)
    scale = vae.config.scaling_factor
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(config, data.captions, out / "tokenizer")
    ids, empty_ids = tokenize(tokenizer, data.captions), tokenize(tokenizer, [""])

    torch.manual_seed(config.seed)
    text_encoder = build_text_encoder(config, tokenizer).to(device).train()
    unet = build_conditional_unet(config, means.shape[1], means.shape[-1]).to(device).train()
    noise_scheduler = build_noise_scheduler(config)
    parameters = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer, schedule = _optimizer(parameters, config)
    order, generator = BatchOrder(len(data), config.seed), torch.Generator().manual_seed(config.seed * 1_000)

    def step_loss():
        rows = order.take(config.batch_size)
        latents = sample_latents(means[rows], stds[rows], scale, generator).to(device)
        return text_to_image_loss(unet, text_encoder, noise_scheduler, latents, ids[rows].to(device),
                                  empty_ids.to(device), generator, config), {}

    averaged = _run_steps(config, out, step_loss, parameters, {"unet": unet, "text_encoder": text_encoder},
                          optimizer, schedule)
    sampler = build_sampling_scheduler(noise_scheduler)
    sampler.register_to_config(steps_offset=1)  # Stable Diffusion's, which its pipelines expect
    pipeline = StableDiffusionPipeline(vae=vae.cpu(), text_encoder=averaged["text_encoder"].cpu(), tokenizer=tokenizer,
                                       unet=averaged["unet"].cpu(), scheduler=sampler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(out)
    if config.sample_every:
        save_caption_samples(pipeline, data.captions[:16], out / SAMPLES / f"step-{config.steps:07d}.png", config)
    return out


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
    out, device = Path(config.out), _device()
    data = load_captioned(config)
    pipe = StableDiffusionPipeline.from_pretrained(config.base).to(device)
    means, stds = encode_latents(pipe.vae, data)
    scale = pipe.vae.config.scaling_factor
    ids, empty_ids = tokenize(pipe.tokenizer, data.captions), tokenize(pipe.tokenizer, [""])
    for model in (pipe.unet, pipe.text_encoder, pipe.vae):
        model.requires_grad_(False)
    torch.manual_seed(config.seed)
    pipe.unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                     target_modules=list(LORA_TARGETS)))
    parameters = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer, schedule = _optimizer(parameters, config)
    order, generator = BatchOrder(len(data), config.seed), torch.Generator().manual_seed(config.seed * 1_000)
    noise_scheduler = build_noise_scheduler(config)
    pipe.text_encoder.eval()

    def step_loss():
        rows = order.take(config.batch_size)
        latents = sample_latents(means[rows], stds[rows], scale, generator).to(device)
        return text_to_image_loss(pipe.unet, pipe.text_encoder, noise_scheduler, latents, ids[rows].to(device),
                                  empty_ids.to(device), generator, config), {}

    _run_steps(config, out, step_loss, parameters, {}, optimizer, schedule)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return out
