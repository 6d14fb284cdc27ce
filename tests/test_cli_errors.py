"""User errors of the real ``diffusekit`` entry point: one ``error: ...`` line on stderr, status 2, no
traceback (``--debug`` shows it); bugs get one line and status 1; a closed stdout pipe ends quietly."""

import os
import subprocess
import sys

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffusekit.cli import main
from diffusekit.cli_metadata import save_png


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "diffusekit", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def assert_user_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr == f"error: {message}\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(folder / "photo.jpg")
    info = PngInfo()
    info.add_text("diffusekit", "{not json")
    Image.new("RGB", (8, 8)).save(folder / "bad-json.png", pnginfo=info)
    (folder / "a-file").write_text("")
    return folder


def test_bad_options_fail_before_loading_anything(files, tmp_path):
    cases = [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--strength", "1.5"], "--strength must lie in [0, 1], got 1.5"),
        (["--image", files / "nope.png"], f"--image {files / 'nope.png'}: no such file"),
        (["--image", files / "photo.jpg", "--mask", files / "notes.txt"],
         f"--mask {files / 'notes.txt'}: not a readable image (cannot identify image file '{files / 'notes.txt'}')"),
        (["--mask", files / "photo.jpg"], "--mask needs --image (the picture to inpaint)"),
        (["--out", files / "a-file"], f"--out {files / 'a-file'}: exists and is not a folder"),
        (["--out", files / "a-file" / "sub"], f"--out {files / 'a-file' / 'sub'}: cannot create the folder "
                                              f"({files / 'a-file'} is a file)"),
        (["--scheduler", "bogus"], "--scheduler bogus: unknown name; `diffusekit schedulers` lists them"),
    ]
    for options, message in cases:
        out = [] if "--out" in options else ["--out", tmp_path]
        assert_user_error(run_cli("generate", *options, *out), message)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_device_size_and_class_errors_name_the_option(tmp_path, capsys):
    import torch

    def error(*options) -> str:
        assert main(["generate", *map(str, options), "--out", str(tmp_path)]) == 2
        return capsys.readouterr().err

    if not torch.cuda.is_available():
        assert error("--device", "cuda").startswith("error: --device cuda: CUDA is not available")
    assert error("--height", "32", "--steps", "1") == ("error: --height/--width: ClassConditionalPipeline makes "
                                                      "16x16 images only (the model's size), got 16x32\n")
    assert error("--width", "16", "--height", "16", "--class-label", "12") == \
        "error: --class-label 12: the model has classes 0 to 9\n"
    assert error("--class-label", "seven") == "error: --class-label seven: not a class number or name\n"
    assert error("diffusekit:digits", "--prompt", "a cat") == "error: ClassConditionalPipeline does not take prompt\n"
    assert error("--lora", tmp_path) == "error: --lora: ClassConditionalPipeline does not take LoRAs\n"
    assert list(tmp_path.iterdir()) == []


def test_info_refuses_files_it_cannot_read(files):
    assert_user_error(run_cli("info", files / "notes.txt"),
                      f"{files / 'notes.txt'}: not a readable image (cannot identify image file "
                      f"'{files / 'notes.txt'}')")
    assert_user_error(run_cli("info", files / "photo.jpg"),
                      f"{files / 'photo.jpg'}: a JPEG image; generation parameters are read from PNG files")
    result = run_cli("info", files / "bad-json.png")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {files / 'bad-json.png'}: the 'diffusekit' text chunk is not valid JSON")


@pytest.mark.parametrize("args", [
    ["generate", "./nope"], ["generate", "nope/"], ["generate", "C:\\x"], ["generate", "x.safetensors"],
    ["generate", "a/b/c"], ["info", "nope.png"], ["generate", "--lora", "nope.safetensors"],
    ["generate", "--embedding", "nope.pt"],
])
def test_missing_local_paths_fail_at_once_without_the_hub(args, tmp_path):
    name = args[-1]
    prefix = f"{args[-2]} " if args[-2].startswith("--") else ""
    assert_user_error(run_cli(*args, cwd=tmp_path), f"{prefix}{name}: no such file or folder")


def test_debug_shows_the_traceback():
    result = run_cli("generate", "--steps", "0", "--debug")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith("CommandError: --steps must be at least 1, got 0")
    before = run_cli("--debug", "generate", "--steps", "0")
    assert "Traceback" in before.stderr


def test_bugs_get_one_line_and_status_1(monkeypatch, capsys):
    def broken(args):
        raise TypeError("something internal")

    monkeypatch.setattr("diffusekit.cli.command_schedulers", broken)
    assert main(["schedulers"]) == 1
    assert capsys.readouterr().err == ("error: TypeError: something internal "
                                       "(a bug? run again with --debug for the traceback)\n")
    with pytest.raises(TypeError, match="something internal"):
        main(["schedulers", "--debug"])


def test_closed_stdout_pipe_ends_quietly(tmp_path):
    png = save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", {f"key{i}": "v" * 200 for i in range(400)})
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-m", "diffusekit", "info", str(png)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # like `| head -0`: nobody reads
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert stderr == ""
