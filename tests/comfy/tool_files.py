"""LoRA files for the tiny SD1.5-shaped model, written by the other tools themselves, with their expected deltas.

- diffusers: peft LoRA layers injected into a diffusers UNet of the tiny model's shape (320/640 channels, one res
  block per level, context 768) and a 768-wide CLIP text encoder, saved by ``StableDiffusionPipeline.
  save_lora_weights`` with the adapter metadata (alphas in the header, as diffusers' DreamBooth-LoRA script does);
- kohya from diffusers: that file through diffusers' own ``convert_state_dict_to_kohya`` (``lora_te1_`` text
  encoder keys without ``text_model``, as it writes for SD1 with transformers 5), saved with safetensors.

Each comes with its expected deltas, computed here independently of ``lora/``: ``(alpha / r) * B @ A`` per
module, keyed by the ComfyUI weight it must change (UNet paths through ComfyUI's own ``unet_to_diffusers``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_workbench.headless import comfy_compat
from lora_workbench.headless.tiny_model import UNET_CONFIG

UNET_RANK, UNET_ALPHA = 4, 8.0  # scale 2: an ignored header alpha (ComfyUI's alpha = rank) shows as half
TE_RANK, TE_ALPHA = 4, 2.0  # scale 0.5
TE_LAYERS = 2  # the LoRA covers the first two of CLIP-L's twelve layers
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
TE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def diffusers_unet_to_comfy() -> dict[str, str]:
    """diffusers UNet path (no ``.weight``) -> ComfyUI model key, from ComfyUI's own table for the tiny config."""
    import comfy.utils

    config = dict(UNET_CONFIG)
    config["num_res_blocks"] = list(config["num_res_blocks"])
    return {
        d[: -len(".weight")]: "diffusion_model." + ldm
        for d, ldm in comfy.utils.unet_to_diffusers(config).items()
        if d.endswith(".weight")
    }


def clip_key(te_path: str) -> str:
    """``encoder.layers.0.self_attn.q_proj`` -> ComfyUI's SD1 CLIP weight key."""
    return f"clip_l.transformer.text_model.{te_path}.weight"


def tiny_unet(seed: int = 0):
    """A diffusers UNet of the tiny SD1.5-shaped checkpoint's layout (random weights from ``seed``, no download)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def _peft_models(seed: int):
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = tiny_unet(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=64,
            hidden_size=768,
            intermediate_size=32,
            num_attention_heads=12,
            num_hidden_layers=TE_LAYERS,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # init_lora_weights=False: B is random too, so every delta is non-zero.
    unet_config = LoraConfig(
        r=UNET_RANK, lora_alpha=UNET_ALPHA, target_modules=list(PROJECTIONS), init_lora_weights=False
    )
    te_config = LoraConfig(
        r=TE_RANK, lora_alpha=TE_ALPHA, target_modules=list(TE_PROJECTIONS), init_lora_weights=False
    )
    unet.add_adapter(unet_config)
    inject_adapter_in_model(te_config, text_encoder)
    return unet, text_encoder, unet_config, te_config


def write_diffusers_file(folder: Path, name: str = "diffusers_sd1.safetensors", seed: int = 0) -> Path:
    """Write a diffusers ``save_lora_weights`` file for the tiny model; return its path."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet, text_encoder, unet_config, te_config = _peft_models(seed)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
        weight_name=name,
    )
    return folder / name


def write_kohya_from_diffusers(diffusers_path: Path, path: Path, metadata: dict | None = None) -> Path:
    """Write diffusers' own kohya conversion (``convert_state_dict_to_kohya``) of a diffusers file; return it."""
    from diffusers.utils import convert_state_dict_to_kohya

    save_file(convert_state_dict_to_kohya(load_file(str(diffusers_path))), str(path), metadata=metadata)
    return path


def expected_diffusers_deltas(path: Path) -> dict[str, torch.Tensor]:
    """ComfyUI weight key -> ``(alpha / r) * B @ A`` of a diffusers file, alphas from the configs used to write it."""
    unet_map = diffusers_unet_to_comfy()
    sd = load_file(str(path))
    out = {}
    for key in sd:
        if not key.endswith(".lora_A.weight"):
            continue
        mod = key[: -len(".lora_A.weight")]
        delta = sd[f"{mod}.lora_B.weight"].double() @ sd[key].double()
        component, _, path_ = mod.partition(".")
        if component == "unet":
            out[unet_map[path_]] = delta * (UNET_ALPHA / UNET_RANK)
        else:
            out[clip_key(path_)] = delta * (TE_ALPHA / TE_RANK)
    return out


