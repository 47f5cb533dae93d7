"""The Train node on every family: SD2 (v-prediction), SDXL (pooled and size conditioning, two CLIPs), Flux and
SD3 (flow matching), each a tiny model built with ComfyUI's own classes (``headless/tiny_families.py``).

Per family: the loss falls, measured by ComfyUI's own sampler on fixed noise and noise levels (one Euler step from
sigma to 0 returns the model's denoised prediction); the saved file loaded by core Load LoRA samples exactly
(``torch.equal``) as the Train node's MODEL, with no "lora key not loaded"; the graph's MODEL and CLIP are unchanged
afterwards (same module types, bit-identical weights); the file names the family in its metadata.
"""

from __future__ import annotations

import logging

import pytest
import torch
from graphs import build_tiny, run_train_node

from lora_workbench.headless import examples
from lora_workbench.lora.safeio import write_safetensors
from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder

pytestmark = pytest.mark.slow
PROMPT = "a photo of sks toy"
SIZE = 64
TRAIN = dict(
    steps=60, learning_rate=1e-2, target="all_linear", rank=4, alpha=4.0, batch_size=2, seed=0, checkpoint_every=0
)
# family -> (ss_base_model_version, text-encoder prefixes a text-encoder LoRA is written with)
EXPECTED = {
    "sd2v": ("sd_v2", {"lora_te"}),
    "sdxl": ("sdxl_base_v1-0", {"lora_te1", "lora_te2"}),
    "flux": ("flux1", {"lora_te1"}),
    "sd3": ("sd3", {"lora_te1", "lora_te2"}),
}


@pytest.fixture(scope="module")
def assets(comfy):
    examples.prepare_assets(comfy.base)
    return comfy


@pytest.fixture(scope="module")
def dataset(assets):
    options = DatasetOptions(trigger="sks", class_noun="toy", resolution=SIZE)
    return load_image_folder(assets.base / "input" / examples.DATASET_INPUT_NAME, options)


def _train(comfy, tiny, dataset, run_name, **settings):
    """Run the Train node with ``TRAIN`` and ``settings``; return MODEL, CLIP, adapter and summary."""
    return run_train_node(comfy, tiny, dataset, run_name, **{**TRAIN, **settings})


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _module_types(module) -> list[str]:
    return [type(m).__name__ for m in module.modules()]


def _denoised(model, clip, latents, sigma: float, seed: int) -> torch.Tensor:
    """Return ComfyUI's denoised prediction at ``sigma`` for fixed noise: one Euler step from sigma to 0."""
    import comfy.sample
    import comfy.samplers

    positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.tensor([sigma, 0.0])
    with torch.inference_mode():
        out = comfy.sample.sample_custom(
            model,
            noise,
            1.0,
            comfy.samplers.sampler_object("euler"),
            sigmas,
            positive,
            negative,
            latents,
            disable_pbar=True,
            seed=seed,
        )
    return out.float()


def _denoise_errors(model, clip, latents) -> list[float]:
    """Mean squared error of the denoised prediction against the images at three fixed noise levels (low, middle,
    high), each over the same two fixed noises."""
    return [
        sum(float(((_denoised(model, clip, latents, s, seed) - latents) ** 2).mean()) for seed in range(2)) / 2
        for s in (_sigma(model, f) for f in (0.25, 0.5, 0.75))
    ]


def _sigma(model, fraction: float) -> float:
    """Return a noise level ``fraction`` of the way up the model's schedule (flow: sigma itself; DDPM: step)."""
    import comfy.model_sampling

    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST):
        return fraction
    return float(sampling.sigmas[int(fraction * (len(sampling.sigmas) - 1))])


def _latents(tiny, dataset) -> torch.Tensor:
    pixels = torch.stack([e.full_pixels for e in dataset.examples[:4]])
    with torch.inference_mode():
        latents = tiny.vae.encode(pixels.movedim(1, -1))
    # ComfyUI's samplers take latents as the VAE gives them and apply process_in themselves.
    return latents.float()


