"""Untrusted files: pickles that would run code are refused (and nothing runs); corrupt or lying
safetensors files give WeightsError naming the file, in a process that ends with a normal error."""

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import diffusekit
from diffusekit.weights import WeightsError


class _Payload:
    """Unpickling this runs ``os.system("touch <marker>")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_checkpoint(folder, name="evil.ckpt"):
    marker = folder / "MARKER"
    path = folder / name
    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": torch.zeros(1), "x": _Payload(marker)}}, path)
    return path, marker


def test_payload_is_live_when_unpickled_unsafely(tmp_path):
    """The fixture really would run code: plain unpickling creates the marker."""
    path, marker = _evil_checkpoint(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loader", ["single_file_pipeline", "single_file_unet", "single_file_vae", "lora",
                                    "textual_inversion", "convert"])
def test_code_running_pickle_is_refused(tmp_path, loader):
    path, marker = _evil_checkpoint(tmp_path, "lora.bin" if loader == "lora" else "evil.ckpt")
    with pytest.raises(WeightsError, match="evil.ckpt|lora.bin"):
        if loader == "single_file_pipeline":
            diffusekit.StableDiffusionPipeline.from_single_file(path)
        elif loader == "single_file_unet":
            diffusekit.UNet2DConditionModel.from_single_file(path)
        elif loader == "single_file_vae":
            diffusekit.AutoencoderKL.from_single_file(path)
        elif loader == "lora":
            from diffusekit.loaders.lora import read_lora_file

            read_lora_file(path)
        elif loader == "textual_inversion":
            from diffusekit.loaders.textual_inversion import read_embedding_file

            read_embedding_file(path)
        else:
            from diffusekit.loaders.single_file import convert

            convert(path, tmp_path / "out")
    assert not marker.exists()


def _corrupt_files(folder):
    """name -> bytes of broken safetensors files."""
    good = folder / "good.safetensors"
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.conv_in.weight": torch.ones(8, 4, 3, 3)}, str(good))
    data = good.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    files = {
        "empty.safetensors": b"",
        "short.safetensors": data[:5],
        "truncated.safetensors": data[: len(data) - 40],
        "header_too_long.safetensors": (10**12).to_bytes(8, "little") + data[8:],
        "header_not_json.safetensors": header_len.to_bytes(8, "little") + b"{" * header_len + data[8 + header_len:],
        "offsets_lie.safetensors": data.replace(b"[0,1152]", b"[0,9999]"),
        "random.safetensors": os.urandom(64),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return sorted(files)


def test_corrupt_safetensors_give_clear_errors_in_a_clean_process(tmp_path):
    names = _corrupt_files(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import diffusekit
        from diffusekit.loaders.lora import read_lora_file
        from diffusekit.loaders.single_file import read_checkpoint
        from diffusekit.weights import WeightsError

        folder = Path({str(tmp_path)!r})
        last = None
        for name in {names!r}:
            for load in (read_checkpoint, read_lora_file, diffusekit.UNet2DConditionModel.from_single_file):
                try:
                    load(folder / name)
                except WeightsError as err:
                    assert name in str(err), (name, str(err))
                    print("OK", name, load.__name__, err)
                    last = err
                else:
                    print("LOADED", name)
                    sys.exit(3)
        raise last
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]  # an ordinary uncaught Python error, not a crash
    assert "diffusekit.weights.WeightsError" in result.stderr
    assert result.stdout.count("OK ") == 3 * len(names), result.stdout


def test_pickle_protocol_objects_are_not_constructed(tmp_path):
    """A pickle naming an arbitrary global is refused by the weights-only unpickler."""
    path = tmp_path / "global.bin"
    path.write_bytes(pickle.dumps({"w": _Payload(tmp_path / "MARKER")}))
    with pytest.raises(WeightsError, match="global.bin"):
        diffusekit.weights.load_pickle(path)
    assert not (tmp_path / "MARKER").exists()
