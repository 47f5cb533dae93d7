"""Safe reading and atomic writing of LoRA files.

Reading validates the safetensors header before any tensor is touched (truncated files, a header length
larger than the file, a header that is not JSON) and refuses pickle-based formats unless the caller asks for
them, because unpickling a ``.ckpt``/``.pt``/``.bin`` can run arbitrary code. Every tensor is checked for
NaN/inf, so a broken file fails at load time with its name rather than as a black image later.

A module-level cache keyed by ``(resolved path, size, mtime_ns)`` keeps an unchanged file from being read twice;
ComfyUI V3 nodes have no instance state, so the cache has to live here (nodes' ``fingerprint_inputs`` can use
:func:`cache_key`).

Writing goes to a temporary file in the destination folder, is fsynced, then moved into place with
``os.replace``, so a crash never leaves a half-written LoRA under the final name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# A safetensors header is JSON describing tensors; even a huge LoRA's header is far below this. A larger value
# means a corrupt or hostile file, and reading it would allocate that much memory.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_CACHE_MAX_ENTRIES = 16
# The cache holds whole files in memory: bound it by bytes as well (sixteen SDXL LoRAs would pin over 10 GB).
# A file larger than the bound is read but not kept.
CACHE_MAX_BYTES = 2 * 1024**3

CacheKey = tuple[str, int, int]


@dataclass
class CacheInfo:
    """Counters of the read cache: ``hits``, ``misses``, the number of ``entries`` held and their ``bytes``."""

    hits: int
    misses: int
    entries: int
    bytes: int = 0


_cache: OrderedDict[CacheKey, tuple[dict[str, torch.Tensor], dict[str, str]]] = OrderedDict()
_cache_lock = threading.Lock()
_hits = 0
_misses = 0


class LoraFileError(ValueError):
    """A file that cannot be read as a LoRA: corrupt, truncated, non-finite or refused."""


def cache_key(path: str | os.PathLike[str]) -> CacheKey:
    """Return the cache key of a file: ``(resolved path, size in bytes, mtime in ns)``.

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    resolved = Path(path).resolve()
    try:
        st = resolved.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"LoRA file not found: '{path}'") from None
    return (str(resolved), st.st_size, st.st_mtime_ns)


def cache_info() -> CacheInfo:
    """Return the hit/miss counters and size of the read cache."""
    with _cache_lock:
        return CacheInfo(_hits, _misses, len(_cache), sum(_nbytes(sd) for sd, _ in _cache.values()))


def cache_clear() -> None:
    """Empty the read cache and reset its counters."""
    global _hits, _misses
    with _cache_lock:
        _cache.clear()
        _hits = 0
        _misses = 0


def read_safetensors(
    path: str | os.PathLike[str], *, allow_pickle: bool = False, display: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file after validating it, using the cache for an unchanged file.

    Args:
        path: a ``.safetensors`` file; ``.ckpt/.pt/.pth/.bin`` only with ``allow_pickle``.
        allow_pickle: load a pickle-based file with ``torch.load(weights_only=True)``.
        display: the name messages use (e.g. the name in ``models/loras``, so no server path reaches a client);
            defaults to ``path``.

    Returns:
        ``(state_dict, metadata)``: new dicts on every call (the tensors themselves are shared with the cache;
        do not modify them in place). Metadata is empty for pickle files.

    Raises:
        FileNotFoundError: if the file does not exist.
        LoraFileError: (a ``ValueError``) for a refused pickle file, a truncated file, an absurd header length,
            a header that is not JSON, or a tensor holding NaN/inf; the message names the file.
    """
    global _hits, _misses
    key = cache_key(path)
    with _cache_lock:
        if key in _cache:
            _hits += 1
            _cache.move_to_end(key)
            sd, meta = _cache[key]
            return dict(sd), dict(meta)
        _misses += 1
    sd, meta = _read_uncached(Path(key[0]), display=display or str(path), allow_pickle=allow_pickle)
    with _cache_lock:
        # A rewritten file has a new key; drop the stale entries of the same path so memory does not grow.
        for stale in [k for k in _cache if k[0] == key[0]]:
            del _cache[stale]
        if _nbytes(sd) <= CACHE_MAX_BYTES:
            _cache[key] = (sd, meta)
        held = sum(_nbytes(t) for t, _ in _cache.values())
        while _cache and (len(_cache) > _CACHE_MAX_ENTRIES or held > CACHE_MAX_BYTES):
            _, (old, _) = _cache.popitem(last=False)
            held -= _nbytes(old)
    return dict(sd), dict(meta)


def _nbytes(sd: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def read_header(
    path: str | os.PathLike[str], *, display: str | None = None, load: Any = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file's header only: tensors as shape-only ``meta`` tensors, plus the metadata.

    Enough to tell a LoRA's format, ranks, shapes and family without reading megabytes of weights (the info panel
    asks for every row of a stack on every change). Keys for which ``load(key)`` is true (e.g. ``.alpha`` scalars)
    are read for real.

    Returns:
        ``(state_dict, metadata)``; tensors on the ``meta`` device except the loaded ones.

    Raises:
        FileNotFoundError: if the file does not exist.
        LoraFileError: as :func:`validate_safetensors`, for a pickle suffix, or an unknown dtype in the header.
    """
    name = display if display is not None else str(path)
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(f"'{name}' is a pickle file; only .safetensors headers are read without loading it")
    if not Path(path).is_file():
        raise FileNotFoundError(f"LoRA file not found: '{name}'")
    header = validate_safetensors(path, display=name)
    meta = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    sd: dict[str, torch.Tensor] = {}
    wanted = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = _DTYPES.get(str(entry.get("dtype")))
        shape = entry.get("shape")
        if dtype is None or not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise LoraFileError(f"'{name}' has a malformed header entry for tensor '{key}': {entry!r:.120}")
        if load is not None and load(key):
            wanted.append(key)
        else:
            sd[key] = torch.empty(shape, dtype=dtype, device="meta")
    if wanted:
        with safetensors.safe_open(str(path), "pt", device="cpu") as f:
            for key in wanted:
                sd[key] = f.get_tensor(key)
        check_finite({k: sd[k] for k in wanted}, name)
    return sd, meta


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.uint8),
    "F8_E5M2": getattr(torch, "float8_e5m2", torch.uint8),
}


