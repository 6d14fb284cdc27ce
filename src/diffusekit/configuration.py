"""Configuration shared by models, schedulers and pipelines.

A class that mixes in :class:`ConfigMixin` and decorates its ``__init__`` with
:func:`register_to_config` records its constructor arguments as ``self.config``.
The config is what ``save_config`` writes as JSON (``config.json`` for models,
``scheduler_config.json`` for schedulers) and what ``from_config`` rebuilds from.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import stat
import uuid
import warnings
from pathlib import Path
from typing import IO, Any, Callable

logger = logging.getLogger(__name__)

#: The reference version we write into saved configs, so diffusers reads our folders without complaint.
REFERENCE_VERSION = "0.42.1"
#: Config key listing the arguments that took their default value (never saved to disk).
DEFAULTED_KEY = "_use_default_values"
#: The largest JSON file the library reads (configs, model_index.json, shard indexes).
MAX_JSON_BYTES = 16 * 1024 * 1024
#: Name ending of the temporary files that :func:`atomic_write` renames into place.
TEMP_SUFFIX = ".diffusekit-tmp"


#: Keyword arguments of ``load_config`` passed on to the Hub download.
HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies")
#: Reference ``load_config`` options that have no effect here (dropped, not reported as unused).
IGNORED_HUB_OPTIONS = ("mirror", "user_agent", "local_dir", "local_dir_use_symlinks")


class ConfigError(ValueError):
    """A config file or dictionary that cannot be used."""


class FrozenDict(dict):
    """A read-only dict whose keys are also attributes (``config.in_channels``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "a config is frozen; build a new object with from_config(config, key=value) instead"
        )

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _refuse
    update = pop = popitem = clear = setdefault = _refuse

    def __reduce__(self):
        return (FrozenDict, (dict(self),))


