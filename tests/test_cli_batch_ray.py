"""``diffusekit generate --prompts ... --ray``: two Ray Data workers write the same PNG bytes and
manifest as the local run, a rerun makes only the missing lines, and a bad line is an error naming
its file and line (embedded digits model, 3 steps). One local Ray instance for the module."""

import shutil
import sys

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from diffusekit.batch_ray import import_ray, init_ray  # noqa: E402
from diffusekit.cli import main  # noqa: E402

LINES = ["3", "", "# a comment", "0", "7", "1"]  # prompts on lines 1, 4, 5, 6
DONE = [f"{n:06d}.png" for n in (1, 4, 5, 6)]


def _generate(prompts, out, *extra):
    return main(["generate", "--prompts", str(prompts), "--out", str(out), "--steps", "3", "--threads", "1",
                 *extra])


@pytest.fixture(scope="module")
def local_ray():
    assert init_ray(None, local_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "digits.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path


@pytest.fixture(scope="module")
def local_run(prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    assert _generate(prompts, out) == 0
    return out


@pytest.fixture(scope="module")
def ray_run(local_ray, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray")
    assert _generate(prompts, out, "--ray", "--num-workers", "2") == 0
    return out


def test_two_workers_write_the_local_runs_bytes_and_manifest(local_run, ray_run):
    assert sorted(p.name for p in ray_run.iterdir()) == [*DONE, "manifest.jsonl"]
    for name in [*DONE, "manifest.jsonl"]:
        assert (ray_run / name).read_bytes() == (local_run / name).read_bytes(), name


def test_a_rerun_makes_only_the_missing_lines(local_ray, prompts, ray_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(ray_run, out)
    for name in (DONE[1], DONE[3], "manifest.jsonl"):
        (out / name).unlink()
    capsys.readouterr()
    assert _generate(prompts, out, "--ray", "--num-workers", "2") == 0
    assert sorted(capsys.readouterr().out.split()) == [str(out / DONE[1]), str(out / DONE[3])]
    for name in [*DONE, "manifest.jsonl"]:
        assert (out / name).read_bytes() == (ray_run / name).read_bytes(), name


def test_a_bad_line_is_an_error_naming_file_and_line(local_ray, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "3"}\n{"prompt": "eleven"}\n')
    assert _generate(path, tmp_path / "out", "--ray") == 2
    message = f"error: {path}:2: --class-label eleven: not a class number or name"
    assert message in capsys.readouterr().err.splitlines()  # Ray may log warnings around it


@pytest.mark.parametrize("argv, message", [
    (["generate", "--ray"], "error: --ray runs a --prompts file; give --prompts FILE"),
    (["--num-workers", "0"], "error: --num-workers must be at least 1, got 0"),
])
def test_option_errors_before_ray_starts(prompts, tmp_path, capsys, argv, message):
    if argv[0] != "generate":
        argv = ["generate", "--prompts", str(prompts), "--out", str(tmp_path), "--ray", *argv]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == message


@pytest.mark.parametrize("part", ["data", "serve"])
def test_without_ray_the_error_names_the_extra(monkeypatch, part):
    monkeypatch.setitem(sys.modules, f"ray.{part}", None)  # as if it were not installed
    with pytest.raises(ImportError, match=rf"--ray needs Ray {part.title()}: pip install 'diffusekit\[ray\]'"):
        import_ray(part)