def _read_uncached(path: Path, *, display: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraFileError(
                f"refusing to load '{display}': {path.suffix} files are Python pickles, and unpickling can run "
                f"arbitrary code. Convert it to .safetensors, or if you trust its source pass allow_pickle=True "
                f"(it is then read with torch.load(weights_only=True))."
            )
        sd = _read_pickle(path, display)
        check_finite(sd, display)
        return sd, {}
    header = validate_safetensors(path, display=display)
    meta = dict(header.get("__metadata__") or {})
    sd = safetensors.torch.load_file(str(path), device="cpu")
    check_finite(sd, display)
    return sd, {str(k): str(v) for k, v in meta.items()}


def _read_pickle(path: Path, display: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError) for bad files
        raise LoraFileError(f"cannot read '{display}' with torch.load(weights_only=True): {exc}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoraFileError(f"'{display}' does not hold a flat dict of tensors (got {type(obj).__name__})")
    return {str(k): v for k, v in obj.items()}


def validate_safetensors(path: str | os.PathLike[str], *, display: str | None = None) -> dict[str, Any]:
    """Check a safetensors file's framing without loading tensors.

    Args:
        path: the file.
        display: the name to use in messages (defaults to ``path``).

    Returns:
        The parsed JSON header (tensor entries and ``__metadata__``).

    Raises:
        LoraFileError: if the file is shorter than its 8-byte length prefix, the header length is larger than
            the file, the header is not a JSON object, or the data section is shorter than the header declares.
    """
    name = display if display is not None else str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise LoraFileError(f"'{name}' is truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise LoraFileError(
                f"'{name}' is not a valid safetensors file: its header claims {n} bytes but the file has {size} "
                f"bytes (truncated or not a safetensors file)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFileError(f"'{name}' is not a valid safetensors file: its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise LoraFileError(f"'{name}' is not a valid safetensors file: its header is {type(header).__name__}")
    data_len = size - 8 - n
    needed = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            needed = max(needed, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise LoraFileError(f"'{name}' has a malformed header entry for tensor '{key}': {entry!r}") from None
    if needed > data_len:
        raise LoraFileError(
            f"'{name}' is truncated: its header needs {needed} data bytes but only {data_len} are present"
        )
    return header


def check_finite(sd: Mapping[str, torch.Tensor], display: str) -> None:
    """Raise if any floating-point tensor holds NaN or inf.

    Raises:
        LoraFileError: naming the file, the first bad key (in sorted order) and how many values are bad.
    """
    for key in sorted(sd):
        t = sd[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise LoraFileError(
                f"'{display}' holds non-finite values (NaN or inf): first bad tensor '{key}' has {bad} of "
                f"{t.numel()} values non-finite"
            )


def normalize_metadata(metadata: Mapping[str, Any] | None, *, where: str = "") -> dict[str, str]:
    """Return metadata with every value as ``str`` (safetensors stores only strings).

    Numbers and booleans become ``str(value)``; dicts, lists and tuples become JSON; strings stay.

    Raises:
        TypeError: for a non-string key or a value of another type (None, tensors...), naming key and type.
    """
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metadata key {k!r}{where} must be a str, got {type(k).__name__}")
        if isinstance(v, str):
            out[k] = v
        elif isinstance(v, (bool, int, float)):
            out[k] = str(v)
        elif isinstance(v, (dict, list, tuple)):
            out[k] = json.dumps(v, sort_keys=True)
        else:
            raise TypeError(
                f"metadata value for '{k}'{where} must be str (or a number/bool/list/dict to convert), "
                f"got {type(v).__name__}"
            )
    return out


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"value for '{k}' is {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing storage (views from a merge can); copy the later ones.
        if ptr in seen and t.numel() > 0:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[k] = t
    return out


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write tensors and metadata atomically (temp file in the same folder, fsync, ``os.replace``).

    Args:
        path: destination ``.safetensors`` file; its folder must exist.
        tensors: name -> tensor (moved to CPU, made contiguous).
        metadata: values converted to ``str`` by :func:`normalize_metadata`.
        overwrite: replace an existing file.

    Returns:
        The destination path.

    Raises:
        FileExistsError: if the file exists and ``overwrite`` is False.
        FileNotFoundError: if the destination folder does not exist.
        TypeError: for metadata values that cannot be stored as strings, or non-tensor values.
    """
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"'{dest}' already exists; pass overwrite=True to replace it")
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"folder '{dest.parent}' for '{dest.name}' does not exist")
    meta = normalize_metadata(metadata, where=f" (writing '{dest}')")
    data = safetensors.torch.save(_prepare_tensors(tensors), metadata=meta or None)
    return atomic_write_bytes(dest, data, overwrite=overwrite)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically: a unique temp file in the same folder, fsync, ``os.replace``, then
    fsync of the folder, so a crash leaves either the old file or the whole new one, never half of it.

    The package's one atomic writer (LoRA files here; checkpoints and caches can use it too).

    Args:
        path: the destination; its folder must exist.
        data: the file's bytes.
        overwrite: replace an existing file; False refuses one, also one created while writing.

    Returns:
        The destination path.

    Raises:
        FileExistsError: if the file exists and ``overwrite`` is False.
        OSError: from the file system (the temp file is removed).
    """
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and dest.exists():
            # Someone created it while we wrote; keep our promise not to clobber it.
            raise FileExistsError(f"'{dest}' already exists; pass overwrite=True to replace it")
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(dest.parent)
    return dest


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened this way on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_hash(path: str | os.PathLike[str]) -> str:
    """Return the sha256 hex digest of the whole file.

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_hash(buf_reader: Any) -> str:
    # kohya's addnet_hash_safetensors: sha256 of everything after the header, so metadata edits keep the hash.
    # https://github.com/kohya-ss/sd-scripts/blob/main/library/train_util.py
    buf_reader.seek(0)
    (n,) = struct.unpack("<Q", buf_reader.read(8))
    buf_reader.seek(8 + n)
    h = hashlib.sha256()
    for chunk in iter(lambda: buf_reader.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _legacy_hash(buf_reader: Any) -> str:
    # kohya's addnet_hash_legacy (the old A1111 model hash): 64 KiB at offset 1 MiB, first 8 hex digits.
    h = hashlib.sha256()
    buf_reader.seek(0x100000)
    h.update(buf_reader.read(0x10000))
    return h.hexdigest()[0:8]


def model_hash(path: str | os.PathLike[str]) -> str:
    """Return kohya's ``sshs_model_hash`` of a safetensors file: sha256 of the data after the header.

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    with open(path, "rb") as f:
        return _data_hash(f)


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """Return kohya's ``sshs_legacy_hash`` of a file (8 hex digits; hash of empty bytes for small files).

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    with open(path, "rb") as f:
        return _legacy_hash(f)


def tensor_hash(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Return ``{"sshs_model_hash", "sshs_legacy_hash"}`` for tensors before they are written.

    The model hash excludes the header, so it equals :func:`model_hash` of the file later written with any
    metadata. The legacy hash reads bytes at a fixed offset and so depends on the header too; kohya computes it
    with only the ``ss_*`` metadata keys, which is done here as well.

    Raises:
        TypeError: for metadata values that cannot be stored as strings.
    """
    import io

    meta = {k: v for k, v in normalize_metadata(metadata).items() if k.startswith("ss_")}
    data = safetensors.torch.save(_prepare_tensors(tensors), metadata=meta or None)
    buf = io.BytesIO(data)
    return {"sshs_model_hash": _data_hash(buf), "sshs_legacy_hash": _legacy_hash(buf)}