@pytest.mark.parametrize("family", list(EXPECTED))
def test_every_family_trains_through_the_node(assets, dataset, family, caplog):
    tiny = build_tiny(family)
    unet_before, clip_before = _state(tiny.model.model), _state(tiny.clip.cond_stage_model)
    types_before = _module_types(tiny.model.model), _module_types(tiny.clip.cond_stage_model)

    model, clip, adapter, summary = _train(assets, tiny, dataset, f"family_{family}")
    assert summary.startswith(f"finished after {TRAIN['steps']}/{TRAIN['steps']} steps"), summary

    # The graph's MODEL and CLIP are as they were: no LoRA layer left, every weight bit-identical.
    assert (_module_types(tiny.model.model), _module_types(tiny.clip.cond_stage_model)) == types_before
    unet_after, clip_after = _state(tiny.model.model), _state(tiny.clip.cond_stage_model)
    assert unet_after.keys() == unet_before.keys() and clip_after.keys() == clip_before.keys()
    assert all(torch.equal(unet_after[k], unet_before[k]) for k in unet_before)
    assert all(torch.equal(clip_after[k], clip_before[k]) for k in clip_before)

    # The loss falls, measured by ComfyUI's sampler on the training images.
    latents = _latents(tiny, dataset)
    before, after = _denoise_errors(tiny.model, tiny.clip, latents), _denoise_errors(model, clip, latents)
    ratio = sum(a / b for a, b in zip(after, before)) / len(before)  # each level counts alike
    print(f"{family}: error ratio {ratio:.3f}")
    assert ratio < 0.92, (family, ratio, before, after)

    # The file, loaded by core Load LoRA, samples exactly as the Train node's MODEL; no key is left out.
    ss_version, _ = EXPECTED[family]
    assert adapter.metadata["ss_base_model_version"] == ss_version
    name = f"family_{family}.safetensors"
    write_safetensors(assets.base / "models" / "loras" / name, dict(adapter), adapter.metadata, overwrite=True)
    with caplog.at_level(logging.WARNING):
        with torch.inference_mode():
            core_model, core_clip = assets.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, name, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text
    sigma = _sigma(model, 0.5)
    assert torch.equal(_denoised(core_model, core_clip, latents, sigma, 7), _denoised(model, clip, latents, sigma, 7))


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_text_encoder_lora_of_each_family_in_the_names_core_loads(assets, dataset, family, caplog):
    tiny = build_tiny(family)
    _, clip, adapter, _ = _train(assets, tiny, dataset, f"te_{family}", steps=3, train_text_encoder=True)
    prefixes = {k.split("_text_model_")[0] for k in adapter if k.startswith("lora_te")}
    assert prefixes == EXPECTED[family][1], prefixes
    name = f"te_{family}.safetensors"
    write_safetensors(assets.base / "models" / "loras" / name, dict(adapter), adapter.metadata, overwrite=True)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        _, core_clip = assets.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, name, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text

    def encoded(c):
        with torch.inference_mode():
            out = c.encode_from_tokens(c.tokenize(PROMPT), return_dict=True)
        return out["cond"], out["pooled_output"]

    base, ours, core = encoded(tiny.clip), encoded(clip), encoded(core_clip)
    assert all(torch.equal(a, b) for a, b in zip(ours, core)), "the file and the in-graph CLIP agree"
    # (Flux's CLIP-L gives only the pooled vector; its cross-attention comes from T5.)
    assert not all(torch.equal(a, b) for a, b in zip(ours, base)), "the text-encoder LoRA changes the conditioning"


# family -> the block types recomputed with gradient checkpointing, and one whose calls are counted
BLOCKS = {
    "sdxl": ({"ResBlock", "SpatialTransformer", "Downsample", "Upsample"}, "ResBlock"),
    "flux": ({"DoubleStreamBlock", "SingleStreamBlock"}, "SingleStreamBlock"),
    "sd3": ({"JointBlock"}, "JointBlock"),
}


@pytest.mark.parametrize("family", list(BLOCKS))
def test_gradient_checkpointing_recomputes_every_block_type(assets, dataset, family, monkeypatch):
    from lora_workbench.nodes.comfy_backend import checkpoint_blocks

    kinds, counted = BLOCKS[family]
    tiny = build_tiny(family)
    blocks = checkpoint_blocks(tiny.model.model.diffusion_model)
    assert {type(b).__name__ for b in blocks} == kinds
    cls = next(type(b) for b in blocks if type(b).__name__ == counted)
    calls = []
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))

    def adapter_and_calls(run_name, **settings):
        calls.clear()
        _, _, adapter, _ = _train(assets, tiny, dataset, run_name, steps=2, **settings)
        return adapter, len(calls)

    checkpointed, recomputed = adapter_and_calls(f"gc_{family}", gradient_checkpointing=True)
    straight, plain = adapter_and_calls(f"straight_{family}")
    # Each block runs once more per step, in the backward pass.
    assert recomputed > plain > 0, (recomputed, plain)
    assert checkpointed.keys() == straight.keys()
    assert all(torch.allclose(checkpointed[k], straight[k], atol=1e-6) for k in straight)