def _json_ready(value: Any) -> Any:
    """Turn tuples, numpy values and tensors into plain JSON values."""
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def open_regular(path: str | os.PathLike, error: type[ValueError] = ConfigError,
                 max_bytes: int | None = None) -> IO[bytes]:
    """Open ``path`` (symlinks followed) for unbuffered binary reading if it is a regular file.

    FIFOs, devices and folders raise ``error`` without blocking, as
    does a file larger than ``max_bytes``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file (a FIFO, device or folder); refusing to read it"
    elif max_bytes is not None and info.st_size > max_bytes:
        problem = f"is {info.st_size} bytes, over the {max_bytes}-byte limit for such files"
    if problem:
        os.close(fd)
        raise error(f"{path} {problem}")
    return os.fdopen(fd, "rb", buffering=0)


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object from the regular file ``path`` (at most ``MAX_JSON_BYTES``); errors name the file."""
    path = Path(path)
    with open_regular(path, max_bytes=MAX_JSON_BYTES) as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ConfigError(f"{path} grew past the {MAX_JSON_BYTES}-byte limit while being read")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _commit_hash(path: Path) -> str | None:
    """The commit of a file in the Hub cache (``.../snapshots/<commit>/...``), else None."""
    parts = path.parts
    if "snapshots" in parts[:-1]:
        commit = parts[parts.index("snapshots") + 1]
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return commit
    return None


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` all or nothing: ``write(file)`` fills a temporary file in the same folder,
    which is flushed to disk and then renamed over ``path``. A killed write leaves at most a
    ``*.diffusekit-tmp`` file, which :func:`remove_temp_files` clears."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open folders)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(folder: Path) -> None:
    """Delete what killed :func:`atomic_write` calls left in ``folder``."""
    for leftover in folder.glob(f".*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters of ``cls.__init__`` (without self and *args/**kwargs)."""
    return _named_parameters(cls.__init__)


def _named_parameters(function: Callable) -> dict[str, inspect.Parameter]:
    params = inspect.signature(function).parameters
    return {
        name: p
        for i, (name, p) in enumerate(params.items())
        if i > 0 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def register_to_config(init):
    """Decorate ``__init__`` so that its arguments (defaults filled in) become ``self.config``.

    Positional and keyword arguments are recorded under their names, defaults for the rest
    (their names listed under ``_use_default_values``), except the class's ``ignore_for_config``.
    Keyword arguments starting with ``_`` (``_class_name``, ...) go to the config, not to ``__init__``.
    """
    params = _named_parameters(init)

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        ignored = set(getattr(type(self), "ignore_for_config", ()))
        bound = dict(zip(params, args))
        bound.update(kwargs)
        config, defaulted = {}, []
        for name, param in params.items():
            if name in ignored:
                continue
            if name in bound:
                config[name] = bound[name]
            elif param.default is not inspect.Parameter.empty:
                config[name] = param.default
                defaulted.append(name)
        private.pop(DEFAULTED_KEY, None)
        if defaulted:  # as the reference: from_config lets the target class's defaults win for these
            config[DEFAULTED_KEY] = defaulted
        self.register_to_config(**private, **config)
        init(self, *args, **kwargs)

    return wrapped


def config_attribute(obj: Any, name: str) -> Any:
    """``obj.<name>`` for a config key that is not an attribute: the value, with the reference's FutureWarning.

    Raises AttributeError when ``name`` is no config key; a class attribute (a property that
    raised AttributeError, say) is looked up again so that its own error propagates.
    """
    config = obj.__dict__.get("_internal_dict")
    if config is None or name not in config or name.startswith("_"):
        descriptor = inspect.getattr_static(type(obj), name, None)
        if hasattr(descriptor, "__get__"):
            return descriptor.__get__(obj, type(obj))
        raise AttributeError(f"'{type(obj).__name__}' object has no attribute '{name}'")
    cls, example = type(obj).__name__, getattr(type(obj), "config_example_name", "scheduler")
    warnings.warn(
        f"Accessing config attribute `{name}` directly via '{cls}' object attribute is deprecated. Please access "
        f"'{name}' over '{cls}'s config object instead, e.g. '{example}.config.{name}'.",
        FutureWarning, stacklevel=3,
    )
    return config[name]


class ConfigMixin:
    """Records constructor arguments as a frozen config and (de)serialises it as JSON."""

    config_name: str = "config.json"
    ignore_for_config: tuple[str, ...] = ()
    _compatibles: tuple[str, ...] = ()
    #: The variable name the deprecation message of :func:`config_attribute` suggests.
    config_example_name = "scheduler"
    #: Keys that ``__init__`` adds to the config itself (derived, not arguments): not reported on load.
    derived_config_keys: tuple[str, ...] = ()

    def register_to_config(self, **values: Any) -> None:
        values.pop("kwargs", None)
        fresh = {"_class_name": type(self).__name__, "_diffusers_version": REFERENCE_VERSION}
        current = dict(getattr(self, "_internal_dict", fresh))
        current.update(_json_ready(values))
        object.__setattr__(self, "_internal_dict", FrozenDict(current))

    @property
    def config(self) -> FrozenDict:
        return self._internal_dict

    def __getattr__(self, name: str) -> Any:
        return config_attribute(self, name)

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def split_config(cls, config: dict) -> tuple[dict, dict]:
        """Split a config into the arguments ``__init__`` takes and the keys it does not know."""
        params = init_parameters(cls)
        known, unknown = {}, {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in params:
                known[key] = value
            else:
                unknown[key] = value
        return known, unknown

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs: Any) -> tuple[dict, dict, dict]:
        """Split a config plus overrides into ``(init_dict, unused_kwargs, hidden_dict)``, as the reference.

        Keys listed under ``_use_default_values`` are dropped (this class's defaults win);
        ``kwargs`` override config values; ``unused_kwargs`` holds the config keys and the
        overrides ``__init__`` does not take; ``hidden_dict`` the config entries (private ones
        included) not passed to ``__init__``, which ``from_config`` keeps in the new config.
        """
        defaulted = set(config_dict.get(DEFAULTED_KEY, ()))
        config = {k: v for k, v in config_dict.items() if k not in defaulted and k != DEFAULTED_KEY}
        params = set(init_parameters(cls)) - set(cls.ignore_for_config)
        init_dict = {k: v for k, v in config.items() if k in params}
        init_dict.update({k: v for k, v in kwargs.items() if k in params})
        unknown = {k: v for k, v in config.items() if k not in params and not k.startswith("_")}
        if unknown:
            cls._report_unknown_keys(config.get("_class_name"), sorted(unknown))
        unused = {**unknown, **{k: v for k, v in kwargs.items() if k not in params}}
        hidden = {k: v for k, v in config.items() if k not in init_dict}
        return init_dict, unused, hidden

    @classmethod
    def _report_unknown_keys(cls, source: Any, keys: list[str]) -> None:
        keys = [key for key in keys if key not in cls.derived_config_keys]
        if not keys:
            return
        if source in (None, cls.__name__):
            logger.warning("%s does not use config keys %s; kept aside", cls.__name__, keys)
        else:
            logger.info("%s ignores keys of %s: %s", cls.__name__, source, keys)

    @classmethod
    def from_config(cls, config: dict | None = None, return_unused_kwargs: bool = False, **overrides: Any):
        """Build an instance from a config dict (e.g. another object's ``.config``) plus overrides.

        Config keys this class does not take are kept in ``.config`` (so they survive a save) and
        reported with a warning; they do not change behaviour. ``return_unused_kwargs=True``
        returns ``(obj, unused)``, ``unused`` holding what ``__init__`` did not take.
        """
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise TypeError(f"from_config expects a dict or a .config, got {type(config).__name__}")
        init_dict, unused, hidden = cls.extract_init_dict(config, **overrides)
        obj = cls(**init_dict)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        obj.register_to_config(**hidden)
        unused = {**unused, **hidden}
        return (obj, unused) if return_unused_kwargs else obj

    # -- files ----------------------------------------------------------------------------------

    @classmethod
    def load_config(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        return_unused_kwargs: bool = False,
        return_commit_hash: bool = False,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> dict | tuple:
        """Read this class's config file (a folder, a Hub repo, or the JSON file itself) as a dict.

        ``return_unused_kwargs`` adds the keyword arguments that are no Hub option, and
        ``return_commit_hash`` the Hub snapshot's commit (None for local files), as the reference.
        """
        from .hub import resolve_file

        hub = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
        for name in IGNORED_HUB_OPTIONS:
            kwargs.pop(name, None)
        if Path(pretrained_model_name_or_path).is_file():
            path = Path(pretrained_model_name_or_path)
        else:
            path = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder=subfolder, **hub)
        config = read_json(path)
        if not (return_unused_kwargs or return_commit_hash):
            return config
        extra = ((kwargs,) if return_unused_kwargs else ()) + ((_commit_hash(path),) if return_commit_hash else ())
        return (config, *extra)

    def to_json_string(self) -> str:
        data = _json_ready({k: v for k, v in self.config.items() if k != DEFAULTED_KEY})
        data.update({"_class_name": type(self).__name__, "_diffusers_version": REFERENCE_VERSION})
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write the config as ``<save_directory>/<config_name>`` and return its path."""
        folder = Path(save_directory)
        if folder.is_file():
            raise FileExistsError(f"{folder} is a file, expected a folder")
        folder.mkdir(parents=True, exist_ok=True)
        remove_temp_files(folder)
        text = self.to_json_string().encode("utf-8")
        return atomic_write(folder / self.config_name, lambda f: f.write(text))

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"
