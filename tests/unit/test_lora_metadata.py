"""Metadata: kohya/modelspec/our keys written as strings, trigger words, settings, describe."""

from __future__ import annotations

import json

import pytest
import torch

from lora_workbench.lora import keys, metadata, safeio


def test_build_metadata_minimum_keys_round_trip_through_file(tmp_path, make_state):
    st = make_state(rank=8, alpha=4.0)
    meta = metadata.build_metadata(
        st,
        output_name="sks_dog",
        trigger_words=["sks", "sks dog", "SKS"],
        training_settings={"lr": 1e-4, "steps": 500},
        merge_recipe={"method": "concat"},
        source_hashes={"a.safetensors": "ab" * 32},
        created=0,
    )
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "sks_dog"
    assert meta["modelspec.trigger_phrase"] == "sks, sks dog", "case-insensitive duplicates removed, order kept"
    assert meta["modelspec.date"] == "1970-01-01T00:00:00"
    path = tmp_path / "m.safetensors"
    safeio.write_safetensors(path, keys.to_kohya_dict(st), meta)
    _, back = safeio.read_safetensors(path)
    assert back == meta
    assert metadata.training_settings(back)["steps"] == 500
    assert json.loads(back["lora_workbench.merge_recipe"]) == {"method": "concat"}


def test_build_metadata_mixed_ranks_is_dynamic(make_state):
    st = make_state(rank=4)
    st.modules.update(make_state(rank=8, modules=[("lora_unet_x", 4, 4, None)]).modules)
    meta = metadata.build_metadata(st)
    assert meta["ss_network_dim"] == "Dynamic"


def test_build_metadata_keeps_existing_and_its_trigger_words(make_state):
    existing = {"ss_output_name": "old", "modelspec.trigger_phrase": "zxc", "ss_tag_frequency": '{"d": {"t": 9}}'}
    meta = metadata.build_metadata(make_state(), existing=existing)
    assert meta["ss_output_name"] == "old" and meta["modelspec.trigger_phrase"] == "zxc"
    assert json.loads(meta["lora_workbench.trigger_words"]) == ["zxc"], "tag counts are not promoted to triggers"


@pytest.mark.parametrize(("kwargs", "message"), [({"base_family": "sd9"}, "unknown base family 'sd9'"),
                                                 ({"rank": 0}, "rank must be >= 1, got 0")])  # fmt: skip
def test_build_metadata_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        metadata.build_metadata(**kwargs)


def test_trigger_words_from_all_sources():
    meta = {
        "lora_workbench.trigger_words": '["sks"]',
        "modelspec.trigger_phrase": "sks, ohwx style",
        "ss_tag_frequency": json.dumps(
            {"10_sks dog": {"dog": 10, " sks": 12, "grass": 3}, "5_x": {"dog": 4, "sky": 1}}
        ),
    }
    assert metadata.trigger_words(meta) == ["sks", "ohwx style", "dog", "grass", "sky"]
    assert metadata.trigger_words(meta, max_tags=1) == ["sks", "ohwx style", "dog"], "dog: 14 over two datasets"
    assert metadata.trigger_words(meta, max_tags=0) == ["sks", "ohwx style"]
    assert metadata.trigger_words({}) == []


def test_dedupe_words_strips_drops_empty_and_ignores_case():
    words = [" sks", "SKS ", "", "  ", "red hat", "Red Hat", "dog"]
    assert metadata.dedupe_words(words) == ["sks", "red hat", "dog"], "first spelling and order kept"
    assert metadata.dedupe_words(iter(["a", "A"])) == ["a"]


def test_training_settings_parses_kohya_numbers():
    meta = {"ss_learning_rate": "0.0001", "ss_max_train_steps": "1600", "ss_optimizer": "AdamW",
            "lora_workbench.training_settings": '{"prior_loss_weight": 1.0}'}  # fmt: skip
    s = metadata.training_settings(meta)
    assert s == {"learning_rate": 1e-4, "max_train_steps": 1600, "optimizer": "AdamW", "prior_loss_weight": 1.0}


def test_describe_counts(make_state):
    st = make_state(rank=4, alpha=2.0, metadata={"modelspec.trigger_phrase": "sks", "ss_output_name": "dog"})
    st.extras["lora_unet_x.diff"] = torch.zeros(3)
    d = metadata.describe(st)
    assert (d["modules"], d["unet_modules"], d["te_modules"], d["conv_modules"]) == (5, 4, 1, 1)
    assert d["ranks"] == [4] and d["alphas"] == [2.0] and d["family"] == "sd1"
    assert d["trigger_words"] == ["sks"] and d["title"] == "dog" and d["extras"] == ["lora_unet_x.diff"]
    raw = metadata.describe(keys.to_kohya_dict(st), st.metadata)
    assert raw["format"] == "kohya" and raw["modules"] == 5
