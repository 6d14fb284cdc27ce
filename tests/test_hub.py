"""The Hub code path, against a cache folder the test fills (never the network)."""

import re
import shutil

import pytest
import torch

from diffusekit.hub import resolve_file
from helpers import TinyModel, tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache, repo_id, source, revision="main", commit=COMMIT):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return repo


def test_repo_id_loads_from_the_cache(tmp_path):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "src")
    fill_cache(tmp_path / "cache", "someone/tiny", tmp_path / "src")
    loaded = TinyModel.from_pretrained("someone/tiny", cache_dir=tmp_path / "cache", local_files_only=True)
    assert torch.equal(loaded.conv_in.weight, model.conv_in.weight)
    path = resolve_file("someone/tiny", "config.json", cache_dir=tmp_path / "cache")
    assert COMMIT in str(path)


def test_revision_selects_the_snapshot(tmp_path):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    fill_cache(tmp_path / "cache", "someone/tiny", tmp_path / "a")
    fill_cache(tmp_path / "cache", "someone/tiny", tmp_path / "b", revision="v2", commit="f" * 40)
    loaded = TinyModel.from_pretrained("someone/tiny", cache_dir=tmp_path / "cache", revision="v2")
    assert torch.equal(loaded.conv_in.weight, second.conv_in.weight)


def test_unknown_repo_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="nobody/nothing"):
        TinyModel.from_pretrained("nobody/nothing", cache_dir=tmp_path)


@pytest.fixture
def no_hub(monkeypatch):
    """Any call into huggingface_hub's downloads fails the test."""
    import huggingface_hub

    def called(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args}")

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, called)


@pytest.mark.parametrize("name", ["./nope", "nope/", "../x", "~/surely-not-here", "/abs/nope", "C:\\x",
                                  "x.safetensors", "model.ckpt", "emb.pt", "a/b/c", "not a repo"])
def test_missing_local_paths_fail_without_the_hub(name, no_hub, tmp_path, monkeypatch):
    from diffusekit.hub import resolve_first_file, resolve_folder

    # relative names resolve against an empty folder (from a checkout named x, "../x" would exist)
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")

    message = f"^{re.escape(name)}: no such file or folder$"
    with pytest.raises(FileNotFoundError, match=message):
        resolve_folder(name)
    with pytest.raises(FileNotFoundError, match=message):
        resolve_file(name, "model_index.json")
    with pytest.raises(FileNotFoundError, match=message):
        resolve_first_file(name, ["pytorch_lora_weights.safetensors"], "LoRA")
    with pytest.raises(FileNotFoundError, match=message):
        TinyModel.from_pretrained(name)


@pytest.mark.parametrize("name", ["org/name", "gpt2", "harmonai/maestro-150k", "org/name.v2"])
def test_repo_ids_still_go_to_the_hub(name, no_hub):
    with pytest.raises(OSError, match="AssertionError: the Hub was asked for"):
        resolve_file(name, "config.json")
