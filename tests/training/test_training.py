"""The training loop: it learns, it resumes exactly, its targets match the reference scheduler's."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusekit.training import TrainConfig, add_train_arguments, train
from diffusekit.training.config import config_from_args
from diffusekit.training.data import load_dataset
from diffusekit.training.loop import build_noise_scheduler, compute_loss, denoising_loss, learning_rate_factor

TINY = dict(resolution=8, block_out_channels=(8, 16), layers_per_block=1, attention_last_level=False,
            norm_num_groups=4, warmup_steps=2, sample_every=0, progress=False, batch_size=8)


def tiny_dataset(n: int = 16):
    """Bars and squares: two classes of 8x8 images in [-1, 1]."""
    images = -np.ones((n, 8, 8), dtype=np.float32)
    labels = np.arange(n) % 2
    for i, label in enumerate(labels):
        if label:
            images[i, 2:6, 2:6] = 1.0
        else:
            images[i, :, 3 + i % 2] = 1.0
    return images, labels


def read_log(out: Path) -> dict[int, float]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def test_training_lowers_the_loss(tmp_path):
    from diffusekit import UNet2DModel

    images, labels = tiny_dataset()
    config = TrainConfig(data=images, labels=labels, steps=30, out=tmp_path / "run", lr=3e-3, save_every=0,
                         class_conditional=True, **TINY)
    out = train(config)
    dataset = load_dataset(images, 8, labels=labels)
    scheduler = build_noise_scheduler(config)

    def held_loss(model):
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(compute_loss(model.eval(), scheduler, dataset.images, dataset.labels, generator, "epsilon")
                       for _ in range(4)).item() / 4

    torch.manual_seed(config.seed)  # train() builds its model right after seeding like this
    from diffusekit.training.loop import build_unet

    initial = build_unet(config, 1, num_classes=2)
    trained = UNet2DModel.from_pretrained(out / "checkpoints" / "step-0000030" / "unet")
    assert held_loss(trained) < 0.7 * held_loss(initial)
    assert trained.config.num_class_embeds == 3  # two classes and the null class


def test_checkpoint_resumes_exactly(tmp_path):
    images, labels = tiny_dataset()
    common = dict(data=images, labels=labels, steps=6, class_conditional=True, grad_accum=2, lr=2e-3,
                  save_every=3, **TINY)
    straight = train(TrainConfig(out=tmp_path / "straight", **common))
    checkpoint = straight / "checkpoints" / "step-0000003"
    resumed = train(TrainConfig(out=tmp_path / "resumed", resume=checkpoint, **common))

    losses_straight, losses_resumed = read_log(straight), read_log(resumed)
    assert sorted(losses_resumed) == [4, 5, 6]
    assert [losses_resumed[s] for s in (4, 5, 6)] == [losses_straight[s] for s in (4, 5, 6)]
    end_a, end_b = straight / "checkpoints" / "step-0000006", resumed / "checkpoints" / "step-0000006"
    for name in ("unet/diffusion_pytorch_model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(end_a / name), load_file(end_b / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state_a, state_b = (json.loads((d / "trainer_state.json").read_text()) for d in (end_a, end_b))
    for key in ("step", "data_order", "lr_scheduler"):
        assert state_a[key] == state_b[key]
    # no pickles anywhere: tensors in safetensors, the rest in JSON
    assert {p.suffix for p in end_a.rglob("*") if p.is_file()} == {".json", ".safetensors"}


def test_resume_refuses_a_folder_without_checkpoints(tmp_path):
    images, labels = tiny_dataset()
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train(TrainConfig(data=images, labels=labels, steps=1, out=tmp_path / "o", resume=tmp_path, **TINY))


def test_learning_rate_warms_up_then_decays():
    factors = [learning_rate_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-2)


def test_min_snr_weighting_follows_the_formula():
    scheduler = build_noise_scheduler(TrainConfig(beta_schedule="linear"))
    prediction, target = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    timesteps = torch.tensor([0, 400, 999])
    assert denoising_loss(prediction, target, scheduler, timesteps, "epsilon") == torch.nn.functional.mse_loss(prediction, target)
    error = (prediction - target).pow(2).mean((1, 2, 3))
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    for kind, weight in (("epsilon", snr.clamp(max=5) / snr), ("v_prediction", snr.clamp(max=5) / (snr + 1))):
        expected = (weight * error).mean()
        assert torch.allclose(denoising_loss(prediction, target, scheduler, timesteps, kind, 5.0), expected)
    assert snr[0] > 5 > snr[2]  # both sides of the clamp are exercised
    with pytest.raises(ValueError, match="snr_gamma"):
        TrainConfig(snr_gamma=0.0).check()


def test_command_line_arguments_fill_the_config(tmp_path):
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--data", "sklearn-digits", "--resolution", "16", "--steps", "7", "--out", str(tmp_path),
                              "--class-conditional", "--prediction-type", "v_prediction", "--grad-accum", "2",
                              "--resume", str(tmp_path / "ck"), "--seed", "3", "--snr-gamma", "5"])
    config = config_from_args(args)
    assert (config.data, config.resolution, config.steps, config.out) == ("sklearn-digits", 16, 7, tmp_path)
    assert config.class_conditional and config.prediction_type == "v_prediction"
    assert (config.grad_accum, config.resume, config.seed, config.snr_gamma) == (2, tmp_path / "ck", 3, 5.0)


def test_bad_settings_raise_value_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        TrainConfig(prediction_type="sample_x").check()
    with pytest.raises(ValueError, match="resolution"):
        TrainConfig(resolution=10, block_out_channels=(8, 16, 16)).check()
    with pytest.raises(ValueError, match="labelled"):
        train(TrainConfig(data=np.zeros((4, 8, 8), np.float32), class_conditional=True, steps=1, out=Path("unused"), **TINY))


def test_image_folder_subfolders_are_classes(tmp_path):
    from PIL import Image

    for name, value in (("cat", 0), ("dog", 255)):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (12, 10), (value, value, value)).save(tmp_path / name / f"{i}.png")
    dataset = load_dataset(tmp_path, 8, channels=3)
    assert dataset.images.shape == (4, 3, 8, 8) and dataset.class_names == ["cat", "dog"]
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert dataset.images[0].max() == -1.0 and dataset.images[-1].min() == 1.0


def test_sklearn_digits_are_scaled_and_resized():
    pytest.importorskip("sklearn")
    dataset = load_dataset("sklearn-digits", 16)
    assert dataset.images.shape == (1797, 1, 16, 16) and dataset.num_classes == 10
    assert dataset.images.min() >= -1 and dataset.images.max() <= 1


def test_resumed_settings_fill_unset_options_and_conflicts_are_named(tmp_path):
    parser = add_train_arguments(argparse.ArgumentParser())
    saved = TrainConfig(resolution=8, lr=3e-3, block_out_channels=(8, 16), class_conditional=True, seed=4).to_json()
    args = parser.parse_args(["--data", "sklearn-digits", "--steps", "9", "--out", str(tmp_path), "--save-every", "3"])
    config = config_from_args(args, saved)
    assert (config.resolution, config.lr, config.block_out_channels) == (8, 3e-3, (8, 16))
    assert config.class_conditional and config.seed == 4
    assert (config.steps, config.save_every, config.out) == (9, 3, tmp_path)  # these may change on resume
    same = parser.parse_args(["--data", "sklearn-digits", "--steps", "9", "--out", str(tmp_path), "--lr", "0.003",
                              "--block-out-channels", "8,16"])
    assert config_from_args(same, saved).lr == 3e-3
    clash = parser.parse_args(["--data", "other", "--steps", "9", "--out", str(tmp_path), "--seed", "5",
                               "--block-out-channels", "8,32"])
    with pytest.raises(ValueError) as error:
        config_from_args(clash, saved)
    assert str(error.value) == (
        "--resume: options conflict with the run being resumed: --data other (the resumed run has sklearn-digits); "
        "--seed 5 (the resumed run has 4); --block-out-channels 8,32 (the resumed run has 8,16). "
        "Leave them out to keep the run's values, or start a new run")
