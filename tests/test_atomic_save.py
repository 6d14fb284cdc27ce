"""Saves are atomic and leave only their own weights files; loading never prefers a stale file."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusekit.weights import WeightsError, load_safetensors, save_weights
from helpers import TinyModel, tiny_model

SINGLE = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
HELPERS = str(Path(__file__).parent)


def weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "config.json")


def assert_same(model: TinyModel, folder: Path, **kwargs) -> None:
    loaded = TinyModel.from_pretrained(folder, **kwargs)
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_sharded_save_over_single_and_back(tmp_path):
    first, second, third = tiny_model(0), tiny_model(1), tiny_model(2)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path, max_shard_size=400)
    shards = set(json.loads((tmp_path / INDEX).read_text())["weight_map"].values())
    assert len(shards) == 2 and weight_files(tmp_path) == sorted({INDEX, *shards})
    assert_same(second, tmp_path)
    third.save_pretrained(tmp_path)
    assert weight_files(tmp_path) == [SINGLE]
    assert_same(third, tmp_path)


def test_sharded_save_over_sharded_save_and_other_formats(tmp_path):
    tiny_model(0).save_pretrained(tmp_path, safe_serialization=False)
    tiny_model(0).save_pretrained(tmp_path, variant="fp16")
    first, second = tiny_model(1), tiny_model(2)
    first.save_pretrained(tmp_path, max_shard_size=400)
    second.save_pretrained(tmp_path, max_shard_size=400)
    shards = json.loads((tmp_path / INDEX).read_text())["weight_map"].values()
    kept = sorted({INDEX, *shards, "diffusion_pytorch_model.fp16.safetensors"})
    assert weight_files(tmp_path) == kept  # the .bin and the first save's shards are gone, the variant stays
    assert_same(second, tmp_path)


def test_both_layouts_present_loads_the_later_save(tmp_path):
    """A save killed after its commit but before removing the other layout."""
    old, new = tiny_model(1), tiny_model(2)
    old.save_pretrained(tmp_path / "a", max_shard_size=400)
    new.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / SINGLE).rename(tmp_path / "a" / SINGLE)
    assert_same(new, tmp_path / "a")
    old.save_pretrained(tmp_path / "d")
    new.save_pretrained(tmp_path / "c", max_shard_size=400)
    for name in os.listdir(tmp_path / "c"):
        if name != "config.json":
            (tmp_path / "c" / name).rename(tmp_path / "d" / name)
    assert_same(new, tmp_path / "d")


def test_foreign_index_and_single_file_follow_the_reference(tmp_path):
    """Files without save ids (other writers): the index wins, as in the reference."""
    indexed, single = tiny_model(1), tiny_model(2)
    indexed.save_pretrained(tmp_path, max_shard_size=400)
    index = json.loads((tmp_path / INDEX).read_text())
    del index["metadata"]["diffusekit_save_id"]
    (tmp_path / INDEX).write_text(json.dumps(index))
    save_file({k: v.contiguous() for k, v in single.state_dict().items()}, str(tmp_path / SINGLE))
    assert_same(indexed, tmp_path)


def test_shards_of_two_saves_are_refused(tmp_path):
    tiny_model(1).save_pretrained(tmp_path / "a", max_shard_size=400)
    tiny_model(2).save_pretrained(tmp_path / "b", max_shard_size=400)
    shard = sorted(set(json.loads((tmp_path / "a" / INDEX).read_text())["weight_map"].values()))[1]
    (tmp_path / "b" / shard).replace(tmp_path / "a" / shard)
    with pytest.raises(WeightsError) as err:
        TinyModel.from_pretrained(tmp_path / "a")
    assert shard in str(err.value) and "mixes two saves" in str(err.value)


def test_reference_reader_reads_our_files(tmp_path):
    """safetensors' own (Rust) reader accepts our layout, single and sharded, with the same tensors."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size=400)
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())
    files = [tmp_path / "single" / SINGLE, *{tmp_path / "sharded" / name for name in index["weight_map"].values()}]
    read = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            read.update({(path.parent.name, key): f.get_tensor(key) for key in f.keys()})
    for key, value in model.state_dict().items():
        assert torch.equal(read["single", key], value) and torch.equal(read["sharded", key], value)


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {helpers!r})
    import diffusekit.weights as weights
    from helpers import tiny_model

    real = weights.write_safetensors
    count = 0

    def slow(tensors, f, metadata):
        global count
        count += 1
        if count == {stop_at}:
            f.write(b"x" * 4096)
            f.flush()
            print("STOPPED", flush=True)
            time.sleep(60)
        real(tensors, f, metadata)

    weights.write_safetensors = slow
    tiny_model(9).save_pretrained({folder!r}, {options})
