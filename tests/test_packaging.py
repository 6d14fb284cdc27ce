"""The built wheel carries the embedded model and tokenizer, and works outside the source tree."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_assets_and_the_installed_copy_generates(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("diffusekit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    for needed in ("diffusekit/assets/digits/model_index.json",
                   "diffusekit/assets/digits/unet/diffusion_pytorch_model.safetensors",
                   "diffusekit/assets/tokenizers/clip/vocab.json.gz", "diffusekit/serving/static/index.html",
                   "diffusekit/serving/static/app.js", "diffusekit/serving/static/app.css"):
        assert needed in names
    code = ("import diffusekit, torch; from diffusekit.embedded import load_embedded_pipeline;"
            "pipe = load_embedded_pipeline();"
            "out = pipe(class_labels=[1, 8], num_inference_steps=3, output_type='np',"
            " generator=torch.Generator().manual_seed(0)).images;"
            "print(diffusekit.__file__, out.shape)")
    env = {"PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    location, shape = result.stdout.split(" ", 1)
    assert location.startswith(str(tmp_path / "site")) and "(2, 16, 16, 1)" in shape
