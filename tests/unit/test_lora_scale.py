"""Per-block weights (LoRA Block Weight convention) and the total-strength warning."""

from __future__ import annotations

import pytest

from lora_workbench.lora import scale


@pytest.mark.parametrize(
    ("key", "block"),
    [
        ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "IN04"),
        ("diffusion_model.middle_block.1.proj_in.weight", "MID"),
        ("diffusion_model.output_blocks.11.1.proj_out.weight", "OUT11"),
        ("diffusion_model.output_blocks.3.0.in_layers.2.weight", "OUT03"),
        ("diffusion_model.time_embed.0.weight", None),
        ("diffusion_model.out.2.weight", None),
        ("clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", "BASE"),
        ("clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "BASE"),
        ("transformer.text_model.encoder.layers.0.mlp.fc1.weight", "BASE"),
        ("lora_unet_down_blocks_1_attentions_1_proj_in", "IN05"),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", "IN03"),
        ("lora_unet_mid_block_attentions_0_proj_in", "MID"),
        ("lora_unet_up_blocks_1_attentions_2_proj_out", "OUT05"),
        ("lora_unet_up_blocks_3_attentions_0_proj_out", "OUT09"),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", "BASE"),
    ],
)
def test_block_id(key, block):
    assert scale.block_id(key) == block


def test_presets_have_the_family_length():
    for family, presets in scale.PRESETS.items():
        for name, values in presets.items():
            assert len(values) == len(scale.BLOCKS[family]), (family, name)


def test_parse_preset_and_vector():
    w = scale.parse_block_weights("outall", "sd1")
    assert w["BASE"] == 1 and w["IN01"] == 0 and w["MID"] == 0 and w["OUT03"] == 1 and w["OUT11"] == 1
    v = scale.parse_block_weights("1, 0.5, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0.25", "sd2")
    assert v["IN01"] == 0.5 and v["OUT11"] == 0.25 and len(v) == 17
    full = scale.parse_block_weights(",".join(["0.3"] * 26), "sd1")
    assert full["IN00"] == 0.3 and len(full) == 26
    xl = scale.parse_block_weights("1,0,0,1,1,0,0,0,0,0,0,0", "sdxl")
    assert xl["IN07"] == 1 and xl["IN04"] == 0 and xl["OUT05"] == 0
    assert scale.block_weight("diffusion_model.input_blocks.7.1.x.weight", xl) == 1.0
    assert scale.block_weight("diffusion_model.input_blocks.4.1.x.weight", xl) == 0.0
    assert scale.block_weight("diffusion_model.time_embed.0.weight", xl) == 1.0, "unlisted blocks keep weight 1"


@pytest.mark.parametrize(
    ("spec", "family", "message"),
    [
        ("1,0,1", "sd1", r"'1,0,1' have 3 values; sd1 expects 17 \(sd1\) or 26 \(sd1_full\)"),
        ("1,0,x,1", "sdxl", r"block weight 3 of '1,0,x,1' is not a number: 'x'"),
        ("NOPE", "sd1", r"unknown block-weight preset 'NOPE'"),
        ("ALL", "flux", r"no block layout for family 'flux'"),
    ],
)
def test_parse_errors(spec, family, message):
    with pytest.raises(ValueError, match=message):
        scale.parse_block_weights(spec, family)


def test_total_strength_and_warning():
    total = scale.total_strength([1.0, -0.8, 0.5])
    assert total == pytest.approx(2.3)
    msg = scale.strength_warning(total)
    assert msg is not None and "2.30" in msg and "2.0" in msg
    assert scale.strength_warning(2.0) is None
    assert scale.strength_warning(1.2, limit=1.0) is not None
