"""Key formats: detection, reading every format into kohya names, writing, and round trips through files."""

from __future__ import annotations

import json

import pytest
import torch

from lora_workbench.lora import keys, safeio
from lora_workbench.lora.keys import KeyFormat
from lora_workbench.lora.state import LoraModule, LoraState


def _eff_alpha(m: LoraModule) -> float:
    return float(m.alpha) if m.alpha is not None else float(m.rank)


def _assert_same_state(a: LoraState, b: LoraState):
    assert set(a.modules) == set(b.modules)
    for name, ma in a.modules.items():
        mb = b.modules[name]
        assert ma.down.shape == mb.down.shape and ma.up.shape == mb.up.shape, name
        assert torch.equal(ma.down, mb.down) and torch.equal(ma.up, mb.up), name
        # An absent alpha is written as the rank, which is the same scale; compare effective alphas.
        assert _eff_alpha(ma) == _eff_alpha(mb), name
    assert a.metadata == b.metadata
    assert set(a.extras) == set(b.extras)
    for k in a.extras:
        assert torch.equal(a.extras[k], b.extras[k]), k


@pytest.fixture
def mixed_state(make_state):
    st = make_state(rank=4, alpha=2.0, metadata={"ss_network_dim": "4", "modelspec.title": "t"})
    # Mixed alphas and ranks, so per-module alpha storage is exercised, including a None alpha.
    st.modules["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].alpha = 7.5
    st.modules["lora_unet_down_blocks_0_resnets_0_conv1"].alpha = None
    extra = make_state(rank=8, alpha=3.0, seed=5, modules=[("lora_unet_mid_block_attentions_0_proj_in", 40, 40, None)])
    st.modules.update(extra.modules)
    return st


def test_kohya_round_trip_through_file(tmp_path, mixed_state):
    mixed_state.extras["lora_unet_down_blocks_0_resnets_0_norm1.diff"] = torch.randn(320)
    path = tmp_path / "k.safetensors"
    safeio.write_safetensors(path, keys.to_kohya_dict(mixed_state), mixed_state.metadata)
    sd, meta = safeio.read_safetensors(path)
    assert keys.detect_format(sd) is KeyFormat.KOHYA
    back = keys.state_from_dict(sd, meta, source=str(path))
    _assert_same_state(mixed_state, back)
    assert back.source == str(path)


def test_kohya_alpha_is_never_replaced_by_rank(make_state):
    st = make_state(rank=4, alpha=1.0)
    sd = keys.to_kohya_dict(st)
    alphas = {k: float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert len(alphas) == len(st.modules) and set(alphas.values()) == {1.0}


@pytest.mark.parametrize("prefix_style", ["diffusers", "peft"])
def test_peft_round_trip_through_file(tmp_path, mixed_state, make_state, prefix_style):
    state = mixed_state
    if prefix_style == "peft":
        # The bare peft form holds one model: use the UNet modules only.
        state = LoraState({n: m for n, m in state.modules.items() if n.startswith("lora_unet")}, state.metadata)
    sd, meta = keys.to_peft_dict(state, prefix_style=prefix_style)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in sd)
    path = tmp_path / "p.safetensors"
    safeio.write_safetensors(path, sd, meta)
    sd2, meta2 = safeio.read_safetensors(path)
    assert keys.detect_format(sd2) is (KeyFormat.DIFFUSERS if prefix_style == "diffusers" else KeyFormat.PEFT)
    _assert_same_state(state, keys.state_from_dict(sd2, meta2))


def test_peft_keys_are_dotted_module_paths(make_state):
    sd, meta = keys.to_peft_dict(make_state(rank=4, alpha=8.0))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in sd
    assert "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in sd
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in sd
    cfg = json.loads(meta["lora_adapter_metadata"])
    # diffusers' own layout: per-component r / lora_alpha.
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 8 and cfg["text_encoder.lora_alpha"] == 8


def test_sdxl_te1_only_round_trips(make_state):
    st = make_state(rank=2, modules=[("lora_te1_text_model_encoder_layers_0_mlp_fc1", 8, 6, None)])
    sd, meta = keys.to_peft_dict(st)
    assert set(keys.state_from_dict(sd, meta).modules) == {"lora_te1_text_model_encoder_layers_0_mlp_fc1"}


def test_comfy_native_round_trip(tmp_path, make_state):
    st = make_state(
        rank=4,
        alpha=2.0,
        modules=[
            ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", 32, 32, None),
            ("lora_unet_middle_block_1_proj_in", 16, 16, None),
        ],
    )
    st.extras["lora_unet_input_blocks_1_1_norm.diff_b"] = torch.randn(32)
    sd = keys.to_comfy_native_dict(st)
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in sd
    assert "diffusion_model.input_blocks.1.1.norm.diff_b" in sd
    path = tmp_path / "c.safetensors"
    safeio.write_safetensors(path, sd, {})
    sd2, meta2 = safeio.read_safetensors(path)
    assert keys.detect_format(sd2) is KeyFormat.COMFY_NATIVE
    _assert_same_state(st, keys.state_from_dict(sd2, meta2, canonical=False))
    # Canonical names are the diffusers-style kohya ones, so a merge with a kohya file meets the same layer.
    canonical = keys.state_from_dict(sd2, meta2)
    assert sorted(canonical.modules) == [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_proj_in",
    ]
    assert list(canonical.extras) == ["lora_unet_down_blocks_0_attentions_0_norm.diff_b"]


def test_comfy_native_needs_mapping_for_diffusers_names(make_state):
    st = make_state(rank=2)
    with pytest.raises(ValueError, match="diffusers naming.*kohya_to_model_path"):
        keys.to_comfy_native_dict(st)
    mapping = {n: f"diffusion_model.m{i}.weight" for i, n in enumerate(st.modules)}
    sd = keys.to_comfy_native_dict(st, mapping)
    assert "diffusion_model.m0.lora_up.weight" in sd and "diffusion_model.m0.alpha" in sd


def test_core_train_lora_node_output_is_read_with_extras():
    # The shape core TrainLoraNode saves: model paths, lora_up/lora_down/alpha, diff for 1-D params.
    sd = {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight": torch.randn(8, 2),
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight": torch.randn(2, 8),
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(1.0),
        "diffusion_model.input_blocks.1.1.norm.diff": torch.randn(8),
        "diffusion_model.input_blocks.1.1.norm.diff_b": torch.randn(8),
    }
    st = keys.state_from_dict(sd, canonical=False)
    assert list(st.modules) == ["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"]
    assert st.modules["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"].alpha == 1.0
    assert sorted(st.extras) == ["lora_unet_input_blocks_1_1_norm.diff", "lora_unet_input_blocks_1_1_norm.diff_b"]
    st = keys.state_from_dict(sd)
    assert list(st.modules) == ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert sorted(st.extras) == [
        "lora_unet_down_blocks_0_attentions_0_norm.diff",
        "lora_unet_down_blocks_0_attentions_0_norm.diff_b",
    ]


# (key as a producer writes it, expected kohya module name). Each row is a key layout seen in the wild.
DOTTED_CASES = [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("down_blocks.1.attentions.0.proj_in.lora_A.weight", "lora_unet_down_blocks_1_attentions_0_proj_in"),
    ("base_model.model.mid_block.attentions.0.proj_out.lora_A.weight", "lora_unet_mid_block_attentions_0_proj_out"),
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight",
     "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"),
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight",
     "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"),
    ("unet.down_blocks.0.attentions.0.proj_in.lora.down.weight", "lora_unet_down_blocks_0_attentions_0_proj_in"),
    ("text_encoder.text_model.encoder.layers.3.self_attn.k_proj.lora_linear_layer.down.weight",
     "lora_te_text_model_encoder_layers_3_self_attn_k_proj"),
    # transformers 5 drops "text_model." from CLIPTextModel module names: the convention is restored.
    ("text_encoder.encoder.layers.3.self_attn.k_proj.lora_A.weight",
     "lora_te_text_model_encoder_layers_3_self_attn_k_proj"),
    ("lora_te_encoder_layers_3_self_attn_k_proj.lora_down.weight",
     "lora_te_text_model_encoder_layers_3_self_attn_k_proj"),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
     "lora_unet_single_transformer_blocks_0_attn_to_q"),
]  # fmt: skip


