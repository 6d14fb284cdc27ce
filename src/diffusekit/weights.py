"""Reading and writing tensors: safetensors first, sharded checkpoints, and legacy pickles safely.

Every error names the file (and the key, where one is at fault). Pickle files are only ever read
through ``torch.load(weights_only=True)``, which refuses to build arbitrary objects.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import torch

from .configuration import atomic_write, open_regular, read_json, remove_temp_files

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"

_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024
#: Tensors are handed out at addresses that are a multiple of this (as fresh torch allocations are).
ALIGNMENT = 64
#: The dtypes whose CPU kernels give other bits on unaligned data (float32 convolutions and matrix
#: products do; the half-precision kernels convert into aligned buffers first, and give the same bits
#: either way, see tests/test_weights_safety.py), so only these are copied when a map leaves them unaligned.
ALIGNMENT_SENSITIVE = (torch.float32, torch.float64)
#: Metadata key (in each safetensors file and in a shard index) that ties the files of one save together.
SAVE_ID_KEY = "diffusekit_save_id"
#: Environment variable that turns on :func:`load_safetensors`'s ``copy`` mode by default.
COPY_ENV = "DIFFUSEKIT_COPY_WEIGHTS"
#: safetensors dtype names that this torch build has (the rest go through the safetensors reader).
_TORCH_DTYPES = {
    name: getattr(torch, attr) for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
        ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
        ("U64", "uint64"),
    ) if hasattr(torch, attr)
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}


class WeightsError(ValueError):
    """A weights file that cannot be read, or whose tensors do not fit the model."""


def add_variant(filename: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` + ``fp16`` -> ``diffusion_pytorch_model.fp16.safetensors``."""
    if not variant:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def copy_weights_default() -> bool:
    """Whether loads copy tensors into private memory when the caller does not say
    (environment variable ``DIFFUSEKIT_COPY_WEIGHTS=1``)."""
    return os.environ.get(COPY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_safetensors_header(path: str | os.PathLike) -> dict:
    """Validate the header of a safetensors file before any tensor is read; return it.

    Lengths that lie (a header longer than the file, tensors past its end, offsets that do not
    match dtype and shape, overlapping tensors, bytes no tensor owns) and non-string metadata raise
    :class:`WeightsError` naming the file and key.
    """
    with open_regular(path, WeightsError) as f:
        return _read_header(f, Path(path))[0]


def _read_header(f: IO[bytes], path: Path) -> tuple[dict, int, int]:
    """The checked header of the open file ``f``, the offset where tensor data starts and the file size."""
    size = os.fstat(f.fileno()).st_size
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
    _check_metadata(header.get("__metadata__", {}), path)
    data_len = size - 8 - header_len
    spans = sorted(_tensor_span(key, info, data_len, path) for key, info in header.items() if key != "__metadata__")
    _check_layout(spans, data_len, path)
    return header, 8 + header_len, size


def _check_metadata(metadata: Any, path: Path) -> None:
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: __metadata__ must be an object of strings, found {type(metadata).__name__}")
    for field, value in metadata.items():
        if not isinstance(value, str):
            raise WeightsError(
                f"{path}: __metadata__ field {field!r} must be a string, found {type(value).__name__}"
            )


def _tensor_span(key: str, info: Any, data_len: int, path: Path) -> tuple[int, int, str]:
    """``(start, end, key)`` of one header entry, after checking it against dtype, shape and file size."""
    try:
        start, end = info["data_offsets"]
        count = 1
        for dim in info["shape"]:
            if not isinstance(dim, int) or dim < 0:
                raise ValueError(dim)
            count *= dim
        item = _DTYPE_SIZES[info["dtype"]]
        if not (isinstance(start, int) and isinstance(end, int)):
            raise ValueError(start)
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: corrupt entry for tensor {key!r} in the header") from None
    if not 0 <= start <= end <= data_len:
        raise WeightsError(
            f"{path}: tensor {key!r} claims bytes {start}..{end}, but the data holds {data_len} bytes"
            " (file truncated or corrupt)"
        )
    if end - start != count * item:
        raise WeightsError(
            f"{path}: tensor {key!r} of shape {info['shape']} and dtype {info['dtype']} needs {count * item}"
            f" bytes, but its offsets span {end - start}"
        )
    return start, end, key


def _check_layout(spans: list[tuple[int, int, str]], data_len: int, path: Path) -> None:
    """Tensors (sorted by offset) must tile the data exactly: no overlaps, gaps or trailing bytes."""
    position, previous = 0, None
    for start, end, key in spans:
        if start < position:
            raise WeightsError(f"{path}: tensors {previous!r} and {key!r} overlap (bytes {start}..{position})")
        if start > position:
            raise WeightsError(f"{path}: bytes {position}..{start} before tensor {key!r} belong to no tensor")
        position, previous = end, key
    if position != data_len:
        raise WeightsError(f"{path}: {data_len - position} trailing bytes after the last tensor")


def load_safetensors(path: str | os.PathLike, device: str = "cpu", copy: bool | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file after checking its header.

    On CPU the tensors view a private (copy-on-write) memory map of the file, so nothing is read
    until it is used; a float32/float64 tensor that the map would place at an address that is not
    64-byte aligned is read into fresh memory instead (CPU kernels give other bits on unaligned
    float32 data; half-precision tensors stay mapped, their kernels give the same bits). With
    ``copy=True`` (default: ``DIFFUSEKIT_COPY_WEIGHTS``) every tensor is read into private memory,
    so later changes to the file (truncation, which would crash a mapped load with SIGBUS) cannot
    reach the model.
    """
    return read_safetensors(path, device, copy)[0]


def read_safetensors(path: str | os.PathLike, device: str = "cpu",
                     copy: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`load_safetensors` that also returns the file's ``__metadata__``."""
    path = Path(path)
    copy = copy_weights_default() if copy is None else copy
    with open_regular(path, WeightsError) as f:
        header, data_start, size = _read_header(f, path)
        metadata = header.get("__metadata__", {})
        if str(device) == "cpu" and sys.byteorder == "little":
            tensors = _cpu_tensors(f, path, header, data_start, size, copy)
            if tensors is not None:
                return tensors, metadata
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device), metadata
    except Exception as err:  # the Rust reader reports its own error types
        raise WeightsError(f"{path}: cannot read safetensors file ({err})") from None


def _cpu_tensors(f: IO[bytes], path: Path, header: dict, data_start: int, size: int,
                 copy: bool) -> dict[str, torch.Tensor] | None:
    """The tensors of a checked header in file order: views of a memory map where aligned (and not
    ``copy``), else read into fresh memory; None where a dtype is not one torch has or the file
    cannot be mapped (the safetensors reader then takes over)."""
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            return None
        start, end = info["data_offsets"]
        entries.append((data_start + start, data_start + end, key, dtype, info["shape"]))
    entries.sort(key=lambda entry: entry[0])
    storage = None
    if not copy:
        try:
            storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        except (RuntimeError, OSError):
            return None
    tensors = {}
    for start, end, key, dtype, shape in entries:
        tensor = None
        if storage is not None:
            tensor = torch.empty(0, dtype=dtype, device="cpu").set_(storage[start:end], 0, shape)
        if tensor is None or (tensor.data_ptr() % ALIGNMENT and dtype in ALIGNMENT_SENSITIVE):
            tensor = _read_tensor(f, path, key, start, dtype, shape)
        tensors[key] = tensor
    return tensors


def _read_tensor(f: IO[bytes], path: Path, key: str, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """One tensor read from ``offset`` of ``f`` into freshly allocated (aligned, private) memory."""
    tensor = torch.empty(shape, dtype=dtype)
    buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    f.seek(offset)
    filled = 0
    while filled < len(buffer):
        count = f.readinto(buffer[filled:])
        if not count:
            raise WeightsError(f"{path}: file ended inside tensor {key!r} (truncated while being read)")
        filled += count
    return tensor


def load_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a legacy ``.bin``/``.ckpt`` file with ``weights_only=True`` (no code from the file runs)."""
    with open_regular(path, WeightsError) as f:
        try:
            data = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(
                f"{path}: refused or unreadable pickle checkpoint ({type(err).__name__}: {err}). "
                "Only plain tensors are accepted; convert it to safetensors."
            ) from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return data


def load_file(path: str | os.PathLike, copy: bool | None = None) -> dict[str, torch.Tensor]:
    """Read one weights file, choosing the reader from its extension."""
    return _read_file(Path(path), copy)[0]


def _read_file(path: Path, copy: bool | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of one weights file and its safetensors metadata (none for pickles)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, copy=copy)
    return load_pickle(path), {}


def load_sharded(index_path: str | os.PathLike, copy: bool | None = None) -> dict[str, torch.Tensor]:
    """Read every shard listed in a ``*.index.json`` file.

    Shards must be plain file names in the index's folder, hold exactly the keys the index gives
    them and, where the index records a save id (diffusekit saves), carry that same id: a folder
    that mixes the shards of two saves is refused, naming the shard.
    """
    index_path = Path(index_path)
    weight_map, save_id = _read_index(index_path)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = _shard_path(index_path, shard)
        tensors, metadata = _read_file(shard_path, copy)
        if save_id is not None and metadata.get(SAVE_ID_KEY) != save_id:
            raise WeightsError(
                f"{shard_path}: shard from another save (save id {metadata.get(SAVE_ID_KEY)!r}, the index"
                f" {index_path.name} has {save_id!r}); the folder mixes two saves"
            )
        strays = sorted(key for key in tensors if weight_map.get(key) != shard)
        if strays:
            raise WeightsError(f"{shard_path}: holds keys that {index_path.name} does not assign to it: {strays[:10]}")
        state.update(tensors)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise WeightsError(f"{index_path}: keys listed in the index but absent from the shards: {missing[:10]}")
    return state


def _read_index(index_path: Path) -> tuple[dict[str, str], str | None]:
    """The checked ``weight_map`` of a shard index and its save id (None for other writers' indexes)."""
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index_path}: no weight_map in the index")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise WeightsError(f"{index_path}: weight_map entry {key!r} must name a file, found {shard!r}")
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise WeightsError(f"{index_path}: metadata must be an object, found {type(metadata).__name__}")
    save_id = metadata.get(SAVE_ID_KEY)
    return weight_map, save_id if isinstance(save_id, str) else None


def _shard_path(index_path: Path, shard: str) -> Path:
    """The shard's path next to its index; names with folders, ``..`` or absolute paths are refused."""
    if not shard or shard in (".", "..") or Path(shard).name != shard or "\\" in shard or os.path.isabs(shard):
        raise WeightsError(f"{index_path}: shard name {shard!r} is not a file name in the index's folder")
    path = index_path.parent / shard
    if not path.is_file():
        raise WeightsError(f"{index_path}: shard {shard} is missing")
    return path


def weights_filenames(stem: str, ext: str, variant: str | None) -> tuple[str, str]:
    """The single-file name and the shard-index name for a weights stem, extension and variant."""
    single = add_variant(f"{stem}.{ext}", variant)
    index = f"{stem}.{ext}.index" + (f".{variant}" if variant else "") + ".json"
    return single, index


def find_weights(folder: Path, variant: str | None = None, use_safetensors: bool | None = None,
                 base: str = SAFETENSORS_NAME) -> Path:
    """The weights file (or shard index) in ``folder``: safetensors first, then legacy pickle.

    Where a single file and a shard index of the same format both exist (a save killed before it
    removed the other layout), the newer diffusekit save wins; files from other writers get the
    reference's choice, the index.
    """
    stem = base.rsplit(".", 1)[0]
    extensions = {None: ["safetensors", "bin"], True: ["safetensors"], False: ["bin"]}[use_safetensors]
    candidates = [name for ext in extensions for name in weights_filenames(stem, ext, variant)]
    for ext in extensions:
        single, index = (folder / name for name in weights_filenames(stem, ext, variant))
        if single.is_file() and index.is_file():
            return _newer_save(single, index)
        for path in (single, index):
            if path.is_file():
                return path
    # the reference's wording (users and its tests match on it), naming its last candidate
    last = weights_filenames(stem, extensions[-1], variant)[0]
    raise FileNotFoundError(f"Error no file named {last} found in directory {folder} "
                            f"(no weights file: looked for {', '.join(candidates)})")


def _newer_save(single: Path, index: Path) -> Path:
    single_id = None
    if single.suffix == ".safetensors":
        single_id = check_safetensors_header(single).get("__metadata__", {}).get(SAVE_ID_KEY)
    index_id = _read_index(index)[1]
    chosen = single if index_id is not None and single_id is not None and single_id > index_id else index
    logger.warning("%s holds both %s and %s; loading %s, the later save", single.parent, single.name,
                   index.name, chosen.name)
    return chosen


def load_weights(path: Path, copy: bool | None = None) -> dict[str, torch.Tensor]:
    """Read a weights file or a shard index (``copy``: see :func:`load_safetensors`)."""
    if path.name.endswith(".json"):
        return load_sharded(path, copy)
    return load_file(path, copy)


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
    """Write tensors (sharded with an index when larger than ``max_shard_size``); return the files.

    The save is atomic: every file is written under a temporary name and renamed into place, and
    a sharded save's index is written last, so a killed save leaves the previous weights loadable.
    Once the new weights are in place, the other weights files of this variant (the other layout,
    the other format, shards of earlier or killed saves) are removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_temp_files(folder)
    stem = base.rsplit(".", 1)[0]
    ext = "safetensors" if safe_serialization else "bin"
    tensors = {k: v.detach() for k, v in state_dict.items()}
    shards = _split_shards(tensors, parse_size(max_shard_size))
    save_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    metadata = {"format": "pt", SAVE_ID_KEY: save_id}

    def write(part: dict[str, torch.Tensor], path: Path) -> Path:
        if safe_serialization:
            return atomic_write(path, lambda f: write_safetensors(part, f, metadata))
        return atomic_write(path, lambda f: torch.save({k: v.contiguous() for k, v in part.items()}, f))

    single, index_name = weights_filenames(stem, ext, variant)
    if len(shards) == 1:
        written = [write(shards[0], folder / single)]
    else:
        names = _shard_names(folder, single, ext, len(shards), save_id)
        written = [write(part, folder / name) for name, part in zip(names, shards)]
        weight_map = {key: name for name, part in zip(names, shards) for key in part}
        total_size = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total_size, SAVE_ID_KEY: save_id}, "weight_map": weight_map}
        text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        written.insert(0, atomic_write(folder / index_name, lambda f: f.write(text)))
    _remove_stale(folder, stem, variant, {path.name for path in written})
    return written


def _split_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][key] = tensor
        used += nbytes
    return shards


def _shard_names(folder: Path, single: str, ext: str, total: int, save_id: str) -> list[str]:
    """The reference's shard names, or (where one of them is taken, e.g. by the shards that the
    current index still names) the same names tagged with this save's id."""
    names = [single.replace(f".{ext}", f"-{i:05d}-of-{total:05d}.{ext}") for i in range(1, total + 1)]
    if not any((folder / name).exists() for name in names):
        return names
    tag = save_id.rsplit("-", 1)[1]
    return [single.replace(f".{ext}", f"-{tag}-{i:05d}-of-{total:05d}.{ext}") for i in range(1, total + 1)]


def _remove_stale(folder: Path, stem: str, variant: str | None, keep: set[str]) -> None:
    """Delete this variant's weights files (both formats, both layouts, any shards) not in ``keep``."""
    names = {name for ext in ("safetensors", "bin") for name in weights_filenames(stem, ext, variant)}
    shard_stem = re.escape(add_variant(f"{stem}.x", variant)[: -len(".x")])
    shard = re.compile(shard_stem + r"(-[0-9a-f]{8})?-\d{5}-of-\d{5}\.(safetensors|bin)")
    for path in folder.iterdir():
        if path.name not in keep and (path.name in names or shard.fullmatch(path.name)) and path.is_file():
            path.unlink()


def write_safetensors(tensors: dict[str, torch.Tensor], f: IO[bytes], metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``f`` in the safetensors format, laid out so that a memory map gives
    64-byte aligned tensors: the header is padded to a multiple of 64 bytes and the tensors whose
    size is a multiple of 64 come first (the few others, at the end, are copied on load)."""
    if sys.byteorder != "little":
        raise NotImplementedError("writing safetensors files needs a little-endian machine")
    order = sorted(tensors, key=lambda key: tensors[key].numel() * tensors[key].element_size() % ALIGNMENT != 0)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in order:
        tensor = tensors[key]
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.dtype not in _SAFETENSORS_NAMES:
            raise WeightsError(f"cannot save tensor {key!r}: safetensors has no dtype {tensor.dtype}")
        header[key] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    f.write(struct.pack("<Q", len(raw)) + raw)
    for key in order:
        tensor = tensors[key].detach().to("cpu").contiguous()
        if tensor.numel():
            f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