def expected_kohya_deltas(path: Path, diffusers_path: Path) -> dict[str, torch.Tensor]:
    """ComfyUI weight key -> ``(alpha / r) * up @ down`` of a kohya file whose modules are a diffusers file's.

    The module paths come from the diffusers file (underscored kohya names are ambiguous by themselves); alpha
    and r from the kohya file's own tensors.
    """
    unet_map = diffusers_unet_to_comfy()
    by_name = {}
    for key in load_file(str(diffusers_path)):
        if key.endswith(".lora_A.weight"):
            component, _, path_ = key[: -len(".lora_A.weight")].partition(".")
            if component == "unet":
                by_name["lora_unet_" + path_.replace(".", "_")] = unet_map[path_]
            else:
                by_name["lora_te1_" + path_.replace(".", "_")] = clip_key(path_)
    sd = load_file(str(path))
    out = {}
    for name, target in by_name.items():
        down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
        out[target] = (float(sd[f"{name}.alpha"]) / down.shape[0]) * (up @ down)
    assert len(out) == len({k.split(".")[0] for k in sd}), "every module of the kohya file has an expected delta"
    return out


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def applied_deltas(patcher) -> dict[str, torch.Tensor]:
    """Weight key -> the total delta a ModelPatcher's patches add, in float64.

    ComfyUI's own ``calculate_weight`` applied to a zero weight: for LoRA-type patches (no DoRA) it adds exactly
    the delta, so the base weights, which an earlier sampling run may have left patched in memory, play no part.
    """
    import comfy.lora

    state = patcher.model.state_dict()
    out = {}
    for key, patches in patcher.patches.items():
        zero = torch.zeros(state[key].shape, dtype=torch.float32)
        out[key] = comfy.lora.calculate_weight(patches, zero, key, intermediate_dtype=torch.float32).double()
    return out


def compare(applied: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], strength: float = 1.0) -> float:
    """Return the largest relative difference (max |a - e| / max |e|) over the expected keys.

    Raises:
        AssertionError: when the applied keys are not exactly the expected ones.
    """
    assert set(applied) == set(expected), (
        f"applied {len(applied)} weights, expected {len(expected)}; missing {sorted(set(expected) - set(applied))[:3]}"
        f", extra {sorted(set(applied) - set(expected))[:3]}"
    )
    worst = 0.0
    for key, e in expected.items():
        e = e * strength
        worst = max(worst, float((applied[key].reshape(e.shape) - e).abs().max() / e.abs().max()))
    return worst


def core_train_lora(runtime, ckpt_name: str, steps: int = 1, rank: int = 4) -> dict[str, torch.Tensor]:
    """Return the LORA_MODEL of ComfyUI's own TrainLoraNode after ``steps`` steps on two random latents.

    Called directly as core's node class (not through a graph): 0.3.75's node fails on a single LATENT
    (``UnboundLocalError: multi_res``) and a graph hands it one; a list of two is what works.
    """
    nodes = runtime.nodes
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)[:2]
    with torch.inference_mode():
        latents = [{"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i))} for i in range(2)]
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks toy"))
        train = runtime.node_classes["TrainLoraNode"]
        inputs = dict(
            model=[model],
            latents=latents,
            positive=[cond, cond],
            batch_size=[1],
            grad_accumulation_steps=[1],
            steps=[steps],
            learning_rate=[1e-3],
            rank=[rank],
            optimizer=["AdamW"],
            loss_function=["MSE"],
            seed=[0],
            training_dtype=["fp32"],
            lora_dtype=["fp32"],
            algorithm=["LoRA"],
            gradient_checkpointing=[False],
            existing_lora=["[None]"],
        )
        # Inputs newer ComfyUI added (0.33: quantized_backward, checkpoint_depth, ...), at their defaults.
        inputs.update({k: [v] for k, v in comfy_compat.input_defaults(train).items() if k not in inputs})
        out = train.execute(**inputs)
    # 0.3.75 returns (MODEL, LORA_MODEL, ...), 0.33 (LORA_MODEL, ...): take it by its type.
    lora = (out.result if hasattr(out, "result") else out)[list(train.RETURN_TYPES).index("LORA_MODEL")]
    return {k: v.detach().clone().contiguous() for k, v in lora.items()}