@pytest.mark.parametrize(("down_key", "expected"), DOTTED_CASES)
def test_key_layouts_map_to_kohya_names(down_key, expected):
    up_key = down_key.replace("lora_A", "lora_B").replace(".down.", ".up.").replace("lora_down", "lora_up")
    assert up_key != down_key
    st = keys.state_from_dict({down_key: torch.randn(2, 6), up_key: torch.randn(5, 2)})
    assert list(st.modules) == [expected]
    m = st.modules[expected]
    assert m.alpha is None and m.scale == 1.0, "no alpha anywhere means alpha = rank"


def test_sdxl_text_encoders_get_te1_te2():
    sd = {}
    for comp in ("text_encoder", "text_encoder_2"):
        sd[f"{comp}.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"] = torch.randn(2, 6)
        sd[f"{comp}.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"] = torch.randn(5, 2)
    names = set(keys.state_from_dict(sd).modules)
    assert names == {"lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"}


def _peft_sd(path="unet.down_blocks.0.attentions.0.proj_in", rank=4):
    return {f"{path}.lora_A.weight": torch.randn(rank, 6), f"{path}.lora_B.weight": torch.randn(5, rank)}


@pytest.mark.parametrize(
    ("adapter_meta", "expected"),
    [
        ({"unet.r": 4, "unet.lora_alpha": 16}, 16.0),
        ({"r": 4, "lora_alpha": 2}, 2.0),
        # peft's alpha_pattern matches a suffix of the module path.
        ({"unet.r": 4, "unet.lora_alpha": 16, "unet.alpha_pattern": {"proj_in": 3}}, 3.0),
        # rsLoRA scales by alpha/sqrt(r): stored as the alpha giving that scale under alpha/r.
        ({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True}, 16.0),
    ],
)
def test_peft_alpha_comes_from_diffusers_metadata(adapter_meta, expected):
    st = keys.state_from_dict(_peft_sd(), {"lora_adapter_metadata": json.dumps(adapter_meta), "x": "y"})
    (m,) = st.modules.values()
    assert m.alpha == expected
    assert st.metadata == {"x": "y"}, "lora_adapter_metadata is consumed; writers regenerate it"


