"""The stand-in logic of benchmarks/compat (diffusers' tests with diffusekit's classes), on fake modules."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

COMPAT = Path(__file__).resolve().parents[1] / "benchmarks" / "compat"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"compat_{name}", COMPAT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


standin = _load("standin")
runner = _load("run")


def _reference_class(name: str, module: str, bases: tuple[type, ...] = ()) -> type:
    return type(name, bases, {"__module__": module})


class Base:
    pass


class Widget(Base):
    pass


OURS = {"Base": Base, "Widget": Widget}


def test_replacement_table_adds_placeholders_only_for_model_scheduler_pipeline_classes():
    names = {"Widget": "models", "FancyScheduler": "schedulers", "AttentionBackendName": "models", "Guider": "guiders"}
    table = standin.replacement_table(OURS, names)
    assert table["Widget"] is Widget
    assert standin.is_placeholder(table["FancyScheduler"])
    assert "AttentionBackendName" not in table and "Guider" not in table
    assert standin.base_names(table) == {"Base"}


def test_placeholder_raises_named_error_on_use():
    missing = standin.placeholder("FancyScheduler")
    with pytest.raises(standin.NotInDiffusekit, match="diffusekit has no class FancyScheduler$"):
        missing(num_train_timesteps=10)
    with pytest.raises(standin.NotInDiffusekit, match=r"FancyScheduler \(\.from_pretrained\)"):
        missing.from_pretrained
    assert not hasattr(missing, "config")
    assert runner.classify("NotInDiffusekit: diffusekit has no class FancyScheduler") == ("missing class", "FancyScheduler")


def test_patch_module_replaces_reference_objects_and_lazy_names_but_not_bases_in_plain_modules():
    table = standin.replacement_table(OURS, {"Missing2DModel": "models"})
    bases = standin.base_names(table)
    defining = ModuleType("ref.models.widget")
    defining.Widget = _reference_class("Widget", "ref.models.widget")
    defining.Base = _reference_class("Base", "ref.models.base")
    unrelated = _reference_class("Widget", "other.pkg")
    lazy = ModuleType("ref")
    lazy.__path__ = []
    lazy._class_to_module = {"Base": "models", "Missing2DModel": "models"}
    elsewhere = ModuleType("ref.utils")
    elsewhere.Widget = unrelated

    assert standin.patch_module(defining, table, "ref", bases) == ["Widget"]
    assert defining.Widget is Widget and defining.Base.__module__ == "ref.models.base"
    assert sorted(standin.patch_module(lazy, table, "ref", bases)) == ["Base", "Missing2DModel"]
    assert lazy.Base is Base and standin.is_placeholder(lazy.Missing2DModel)
    assert standin.patch_module(elsewhere, table, "ref", bases) == [] and elsewhere.Widget is unrelated
    assert standin.patch_module(defining, table, "ref", bases) == []


def test_finder_patches_modules_imported_after_install(tmp_path, monkeypatch):
    package = tmp_path / "fakeref"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "widgets.py").write_text("class Widget:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    finder = standin.PatchingFinder("fakeref", dict(OURS))
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    try:
        from fakeref.widgets import Widget as imported

        assert imported is Widget
        assert sys.modules["fakeref.widgets"].__loader__.get_filename().endswith("widgets.py")
    finally:
        for name in ("fakeref", "fakeref.widgets"):
            sys.modules.pop(name, None)


def test_compare_counts_only_tests_passing_with_the_reference_and_groups_failures():
    passed = {"outcome": "passed", "message": ""}
    baseline = {"a::T::ok": passed, "a::T::gone": passed, "a::T::attr": passed, "a::T::priv": passed,
                "a::T::hub": {"outcome": "failed", "message": "offline"}}
    ours = {"a::T::ok": passed, "a::T::hub": passed,
            "a::T::attr": {"outcome": "failed", "message": "AttributeError: 'X' object has no attribute 'step_prk'"},
            "a::T::priv": {"outcome": "failed", "message": "whatever"}}
    report = runner.compare(baseline, ours, [("*::priv", "private internals")])
    assert (report["passing_with_diffusers"], report["passing_with_diffusekit"], report["ratio"]) == (3, 1, 0.3333)
    assert report["excluded"] == ["a::T::priv"]
    assert report["failures"] == {"missing method/attribute": {"step_prk": ["a::T::attr"]},
                                  "other": {"not run with the stand-ins": ["a::T::gone"]}}


def test_node_id_from_junit_classname():
    assert runner.node_id("tests.schedulers.test_scheduler_ddim.DDIMSchedulerTest", "test_step") == (
        "tests/schedulers/test_scheduler_ddim.py::DDIMSchedulerTest::test_step")
    assert runner.node_id("tests.lora.test_peft_utils", "test_plain[1]") == "tests/lora/test_peft_utils.py::test_plain[1]"


def _junit(path: Path, cases: dict[str, str]) -> None:
    rows = "".join(f'<testcase classname="tests.test_x.T" name="{name}">{body}</testcase>'
                   for name, body in cases.items())
    path.write_text(f"<testsuites><testsuite>{rows}</testsuite></testsuites>")


def test_runs_of_parts_add_up_and_the_newer_run_of_a_test_wins(tmp_path):
    assert runner.part_tag([]) == "" and runner.part_tag(["unet_2d.py", "a/b c"]) == "[unet_2d.py+a_b_c]"
    _junit(tmp_path / "models[a]-standin.xml", {"one": "", "two": "<failure message='old'/>"})
    _junit(tmp_path / "models[b]-standin.xml", {"two": "", "three": "<skipped/>"})
    _junit(tmp_path / "modelsx-standin.xml", {"other": ""})  # another subset's name: not read
    older = tmp_path / "models[a]-standin.xml"
    os.utime(older, (1, 1))
    results = runner.read_parts(tmp_path, "models", "standin")
    assert {node.split("::")[-1]: r["outcome"] for node, r in results.items()} == {
        "one": "passed", "two": "passed", "three": "skipped"}
