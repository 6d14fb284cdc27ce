"""Reading and writing tensors: safetensors first, sharded checkpoints, and legacy pickles safely.

Every error names the file (and the key, where one is at fault). Pickle files are only ever read
through ``torch.load(weights_only=True)``, which refuses to build arbitrary objects.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import torch

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"

_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024
#: safetensors dtype names that this torch build has (the rest go through the safetensors reader).
_TORCH_DTYPES = {
    name: getattr(torch, attr) for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
        ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
        ("U64", "uint64"),
    ) if hasattr(torch, attr)
}


class WeightsError(ValueError):
    """A weights file that cannot be read, or whose tensors do not fit the model."""


def add_variant(filename: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` + ``fp16`` -> ``diffusion_pytorch_model.fp16.safetensors``."""
    if not variant:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def check_safetensors_header(path: str | os.PathLike) -> dict:
    """Validate the header of a safetensors file before any tensor is read; return it.

    Lengths that lie (a header longer than the file, tensors past its end, offsets that do not
    match dtype and shape) raise :class:`WeightsError` naming the file and key.
    """
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[dict, int, int]:
    """The checked header, the offset where tensor data starts and the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise WeightsError(
                f"{path}: header claims {header_len} bytes but the file holds {size - 8} after the length"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not an object)")
    data_len = size - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                if not isinstance(dim, int) or dim < 0:
                    raise ValueError(dim)
                count *= dim
            item = _DTYPE_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt entry for tensor {key!r} in the header") from None
        if not (0 <= start <= end <= data_len) or end - start != count * item:
            raise WeightsError(
                f"{path}: tensor {key!r} claims bytes {start}..{end}, but the data holds {data_len} bytes"
                " (file truncated or corrupt)"
            )
    return header, 8 + header_len, size


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file after checking its header.

    On CPU the tensors view a private (copy-on-write) memory map of the file, each on its own
    storage slice as the safetensors reader gives them, so nothing is read until it is used.
    """
    path = Path(path)
    header, data_start, size = _read_header(path)
    if str(device) == "cpu" and sys.byteorder == "little":
        tensors = _map_tensors(path, header, data_start, size)
        if tensors is not None:
            return tensors
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as err:  # the Rust reader reports its own error types
        raise WeightsError(f"{path}: cannot read safetensors file ({err})") from None


def _map_tensors(path: Path, header: dict, data_start: int, size: int) -> dict[str, torch.Tensor] | None:
    """The tensors of a checked header over a memory map, in file order; None where a dtype is not
    one torch has or the file cannot be mapped (the safetensors reader then takes over)."""
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            return None
        start, end = info["data_offsets"]
        entries.append((start, end, key, dtype, info["shape"]))
    entries.sort(key=lambda entry: entry[0])
    try:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except (RuntimeError, OSError):
        return None
    return {
        key: torch.empty(0, dtype=dtype, device="cpu").set_(storage[data_start + start:data_start + end], 0, shape)
        for start, end, key, dtype, shape in entries
    }


def load_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a legacy ``.bin``/``.ckpt`` file with ``weights_only=True`` (no code from the file runs)."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"{path}: refused or unreadable pickle checkpoint ({type(err).__name__}: {err}). "
            "Only plain tensors are accepted; convert it to safetensors."
        ) from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return data


def load_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one weights file, choosing the reader from its extension."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    return load_pickle(path)


def load_sharded(index_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every shard listed in a ``*.index.json`` file."""
    index_path = Path(index_path)
    from .configuration import read_json

    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index_path}: no weight_map in the index")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise WeightsError(f"{index_path}: shard {shard} is missing")
        state.update(load_file(shard_path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise WeightsError(f"{index_path}: keys listed in the index but absent from the shards: {missing[:10]}")
    return state


def weights_filenames(stem: str, ext: str, variant: str | None) -> tuple[str, str]:
    """The single-file name and the shard-index name for a weights stem, extension and variant."""
    single = add_variant(f"{stem}.{ext}", variant)
    index = f"{stem}.{ext}.index" + (f".{variant}" if variant else "") + ".json"
    return single, index


def find_weights(folder: Path, variant: str | None = None, use_safetensors: bool | None = None,
                 base: str = SAFETENSORS_NAME) -> Path:
    """The weights file (or shard index) in ``folder``: safetensors first, then legacy pickle."""
    stem = base.rsplit(".", 1)[0]
    extensions = {None: ["safetensors", "bin"], True: ["safetensors"], False: ["bin"]}[use_safetensors]
    candidates = [name for ext in extensions for name in weights_filenames(stem, ext, variant)]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no weights file in {folder} (looked for {', '.join(candidates)})")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file or a shard index."""
    if path.name.endswith(".json"):
        return load_sharded(path)
    return load_file(path)


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> bytes."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def save_weights(state_dict: dict[str, torch.Tensor], folder: str | os.PathLike, *, base: str = SAFETENSORS_NAME,
                 variant: str | None = None, safe_serialization: bool = True,
                 max_shard_size: int | str = "10GB") -> list[Path]:
    """Write tensors (sharded with an index when larger than ``max_shard_size``); return the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = base.rsplit(".", 1)[0]
    ext = "safetensors" if safe_serialization else "bin"
    limit = parse_size(max_shard_size)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][key] = tensor
        used += nbytes

    def write(part: dict[str, torch.Tensor], path: Path) -> None:
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, str(path))

    single, index_name = weights_filenames(stem, ext, variant)
    if len(shards) == 1:
        path = folder / single
        write(shards[0], path)
        return [path]

    written, weight_map = [], {}
    total = len(shards)
    for i, part in enumerate(shards, 1):
        name = single.replace(f".{ext}", f"-{i:05d}-of-{total:05d}.{ext}")
        write(part, folder / name)
        written.append(folder / name)
        weight_map.update({k: name for k in part})
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder / index_name, *written]