@pytest.mark.parametrize(
    ("sd", "fmt", "label"),
    [
        ({"lora_unet_x.hada_w1_a": torch.zeros(1), "lora_unet_x.hada_w1_b": torch.zeros(1)},
         KeyFormat.LYCORIS_LOHA, "LoHa"),
        ({"lora_unet_x.lokr_w1": torch.zeros(1), "lora_unet_x.lokr_w2": torch.zeros(1)},
         KeyFormat.LYCORIS_LOKR, "LoKr"),
        ({"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 2),
          "lora_unet_x.dora_scale": torch.zeros(1, 2)}, KeyFormat.DORA, "DoRA"),
    ],
)  # fmt: skip
def test_unsupported_adapters_are_named(sd, fmt, label):
    assert keys.detect_format(sd) is fmt
    with pytest.raises(keys.UnsupportedLoraError) as exc:
        keys.state_from_dict(sd, source="odd.safetensors")
    msg = str(exc.value)
    assert label in msg and "odd.safetensors" in msg and "ComfyUI can still apply" in msg and "merge" in msg
    assert isinstance(exc.value, ValueError)


def test_checkpoint_is_not_a_lora():
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2), "first_stage_model.x": torch.zeros(1)}
    assert keys.detect_format(sd) is KeyFormat.UNKNOWN
    with pytest.raises(keys.NotALoraError, match=r"not a LoRA file: 'ckpt.safetensors'.*checkpoint"):
        keys.state_from_dict(sd, source="ckpt.safetensors")


