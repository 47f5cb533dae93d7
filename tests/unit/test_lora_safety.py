"""Resource and input safety of lora/: bounded cache, header-only reads, no file-given regexes, typed metadata."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from lora_workbench.lora import keys, metadata, safeio


def _write(path, n_modules=4, rank=4, width=256):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(n_modules):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{i}_to_q"
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, width, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(width, rank, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return sd


def test_cache_is_bounded_by_bytes(tmp_path, monkeypatch):
    safeio.cache_clear()
    one = sum(t.numel() * t.element_size() for t in _write(tmp_path / "0.safetensors").values())
    for i in range(1, 5):
        _write(tmp_path / f"{i}.safetensors")
    monkeypatch.setattr(safeio, "CACHE_MAX_BYTES", int(2.5 * one))
    for i in range(5):
        safeio.read_safetensors(tmp_path / f"{i}.safetensors")
    info = safeio.cache_info()
    assert info.entries == 2 and info.bytes == 2 * one, info
    # A file above the bound is read, never kept.
    monkeypatch.setattr(safeio, "CACHE_MAX_BYTES", one // 2)
    safeio.cache_clear()
    safeio.read_safetensors(tmp_path / "0.safetensors")
    assert safeio.cache_info().entries == 0
    safeio.cache_clear()


def test_header_read_describes_without_loading_weights(tmp_path, monkeypatch):
    _write(tmp_path / "h.safetensors", n_modules=3, rank=8)
    calls = []
    monkeypatch.setattr(safeio.safetensors.torch, "load_file", lambda *a, **k: calls.append(a))
    sd, meta = safeio.read_header(tmp_path / "h.safetensors", load=lambda k: k.endswith(".alpha"))
    assert calls == []
    assert {t.device.type for k, t in sd.items() if not k.endswith(".alpha")} == {"meta"}
    info = metadata.describe(sd, meta, source="h.safetensors")
    assert info["modules"] == 3 and info["ranks"] == [8] and info["alphas"] == [2.0], info


def test_header_read_names_the_given_display_name_only(tmp_path):
    path = tmp_path / "deep" / "secret_dir"
    path.mkdir(parents=True)
    _write(path / "t.safetensors")
    data = (path / "t.safetensors").read_bytes()
    (path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(safeio.LoraFileError) as err:
        safeio.read_header(path / "t.safetensors", display="t.safetensors")
    assert "t.safetensors" in str(err.value) and "secret_dir" not in str(err.value)


def test_alpha_pattern_keys_are_never_compiled_as_regexes():
    # A catastrophic-backtracking pattern: compiled as peft does, "(.*\\.)?((a+)+$)" against this module path
    # takes 2^30 steps. Read literally, it simply names no module.
    evil = "(a+)+$"
    last = "a" * 30 + "x"
    sd = {
        f"unet.down_blocks.0.{last}.lora_A.weight": torch.zeros(2, 4),
        f"unet.down_blocks.0.{last}.lora_B.weight": torch.zeros(4, 2),
    }
    adapter = {"unet.r": 2, "unet.lora_alpha": 4, "unet.alpha_pattern": {evil: 1, last: 8}}
    meta = {keys.LORA_ADAPTER_METADATA_KEY: json.dumps(adapter)}
    started = time.perf_counter()
    state = keys.state_from_dict(sd, meta, source="evil.safetensors")
    assert time.perf_counter() - started < 1.0
    # The literal suffix names the module; the regex-looking key matches nothing.
    assert [m.alpha for m in state.modules.values()] == [8.0]
    assert keys.pattern_matches("attn.to_q", "down_blocks.0.attn.to_q")
    assert not keys.pattern_matches("n.to_q", "down_blocks.0.attn.to_q")
    assert not keys.pattern_matches(".*to_q", "down_blocks.0.attn.to_q")


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        (keys.LORA_ADAPTER_METADATA_KEY, json.dumps({"unet.lora_alpha": "eight"}), "unet.lora_alpha"),
        (keys.LORA_ADAPTER_METADATA_KEY, json.dumps({"unet.alpha_pattern": ["x"]}), "unet.alpha_pattern"),
        (keys.LORA_ADAPTER_METADATA_KEY, json.dumps({"unet.r": 0}), "unet.r"),
        (keys.LORA_ADAPTER_METADATA_KEY, "[1, 2]", "not an object"),
        (keys.TE_NAMES_METADATA_KEY, json.dumps(["lora_te1"]), "text_encoder"),
        (keys.TE_NAMES_METADATA_KEY, json.dumps({"text_encoder": {"x": 1}}), "text_encoder"),
    ],
)
def test_wrongly_typed_metadata_is_a_named_error(key, value, field):
    sd = {
        "unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 4),
        "unet.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(4, 2),
    }
    with pytest.raises(ValueError) as err:
        keys.state_from_dict(sd, {key: value}, source="typed.safetensors")
    assert "typed.safetensors" in str(err.value) and field in str(err.value), str(err.value)
