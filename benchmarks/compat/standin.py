"""Stand diffusekit's classes in for the reference's (diffusers) inside one Python process.

Every class that both packages export is replaced by diffusekit's in each reference module that
binds it (the defining module, the lazy namespaces ``diffusers``, ``diffusers.models``, ... and
every module that imported it by name). Reference model, scheduler and pipeline classes that
diffusekit lacks become placeholders that raise ``NotInDiffusekit`` when used, so their tests count
as failures ("missing class") instead of passing with the reference's own code.

Modules imported later are patched as they load (an import hook). Base classes (mixins) are only
replaced in package namespaces: the reference's own classes keep subclassing its own bases.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import re
import sys
from types import ModuleType
from typing import Any

# Names the reference exports from these top-level subpackages may become placeholders.
PLACEHOLDER_SUBPACKAGES = ("models", "schedulers", "pipelines")
_PLACEHOLDER_NAME = re.compile(r"^(Autoencoder|UNet)|(Model|Scheduler|Pipeline|Transformer\w*|VAE|Vae|UNet|Adapter)$")


class NotInDiffusekit(AttributeError):
    """Raised when a test uses a reference class that diffusekit does not have."""


class _MissingMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise NotInDiffusekit(f"diffusekit has no class {cls.__name__}")

    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise NotInDiffusekit(f"diffusekit has no class {cls.__name__} (.{attr})")


def placeholder(name: str) -> type:
    """A class named ``name`` that raises ``NotInDiffusekit`` when called or asked for attributes."""
    return _MissingMeta(name, (), {"__module__": "diffusekit.missing"})


def is_placeholder(obj: object) -> bool:
    return isinstance(obj, _MissingMeta)


def public_classes(package: ModuleType) -> dict[str, type]:
    """diffusekit's exported classes by name (functions are left to the reference)."""
    found = {name: getattr(package, name) for name in package.__all__}
    return {name: obj for name, obj in found.items() if isinstance(obj, type)}


def replacement_table(ours: dict[str, type], reference_names: dict[str, str]) -> dict[str, type]:
    """Name -> stand-in: ours for every name we export, a placeholder for each reference model,
    scheduler or pipeline class (``reference_names``: name -> top-level subpackage) we lack."""
    table = dict(ours)
    for name, subpackage in reference_names.items():
        wanted = subpackage in PLACEHOLDER_SUBPACKAGES and _PLACEHOLDER_NAME.search(name)
        if wanted and name not in table:
            table[name] = placeholder(name)
    return table


def base_names(table: dict[str, type]) -> set[str]:
    """Names in ``table`` that other classes in it subclass (the mixins)."""
    bases = {base for cls in table.values() for base in cls.__mro__[1:]}
    return {name for name, cls in table.items() if cls in bases}


def _is_reference_object(obj: object, name: str, prefix: str) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return getattr(obj, "__name__", None) == name and (module == prefix or module.startswith(prefix + "."))


def patch_module(module: ModuleType, table: dict[str, type], prefix: str, bases: set[str]) -> list[str]:
    """Replace the reference's objects bound in ``module`` by their stand-ins; return the names.

    Lazy namespaces (``_class_to_module``) get the stand-in before the reference loads the name.
    Names in ``bases`` are only replaced in packages (modules with ``__path__``)."""
    lazy = getattr(module, "_class_to_module", None) or {}
    is_package = hasattr(module, "__path__")
    patched = []
    for name, standin in table.items():
        if name in bases and not is_package:
            continue
        current = module.__dict__.get(name)
        if current is standin:
            continue
        if (current is not None and _is_reference_object(current, name, prefix)) or (current is None and name in lazy):
            setattr(module, name, standin)
            patched.append(name)
    return patched


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the module it made (``sys.modules`` may hold a lazy one)."""

    def __init__(self, inner: importlib.abc.Loader, patch: Any) -> None:
        self._inner = inner
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._patch(sys.modules.get(module.__name__, module))

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


class PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds modules under ``prefix`` with the other finders and wraps their loaders."""

    def __init__(self, prefix: str, table: dict[str, type]) -> None:
        self.prefix = prefix
        self.table = table
        self.bases = base_names(table)

    def patch(self, module: ModuleType) -> list[str]:
        return patch_module(module, self.table, self.prefix, self.bases)

    def patch_loaded(self) -> None:
        for name, module in list(sys.modules.items()):
            if self.covers(name) and isinstance(module, ModuleType):
                self.patch(module)

    def covers(self, fullname: str) -> bool:
        return fullname == self.prefix or fullname.startswith(self.prefix + ".")

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not self.covers(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, self.patch)
                return spec
        return None


def install(reference: ModuleType, ours: ModuleType) -> PatchingFinder:
    """Stand ``ours`` in for ``reference`` in this process: patch loaded modules, hook later ones."""
    names = dict(getattr(reference, "_class_to_module", {}))
    finder = PatchingFinder(reference.__name__, replacement_table(public_classes(ours), names))
    finder.patch_loaded()
    sys.meta_path.insert(0, finder)
    return finder
