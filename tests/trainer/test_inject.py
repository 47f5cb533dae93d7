"""peft injection: only LoRA trains, rank limits, kohya export names and alpha, and the base module restored."""

from __future__ import annotations

import pytest
import torch

from lora_workbench.trainer import inject
from lora_workbench.trainer.config import TrainConfig
from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder
from lora_workbench.trainer.loop import train


def _snapshot(module: torch.nn.Module):
    return (
        {k: v.clone() for k, v in module.state_dict().items()},
        {n: (type(m), id(m)) for n, m in module.named_modules()},
        {n: p.requires_grad for n, p in module.named_parameters()},
        set(vars(module)),
    )


def test_rank_above_a_layer_size_names_the_layer(tiny_parts):
    unet = tiny_parts[0]
    before = _snapshot(unet)
    # The first attention block works on 32 channels: rank 33 cannot be low-rank there.
    with pytest.raises(ValueError, match=r"rank 33 is above the size of layer 'down_blocks\.0\..*to_q' \(\(32, 32\)"):
        inject.inject_lora(unet, ["to_q"], rank=33, alpha=33)
    after = _snapshot(unet)
    assert before[1] == after[1] and before[2] == after[2], "a refused injection must not touch the module"


def test_export_names_alpha_and_removal_restore_the_module(tiny_parts):
    unet, text_encoder = tiny_parts[0], tiny_parts[1]
    text_encoder.embeddings.requires_grad_(True)  # a caller's own flag must come back as it was
    try:
        before_u, before_t = _snapshot(unet), _snapshot(text_encoder)
        torch.manual_seed(0)
        names = inject.inject_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=2.0)
        inject.inject_lora(text_encoder, ["q_proj", "out_proj"], rank=2, alpha=3.0)
        assert all(p.requires_grad == ("lora_" in n) for n, p in unet.named_parameters())
        with torch.no_grad():
            for p in inject.lora_parameters(unet):
                p.add_(0.1)
        state = inject.export_state(unet, "lora_unet")
        te_state = inject.export_state(text_encoder, "lora_te")
        mapped = inject.export_state(unet, "lora_unet", {names[0]: "renamed.block"})
    finally:
        inject.remove_adapter(unet)
        inject.remove_adapter(text_encoder)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    # 4 transformer blocks (down, mid, 2 up) x 2 attentions x 4 projections
    assert key in state.modules and len(state.modules) == len(names) == 32
    m = state.modules[key]
    assert m.alpha == 2.0 and m.rank == 4, "alpha comes from the config (2), never from the rank (4)"
    assert m.down.shape == (4, 32) and m.up.shape == (32, 4)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in state.modules
    # transformers 5 dropped `text_model.` from module paths; kohya/A1111 names keep it.
    assert set(te_state.modules) == {
        f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(2) for p in ("q_proj", "out_proj")
    }
    assert {m.alpha for m in te_state.modules.values()} == {3.0}
    assert "lora_unet_renamed_block" in mapped.modules

    for before, module in ((before_u, unet), (before_t, text_encoder)):
        after = _snapshot(module)
        assert before[0].keys() == after[0].keys()
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]), "base weights must be untouched"
        assert before[1] == after[1], "the original layer objects must be back in place"
        assert before[2] == after[2], "requires_grad flags must be restored"
        assert before[3] == after[3], "no attribute (peft_config, ...) may be left behind"
    text_encoder.embeddings.requires_grad_(False)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_train_leaves_the_modules_bit_identical(model_api, subject_folder, train_text_encoder):
    unet, te = model_api.unet, model_api.text_encoder
    before_u, before_t = _snapshot(unet), _snapshot(te)
    ds = load_image_folder(subject_folder, DatasetOptions(resolution=16))
    config = TrainConfig(
        steps=3, rank=4, alpha=2.0, te_alpha=1.5, learning_rate=1e-2, train_text_encoder=train_text_encoder
    )
    result = train(model_api, ds, config)
    for before, module in ((before_u, unet), (before_t, te)):
        after = _snapshot(module)
        assert before[0].keys() == after[0].keys(), "no peft parameter may be left in the state_dict"
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]), "base weights must be bit-identical"
        assert before[1] == after[1] and before[2] == after[2] and before[3] == after[3]
        assert not hasattr(module, "peft_config") and not inject.lora_layers(module)
    up = result.state.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].up
    assert up.abs().sum() > 0, "3 steps at lr 1e-2 must move lora_B off its zero start (else nothing trained)"
    assert {m.alpha for k, m in result.state.modules.items() if k.startswith("lora_unet_")} == {2.0}
    te_keys = {k for k in result.state.modules if k.startswith("lora_te_")}
    if train_text_encoder:
        assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj" in te_keys and len(te_keys) == 2 * 4
        assert {result.state.modules[k].alpha for k in te_keys} == {1.5}, "te_alpha from the config, not the rank"
    else:
        assert not te_keys
