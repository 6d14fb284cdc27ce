"""pytest plugin (``-p standin_plugin``): diffusekit's classes stand in for diffusers' in the run.

Installed when pytest loads the plugin, before any conftest or test module imports diffusers.
"""

from __future__ import annotations

import diffusekit
import diffusers
from standin import install

FINDER = install(diffusers, diffusekit)


def pytest_report_header() -> str:
    placeholders = sum(1 for cls in FINDER.table.values() if cls.__module__ == "diffusekit.missing")
    return f"diffusekit stands in: {len(FINDER.table) - placeholders} classes, {placeholders} placeholders"
