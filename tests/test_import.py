"""`import diffusekit` stays light: lazy exports, no transformers until a text encoder is loaded."""

import subprocess
import sys

import pytest


def modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_package_import_loads_neither_torch_nor_transformers():
    loaded = modules_after("import diffusekit")
    assert "torch" not in loaded and "transformers" not in loaded and "diffusers" not in loaded


@pytest.mark.parametrize("name", ["StableDiffusionPipeline", "DDPMPipeline", "UNet2DConditionModel",
                                  "EulerDiscreteScheduler", "DiffusionPipeline"])
def test_exports_do_not_import_transformers(name):
    loaded = modules_after(f"from diffusekit import {name}")
    assert "torch" in loaded
    assert "transformers" not in loaded and "diffusers" not in loaded


def test_every_export_resolves():
    import diffusekit

    missing = []
    for name in diffusekit.__all__:
        try:
            getattr(diffusekit, name)
        except (AttributeError, ImportError) as err:
            missing.append(f"{name}: {err}")
    assert missing == []
