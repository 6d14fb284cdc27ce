"""Finding files: a local folder is used in place, anything else is a Hub repo id.

Hub repos go through huggingface_hub and its cache, so ``revision``, ``cache_dir``,
``local_files_only`` and ``HF_HUB_OFFLINE`` behave as they do everywhere else in the ecosystem.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

#: File endings that mark a name as a local path, never a Hub repo id.
LOCAL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".png", ".jpg", ".jpeg", ".webp", ".json",
                  ".yaml", ".yml", ".txt", ".gguf", ".onnx")
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")

HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies")


def split_hub_kwargs(kwargs: dict) -> dict:
    """Pop the Hub-related keyword arguments out of ``kwargs`` and return them."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


def _hub_options(revision=None, cache_dir=None, local_files_only=False, token=None,
                 force_download=False, proxies=None) -> dict:
    return {
        "revision": revision,
        "cache_dir": cache_dir,
        "local_files_only": bool(local_files_only),
        "token": token,
        "force_download": force_download,
    }


def _not_found(name: str, what: str, err: Exception) -> OSError:
    return OSError(
        f"cannot find {what} for {name!r}: it is not a local folder, and the Hub "
        f"(or its cache, when offline) did not provide it ({type(err).__name__}: {err})"
    )


def looks_local(name: str | os.PathLike) -> bool:
    """Whether ``name`` can only be a local path: it starts with ``/ . ~`` (or a drive), ends like a
    file (``.safetensors``, ``.png``...), holds a backslash or more than one ``/``, or is no valid repo id."""
    text = os.fspath(name)
    if isinstance(name, os.PathLike) or text.startswith(("/", ".", "~")) or "\\" in text:
        return True
    if re.match(r"^[A-Za-z]:", text) or text.lower().endswith(LOCAL_SUFFIXES) or text.count("/") > 1:
        return True
    return not _REPO_ID.match(text) or "--" in text or ".." in text or text.endswith(".")


def check_local(name: str | os.PathLike) -> Path:
    """``name`` as a path (``~`` expanded); FileNotFoundError at once when it looks local and does not
    exist, so a mistyped path fails here instead of after a round trip to the Hub."""
    path = Path(name).expanduser()
    if not path.exists() and looks_local(name):
        raise FileNotFoundError(f"{os.fspath(name)}: no such file or folder")
    return path


def resolve_folder(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    allow_patterns: Iterable[str] | None = None,
    **hub_kwargs,
) -> Path:
    """A local folder for ``name_or_path``: the folder itself, or a Hub snapshot of the given files."""
    local = check_local(name_or_path)
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist")
        return folder
    from huggingface_hub import snapshot_download

    patterns = list(allow_patterns) if allow_patterns is not None else None
    if patterns is not None and subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns]
    try:
        root = snapshot_download(str(name_or_path), allow_patterns=patterns, **_hub_options(**hub_kwargs))
    except Exception as err:
        raise _not_found(str(name_or_path), "a model folder", err) from None
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"{name_or_path!r} has no subfolder {subfolder!r}")
    return folder


def resolve_file(name_or_path: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs) -> Path:
    """The local path of one file in a folder or Hub repo."""
    local = check_local(name_or_path)
    if local.is_dir():
        path = local / subfolder / filename if subfolder else local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return path
    if local.is_file():
        raise ValueError(f"{local} is a file; pass the folder that holds {filename}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(name_or_path), filename, subfolder=subfolder, **_hub_options(**hub_kwargs)))
    except Exception as err:
        raise _not_found(str(name_or_path), filename if not subfolder else f"{subfolder}/{filename}", err) from None


def resolve_first_file(name_or_path: str | os.PathLike, filenames: Iterable[str], what: str, **hub_kwargs) -> Path:
    """The first of ``filenames`` that a local folder or Hub repo ``name_or_path`` holds;
    FileNotFoundError naming ``what`` and the names when it holds none."""
    names = list(filenames)
    check_local(name_or_path)
    for name in names:
        try:
            return resolve_file(name_or_path, name, **hub_kwargs)
        except (FileNotFoundError, OSError):
            continue
    raise FileNotFoundError(f"no {what} file {' or '.join(names)} in {name_or_path!r}")
