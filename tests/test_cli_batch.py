"""``diffusekit generate --prompts``: per-line seeds and files, resume after a kill, a manifest, and
the same bytes from two accelerate processes as from one (embedded digits model, a few steps)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusekit.cli_batch import read_jobs
from diffusekit.cli_metadata import CommandError

LINES = ["3", "7", "", "# a comment", "0", "1", "2", "4", "5", "6"]  # 8 prompts on lines 1, 2, 5-10
DONE_LINES = [1, 2, 5, 6, 7, 8, 9, 10]


def _env():
    src = str(Path(__file__).resolve().parent.parent / "src")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}


def _generate(prompts: Path, out: Path, *extra: str, launcher=(sys.executable, "-m"), env=None):
    command = [*launcher, "diffusekit", "generate", "--prompts", str(prompts), "--out", str(out), "--steps", "3",
               "--threads", "1", *extra]
    return subprocess.run(command, capture_output=True, text=True, env={**_env(), **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "digits.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path


@pytest.fixture(scope="module")
def one_process(prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    result = _generate(prompts, out)
    assert result.returncode == 0, result.stderr
    return out


def test_files_seeds_and_manifest(one_process):
    rows = [json.loads(line) for line in (one_process / "manifest.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == DONE_LINES
    assert [r["file"] for r in rows] == [f"{n:06d}.png" for n in DONE_LINES]
    assert [r["seed"] for r in rows] == DONE_LINES  # --seed 0 + line number
    assert [r["parameters"]["class_label"] for r in rows] == [3, 7, 0, 1, 2, 4, 5, 6]
    assert all(r["parameters"]["steps"] == 3 for r in rows)
    assert sorted(p.name for p in one_process.glob("*.png")) == [r["file"] for r in rows]


def test_resume_after_a_kill_does_only_the_missing_lines(prompts, one_process, tmp_path):
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, "-m", "diffusekit", "generate", "--prompts", str(prompts),
                               "--out", str(out), "--steps", "3", "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(out.glob("*.png")) and runner.poll() is None:
        time.sleep(0.02)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=60)
    before = {p.name for p in out.glob("*.png")}
    (out / ".000010.png.0123456789ab.diffusekit-tmp").write_bytes(b"\x89PNG half")  # a killed write
    result = _generate(prompts, out)
    assert result.returncode == 0, result.stderr
    written = {Path(line).name for line in result.stdout.split()}
    assert written == {f"{n:06d}.png" for n in DONE_LINES} - before  # nothing done twice
    for name in [f"{n:06d}.png" for n in DONE_LINES] + ["manifest.jsonl"]:
        assert (out / name).read_bytes() == (one_process / name).read_bytes(), name


def test_changed_parameters_are_redone(prompts, one_process, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for path in one_process.glob("*.png"):
        (out / path.name).write_bytes(path.read_bytes())
    result = _generate(prompts, out, "--seed", "100")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == len(DONE_LINES)  # other seeds: every image made again
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [100 + n for n in DONE_LINES]


def test_two_accelerate_processes_write_the_same_bytes(prompts, one_process, tmp_path):
    pytest.importorskip("accelerate")
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = (str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m")
    result = _generate(prompts, tmp_path, launcher=launcher, env={"ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr
    assert "process 1 of 2: 4 lines" in result.stderr and "process 2 of 2: 4 lines" in result.stderr
    for name in [f"{n:06d}.png" for n in DONE_LINES] + ["manifest.jsonl"]:
        assert (tmp_path / name).read_bytes() == (one_process / name).read_bytes(), name


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a", "colour": 1}', r"x.jsonl:2: unknown key\(s\) colour"),
    ('{"prompt": "a", "steps": 2.5}', r"x.jsonl:2: steps must be a number \(whole\)"),
    ('{"prompt": "a", "guidance": "high"}', "x.jsonl:2: guidance must be a number"),
    ("[1, 2]", "x.jsonl:2: expected a JSON object"),
    ("{oops", "x.jsonl:2: not JSON"),
])
def test_bad_jsonl_lines_are_named(tmp_path, text, message):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "fine", "seed": 5, "guidance": 3}\n' + text + "\n")
    with pytest.raises(CommandError, match=message):
        read_jobs(path)


def test_jsonl_options_and_empty_files(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('\n{"prompt": "a cat", "seed": 5, "steps": 4, "guidance": 2, "negative_prompt": "dog"}\n')
    [job] = read_jobs(path)
    assert job.line == 2 and job.file_name == "000002.png"
    assert job.options == {"prompt": "a cat", "seed": 5, "steps": 4, "guidance": 2.0, "negative_prompt": "dog"}
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(CommandError, match="empty.txt: no prompts"):
        read_jobs(tmp_path / "empty.txt")
    with pytest.raises(CommandError, match="missing.txt: cannot read"):
        read_jobs(tmp_path / "missing.txt")
