"""Base families: told by tensor shapes, metadata only as a hint; the keys that name a family, written and read."""

from __future__ import annotations

import pytest
import torch

from lora_workbench.lora import families, metadata


@pytest.mark.parametrize(
    ("meta", "family"),
    [
        ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        ({"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
        ({"ss_v2": "True"}, "sd2"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
        ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
        ({"lora_workbench.base_family": "sd3"}, "sd3"),
    ],
)
def test_base_family_from_metadata(meta, family):
    assert families.base_family({}, meta) == family


def _pair(name, out, inp):
    return {f"{name}.lora_down.weight": torch.zeros(2, inp), f"{name}.lora_up.weight": torch.zeros(out, 2)}


@pytest.mark.parametrize(
    ("sd", "family"),
    [
        (_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, 768), "sd1"),
        (_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, 1024), "sd2"),
        (_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v", 640, 2048), "sdxl"),
        # lora_te1_ alone is no evidence: diffusers' kohya converter writes it for SD1, and CLIP-L is SDXL's first
        # encoder too. A second encoder 1280 wide is.
        (_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768), None),
        ({**_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
          **_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)}, "sdxl"),
        (_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768), "sd1"),
        (_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, 1024), "sd2"),
        (_pair("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072), "flux"),
        ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(2, 768),
          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(320, 2)},
         "sd1"),
        (_pair("lora_unet_x", 4, 4), None),
    ],
)  # fmt: skip
def test_base_family_from_keys(sd, family):
    assert families.base_family(sd, {}) == family


def test_shapes_win_over_metadata_and_the_disagreement_is_named():
    sd = _pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, 768)
    claims_sdxl = {"ss_base_model_version": "sdxl_base_v1-0"}
    assert families.base_family(sd, claims_sdxl) == "sd1"
    assert "metadata says sdxl" in families.family_disagreement(sd, claims_sdxl)
    assert families.family_disagreement(sd, {"ss_base_model_version": "sd_v1"}) is None
    # Shapes that cannot tell leave the metadata's word.
    assert families.base_family(_pair("lora_unet_x", 4, 4), claims_sdxl) == "sdxl"


@pytest.mark.parametrize("family", sorted(families.FAMILIES))
def test_family_metadata_reads_back_as_its_family(family):
    written = families.family_metadata(family)
    assert all(isinstance(v, str) for v in written.values())
    assert families.family_from_metadata(written) == family
    # Each of the other tools' keys names the family on its own, as files from kohya or the model spec carry one.
    for key in ("ss_base_model_version", "modelspec.architecture"):
        assert families.family_from_metadata({key: written[key]}) == family, key


def test_our_family_key_is_under_our_prefix():
    assert families.FAMILY_KEY == metadata.OURS + "base_family"
