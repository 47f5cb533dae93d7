"""Safe reading (validation, pickle refusal, cache) and atomic writing of LoRA files."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import safetensors.torch
import torch

from lora_workbench.lora import safeio


@pytest.fixture(autouse=True)
def _fresh_cache():
    safeio.cache_clear()
    yield
    safeio.cache_clear()


def _tensors():
    return {"a.lora_down.weight": torch.arange(12.0).reshape(3, 4), "a.lora_up.weight": torch.ones(5, 3)}


def test_write_then_read_keeps_tensors_and_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    safeio.write_safetensors(path, _tensors(), {"ss_network_dim": 3, "s": "text", "cfg": {"a": 1}})
    sd, meta = safeio.read_safetensors(path)
    assert set(sd) == set(_tensors())
    for k, t in _tensors().items():
        assert torch.equal(sd[k], t), k
    # Numbers become str, dicts JSON: safetensors metadata holds strings only.
    assert meta == {"ss_network_dim": "3", "s": "text", "cfg": '{"a": 1}'}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")], "temp file left behind"


def test_write_refuses_existing_file_unless_asked(tmp_path):
    path = tmp_path / "x.safetensors"
    safeio.write_safetensors(path, _tensors(), {})
    with pytest.raises(FileExistsError, match="x.safetensors"):
        safeio.write_safetensors(path, {"b": torch.zeros(1)}, {})
    safeio.write_safetensors(path, {"b": torch.zeros(1)}, {}, overwrite=True)
    assert set(safeio.read_safetensors(path)[0]) == {"b"}


@pytest.mark.parametrize("bad", [None, torch.zeros(1), object()])
def test_write_rejects_metadata_that_is_not_stringable(tmp_path, bad):
    with pytest.raises(TypeError, match="'k'"):
        safeio.write_safetensors(tmp_path / "x.safetensors", _tensors(), {"k": bad})
    assert not (tmp_path / "x.safetensors").exists()


def test_write_copies_tensors_that_share_storage(tmp_path):
    base = torch.randn(4, 6)
    # Two views of one storage: safetensors refuses those unless the writer copies one.
    safeio.write_safetensors(tmp_path / "x.safetensors", {"a": base[:2], "b": base[2:]}, {})
    sd, _ = safeio.read_safetensors(tmp_path / "x.safetensors")
    assert torch.equal(sd["a"], base[:2]) and torch.equal(sd["b"], base[2:])


def test_cache_hit_on_unchanged_file_and_miss_after_rewrite(tmp_path):
    path = tmp_path / "x.safetensors"
    safeio.write_safetensors(path, _tensors(), {"v": "1"})
    _, m1 = safeio.read_safetensors(path)
    _, m2 = safeio.read_safetensors(path)
    info = safeio.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    assert m1 == m2 == {"v": "1"}
    safeio.write_safetensors(path, _tensors(), {"v": "2"}, overwrite=True)
    st = os.stat(path)
    # Force a different mtime even on filesystems with coarse timestamps, so the test cannot pass by luck.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _, m3 = safeio.read_safetensors(path)
    info = safeio.cache_info()
    assert (info.hits, info.misses, info.entries) == (1, 2, 1), "the stale entry must be replaced, not kept"
    assert m3 == {"v": "2"}


def test_cache_returns_fresh_dicts(tmp_path):
    path = tmp_path / "x.safetensors"
    safeio.write_safetensors(path, _tensors(), {"v": "1"})
    sd, meta = safeio.read_safetensors(path)
    sd.pop("a.lora_up.weight")
    meta["v"] = "changed"
    sd2, meta2 = safeio.read_safetensors(path)
    assert "a.lora_up.weight" in sd2 and meta2 == {"v": "1"}


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_refused_with_explanation(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    torch.save(_tensors(), path)
    with pytest.raises(safeio.LoraFileError) as exc:
        safeio.read_safetensors(path)
    msg = str(exc.value)
    assert f"x{suffix}" in msg and "arbitrary code" in msg and "allow_pickle=True" in msg


def test_pickle_allowed_when_asked(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(_tensors(), path)
    sd, meta = safeio.read_safetensors(path, allow_pickle=True)
    assert torch.equal(sd["a.lora_down.weight"], _tensors()["a.lora_down.weight"]) and meta == {}


def _write_raw(path, header: bytes, data: bytes = b"", declared: int | None = None):
    n = len(header) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + header + data)


def test_truncated_data_detected(tmp_path):
    good = tmp_path / "good.safetensors"
    safeio.write_safetensors(good, _tensors(), {})
    raw = good.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(raw[:-10])
    with pytest.raises(safeio.LoraFileError, match=r"cut\.safetensors' is truncated"):
        safeio.read_safetensors(bad)


def test_tiny_file_detected(tmp_path):
    bad = tmp_path / "tiny.safetensors"
    bad.write_bytes(b"abc")
    with pytest.raises(safeio.LoraFileError, match="tiny.safetensors' is truncated"):
        safeio.read_safetensors(bad)


def test_absurd_header_length_detected(tmp_path):
    bad = tmp_path / "absurd.safetensors"
    _write_raw(bad, b"{}", declared=10**12)
    with pytest.raises(safeio.LoraFileError, match=r"absurd.safetensors.*claims 1000000000000 bytes"):
        safeio.read_safetensors(bad)


def test_non_json_header_detected(tmp_path):
    bad = tmp_path / "nojson.safetensors"
    _write_raw(bad, b"this is not json")
    with pytest.raises(safeio.LoraFileError, match="nojson.safetensors.*header is not JSON"):
        safeio.read_safetensors(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_named(tmp_path, value):
    t = _tensors()
    t["b.alpha"] = torch.tensor(4.0)
    t["z.lora_up.weight"] = torch.ones(3, 3)
    t["z.lora_up.weight"][1, 2] = value
    path = tmp_path / "nan.safetensors"
    # Written with safetensors directly: our writer is not the place that should catch it.
    safetensors.torch.save_file(t, str(path))
    with pytest.raises(safeio.LoraFileError, match=r"nan.safetensors.*'z.lora_up.weight' has 1 of 9"):
        safeio.read_safetensors(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        safeio.read_safetensors(tmp_path / "nope.safetensors")


def test_hashes(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {"w": torch.randn(700, 700, generator=torch.Generator().manual_seed(0))}  # > 1 MiB for legacy hash
    pre = safeio.tensor_hash(tensors, {"ss_a": "1"})
    safeio.write_safetensors(path, tensors, {"ss_a": "1", "other": "x" * 100})
    raw = path.read_bytes()
    assert safeio.file_hash(path) == hashlib.sha256(raw).hexdigest()
    n = struct.unpack("<Q", raw[:8])[0]
    # kohya's sshs_model_hash: sha256 of the bytes after the header, so extra metadata does not change it.
    assert safeio.model_hash(path) == hashlib.sha256(raw[8 + n :]).hexdigest() == pre["sshs_model_hash"]
    assert safeio.legacy_hash(path) == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert len(pre["sshs_legacy_hash"]) == 8
    assert json.loads(raw[8 : 8 + n])["__metadata__"]["other"] == "x" * 100
