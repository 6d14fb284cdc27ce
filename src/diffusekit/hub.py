"""Finding files: a local folder is used in place, anything else is a Hub repo id.

Hub repos go through huggingface_hub and its cache, so ``revision``, ``cache_dir``,
``local_files_only`` and ``HF_HUB_OFFLINE`` behave as they do everywhere else in the ecosystem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

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


def resolve_folder(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    allow_patterns: Iterable[str] | None = None,
    **hub_kwargs,
) -> Path:
    """A local folder for ``name_or_path``: the folder itself, or a Hub snapshot of the given files."""
    local = Path(name_or_path)
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
    local = Path(name_or_path)
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
    for name in names:
        try:
            return resolve_file(name_or_path, name, **hub_kwargs)
        except (FileNotFoundError, OSError):
            continue
    raise FileNotFoundError(f"no {what} file {' or '.join(names)} in {name_or_path!r}")