def test_embedding_is_not_a_lora():
    with pytest.raises(keys.NotALoraError, match="not a LoRA file.*none of its keys"):
        keys.state_from_dict({"emb_params": torch.zeros(2, 768)}, source="emb.safetensors")


def test_mismatched_shapes_name_module_and_shapes():
    sd = {"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 3)}
    with pytest.raises(ValueError, match=r"'lora_unet_a'.*down \(4, 8\), up \(8, 3\)"):
        keys.state_from_dict(sd, source="f.safetensors")


def test_missing_up_factor_named():
    with pytest.raises(ValueError, match=r"'f.safetensors': module 'lora_unet_a' is incomplete"):
        keys.state_from_dict({"lora_unet_a.lora_down.weight": torch.zeros(4, 8)}, source="f.safetensors")


def test_unknown_keys_in_lora_are_reported():
    sd = {"lora_unet_a.lora_down.weight": torch.zeros(2, 3), "lora_unet_a.lora_up.weight": torch.zeros(3, 2),
          "weird.thing": torch.zeros(1)}  # fmt: skip
    with pytest.raises(ValueError, match="weird.thing"):
        keys.state_from_dict(sd)


@pytest.mark.parametrize(
    ("underscored", "dotted"),
    [
        ("down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
         "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("text_model_encoder_layers_11_mlp_fc2", "text_model.encoder.layers.11.mlp.fc2"),
        ("input_blocks_4_1_proj_in", "input_blocks.4.1.proj_in"),
        ("up_blocks_0_resnets_2_conv_shortcut", "up_blocks.0.resnets.2.conv_shortcut"),
        ("double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv"),
    ],
)  # fmt: skip
def test_split_module_path(underscored, dotted):
    assert keys.split_module_path(underscored) == dotted


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # transformers 5 CLIPTextModel (no text_model.), transformers 4, ComfyUI's and peft's prefixes.
        ("encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("clip_l.transformer.text_model.encoder.layers.3.mlp.fc1", "text_model.encoder.layers.3.mlp.fc1"),
        ("base_model.model.encoder.layers.3.mlp.fc1", "text_model.encoder.layers.3.mlp.fc1"),
        ("embeddings.token_embedding", "text_model.embeddings.token_embedding"),
        ("final_layer_norm", "text_model.final_layer_norm"),
        # The tail of a kohya name.
        ("encoder_layers_0_self_attn_q_proj", "text_model_encoder_layers_0_self_attn_q_proj"),
        ("text_model_encoder_layers_0_self_attn_q_proj", "text_model_encoder_layers_0_self_attn_q_proj"),
        # T5 is left alone.
        ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.q"),
    ],
)  # fmt: skip
def test_text_encoder_path_is_the_kohya_form(path, expected):
    assert keys.text_encoder_path(path) == expected


def test_kohya_name_puts_text_encoder_paths_in_kohya_form():
    assert keys.kohya_name("lora_te1", "encoder.layers.0.self_attn.q_proj") == (
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    )
    assert keys.kohya_name("lora_unet", "encoder.layers.0.proj") == "lora_unet_encoder_layers_0_proj"


def test_tucker_mid_round_trips_in_kohya(make_state):
    g = torch.Generator().manual_seed(1)
    m = LoraModule(down=torch.randn(3, 5, 1, 1, generator=g), up=torch.randn(7, 3, 1, 1, generator=g), alpha=2.0,
                   mid=torch.randn(3, 3, 3, 3, generator=g))  # fmt: skip
    st = LoraState({"lora_unet_down_blocks_0_resnets_0_conv1": m})
    back = keys.state_from_dict(keys.to_kohya_dict(st))
    assert torch.equal(back.modules["lora_unet_down_blocks_0_resnets_0_conv1"].mid, m.mid)
    with pytest.raises(ValueError, match="Tucker"):
        keys.to_peft_dict(st)
