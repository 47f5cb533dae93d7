"""Our kohya files in diffusers, and diffusers' peft files in ours, on a tiny UNet built from a config.

No ComfyUI here: diffusers' own kohya converter (``lora_state_dict``) and peft loader
(``load_lora_into_unet``) against ``LoraModule.delta()`` applied to the weights by hand; and diffusers'
own save helper (``save_lora_weights``) read back by ``lora.keys.state_from_dict``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_workbench.lora import keys as lora_keys
from lora_workbench.lora.state import LoraModule, LoraState

diffusers = pytest.importorskip("diffusers")  # a declared dependency (requirements.txt); present in the venv
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)


def attention_linears(model) -> dict[str, torch.nn.Linear]:
    """Every attention projection of the UNet by its dotted path."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".attn" in name and name.endswith(PROJECTIONS)
    }


def forward(model, inputs) -> torch.Tensor:
    x, t, ctx = inputs
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=ctx).sample


def random_state(unet, alphas) -> LoraState:
    """Random rank-4 factors for every attention projection; module i gets ``alphas[i % len(alphas)]``."""
    g = torch.Generator().manual_seed(2)
    modules = {}
    for i, (path, lin) in enumerate(sorted(attention_linears(unet).items())):
        down = torch.randn(4, lin.in_features, generator=g) / lin.in_features**0.5
        up = torch.randn(lin.out_features, 4, generator=g) * 0.3
        modules[lora_keys.kohya_name("lora_unet", path)] = LoraModule(down=down, up=up, alpha=alphas[i % len(alphas)])
    return LoraState(modules=modules)


ALPHAS = [
    pytest.param((2.0,), id="one_alpha"),  # alpha 2 at rank 4: scale 0.5, so an ignored alpha shows
    pytest.param(
        (2.0, 4.0, 8.0),
        id="per_module_alphas",
        marks=pytest.mark.xfail(
            strict=True,
            reason="diffusers 0.42.1 turns a kohya file's per-module alphas into alpha_pattern keys in its old "
            "'...processor.to_q_lora.down.weight' naming, which match no module (peft warns 'alpha_pattern keys did "
            "not match'), so every module gets the most common alpha. ComfyUI and A1111 read per-module alphas. "
            "Strict: this fails the day diffusers fixes it.",
        ),
    ),
]


@pytest.mark.parametrize("alphas", ALPHAS)
def test_our_kohya_file_in_diffusers_changes_the_unet_as_we_do(unet, inputs, tmp_path, alphas):
    state = random_state(unet, alphas)
    # Transformer blocks: down 2 x 1 layer, mid 1, up 2 x 2 layers = 7; x (attn1, attn2) x q/k/v/out.
    assert len(state) == 7 * 2 * 4
    path = tmp_path / "ours_kohya.safetensors"
    save_file(lora_keys.to_kohya_dict(state), str(path))

    ours = copy.deepcopy(unet)
    linears = attention_linears(ours)
    for path_, lin in linears.items():
        lin.weight.data += state.modules[lora_keys.kohya_name("lora_unet", path_)].delta()

    theirs = copy.deepcopy(unet)
    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, theirs, adapter_name="ours")
    lora_layers = [m for m in theirs.modules() if hasattr(m, "lora_A") and "ours" in m.lora_A]
    assert len(lora_layers) == len(state), "diffusers injected a LoRA layer for every module of the file"

    base, out_ours, out_theirs = forward(unet, inputs), forward(ours, inputs), forward(theirs, inputs)
    change = (out_ours - base).abs().max()
    assert change > 1e-2, f"the LoRA barely changes the output ({change}); the comparison would prove nothing"
    # diffusers computes x @ W^T + scale * (x @ A^T) @ B^T, we compute x @ (W + scale * B @ A)^T: equal in exact
    # arithmetic, different float32 rounding. Measured max difference ~1e-6 on outputs of size ~1; 1e-4 is the
    # bound, still 100x below the LoRA's effect, so a wrong alpha or a missed module fails it.
    assert torch.allclose(out_ours, out_theirs, rtol=0, atol=1e-4), (out_ours - out_theirs).abs().max()

    # Fused, peft adds (B @ A) * (alpha / r) to the weight: exactly our delta's computation.
    theirs.fuse_lora(lora_scale=1.0, adapter_names=["ours"])
    for path_, lin in linears.items():
        fused = theirs.get_submodule(path_)
        fused_weight = fused.base_layer.weight if hasattr(fused, "base_layer") else fused.weight
        assert torch.equal(fused_weight, lin.weight), path_


def test_diffusers_peft_file_read_by_us_gives_peft_deltas(unet, tmp_path):
    model = copy.deepcopy(unet)
    config = LoraConfig(
        r=4,
        lora_alpha=8,  # scale 2, not 1: an ignored alpha shows
        target_modules=list(PROJECTIONS),
        init_lora_weights=False,  # random B: the deltas are not zero
        rank_pattern={"attn2.to_k": 2},
        alpha_pattern={"attn2.to_v": 2},
    )
    torch.manual_seed(3)
    model.add_adapter(config, adapter_name="default")
    peft_sd = get_peft_model_state_dict(model, adapter_name="default")
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=peft_sd,
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        weight_name="peft.safetensors",
    )
    path = tmp_path / "peft.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
    assert any(k.startswith("unet.") and ".lora_A." in k for k in tensors), sorted(tensors)[:3]
    assert "unet.lora_alpha" in json.loads(metadata[lora_keys.LORA_ADAPTER_METADATA_KEY])

    state = lora_keys.state_from_dict(tensors, metadata, source="peft.safetensors")
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(state) == len(layers) == 7 * 2 * 4
    scales = set()
    for path_, layer in layers.items():
        module = state.modules[lora_keys.kohya_name("lora_unet", path_)]
        scales.add(module.scale)
        assert module.scale == layer.scaling["default"], path_
        # Same factors, same (B @ A) * (alpha / r) in float32: bit-for-bit.
        assert torch.equal(module.delta(), layer.get_delta_weight("default")), path_
    # lora_alpha 8 / r 4, alpha_pattern attn2.to_v 2 / 4, rank_pattern attn2.to_k: 8 / 2.
    assert scales == {2.0, 0.5, 4.0}