""")


@pytest.mark.parametrize("previous, options, stop_at", [
    ("sharded", "max_shard_size=400", 2), ("single", "", 1), ("sharded", "", 1),
], ids=["sharded-over-sharded", "single-over-single", "single-over-sharded"])
def test_killed_save_leaves_the_previous_model(tmp_path, previous, options, stop_at):
    old = tiny_model(1)
    old.save_pretrained(tmp_path, **({"max_shard_size": 400} if previous == "sharded" else {}))
    before = weight_files(tmp_path)
    script = KILLED_SAVE.format(helpers=HELPERS, stop_at=stop_at, folder=str(tmp_path), options=options)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "STOPPED"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert any(name.endswith(".diffusekit-tmp") for name in os.listdir(tmp_path))
    assert_same(old, tmp_path)
    new = tiny_model(2)
    new.save_pretrained(tmp_path, max_shard_size=400 if previous == "sharded" else "10GB")
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]
    assert len(weight_files(tmp_path)) == len(before)
    assert_same(new, tmp_path)


def test_pipeline_save_writes_model_index_atomically(tmp_path):
    from diffusekit import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    (tmp_path / ".model_index.json.0123456789ab.diffusekit-tmp").write_bytes(b"x" * 1000)  # a killed save's
    pipe.save_pretrained(tmp_path)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    # copy_weights reaches the components: rewriting the file in place does not reach the model
    loaded = DiffusionPipeline.from_pretrained(tmp_path, copy_weights=True)
    path = tmp_path / "unet" / SINGLE
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.seek(8 + header_len)
        f.write(bytes(path.stat().st_size - 8 - header_len))
    for key, value in unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value), key


COPY_MODE = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {helpers!r})
    from helpers import TinyModel
    folder = {folder!r}
    model = TinyModel.from_pretrained(folder, copy_weights={copy_weights})
    os.truncate(os.path.join(folder, "diffusion_pytorch_model.safetensors"), 0)
    out = model(torch.ones(1, 3, 4, 4))
    print(repr(out.sum().item()))
""")


def test_copy_mode_survives_truncation_of_the_file(tmp_path):
    model = tiny_model(channels=3, hidden=64)  # 64 channels: tensors that a map would not copy
    model.save_pretrained(tmp_path)
    script = COPY_MODE.format(helpers=HELPERS, folder=str(tmp_path), copy_weights="True")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        expected = model(torch.ones(1, 3, 4, 4)).sum().item()
    assert float(result.stdout.strip()) == expected


@pytest.mark.parametrize("how", ["argument", "environment", "default"])
def test_copy_mode_gives_private_tensors(tmp_path, monkeypatch, how):
    """The file rewritten in place (same size): copies keep the loaded values, a map shows the new bytes."""
    (path,) = save_weights({"a": torch.arange(64.0)}, tmp_path)  # aligned: mapped unless copied
    monkeypatch.setenv("DIFFUSEKIT_COPY_WEIGHTS", "1" if how == "environment" else "0")
    loaded = load_safetensors(path, copy=True if how == "argument" else None)["a"]
    with open(path, "r+b") as f:
        f.seek(-64 * 4, os.SEEK_END)
        f.write(bytes(64 * 4))
    expected = torch.zeros(64) if how == "default" else torch.arange(64.0)
    assert torch.equal(loaded, expected)
