"""The loop on tiny diffusers models: the loss falls, prior preservation, trigger binding, checkpoints, resume,
cancel, NaN, and the base modules left as they were."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_workbench.trainer import inject, loop, objective
from lora_workbench.trainer.config import TrainConfig
from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder

pytestmark = pytest.mark.slow
TRIGGER_PROMPT, PLAIN_PROMPT = "a photo of sks toy", "a photo of toy"


@pytest.fixture
def dataset(subject_folder):
    return load_image_folder(subject_folder, DatasetOptions(trigger="sks", class_noun="toy", resolution=16))


def _config(**kw) -> TrainConfig:
    base = dict(steps=40, rank=4, learning_rate=3e-3, batch_size=2, seed=0, class_prompt=PLAIN_PROMPT,
                num_class_images=4)
    return TrainConfig(**{**base, **kw})


def _denoising_loss(api, pixels: torch.Tensor, prompt: str, seed: int = 123) -> float:
    """Mean denoising MSE on ``pixels`` with fixed noise and timesteps (4 draws per image)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = api.encode_images(pixels).repeat(4, 1, 1, 1)
        t = torch.randint(50, 950, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        cond = api.encode_prompts([prompt] * x0.shape[0])
        return float(objective.per_example_loss(api, x0, cond, gen, timesteps=t, noise=noise).mean())


def _pixels(dataset) -> torch.Tensor:
    return torch.stack([e.pixels for e in dataset.examples])


def _lora_tensors(api) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in inject.named_lora_tensors(api.unet).items()}


def _trained(api, dataset, config, **kw):
    """Train with the layers kept; return (result, LoRA tensors). The caller removes the layers."""
    result = loop.train(api, dataset, config, keep_layers=True, **kw)
    return result, _lora_tensors(api)


def _remove(api):
    inject.remove_adapter(api.unet)
    inject.remove_adapter(api.text_encoder)


def test_loss_falls_and_base_modules_are_restored(model_api, dataset, tmp_path):
    unet, te = model_api.unet, model_api.text_encoder
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    before_te = {k: v.clone() for k, v in te.state_dict().items()}
    modules_before = {n: id(m) for n, m in unet.named_modules()}
    pixels = _pixels(dataset)
    base_loss = _denoising_loss(model_api, pixels, TRIGGER_PROMPT)
    steps = []
    result, _ = _trained(model_api, dataset, _config(train_text_encoder=True, gradient_checkpointing=True),
                         callbacks=loop.TrainCallbacks(on_step=lambda s, n, loss: steps.append((s, n, loss))))
    try:
        trained_loss = _denoising_loss(model_api, pixels, TRIGGER_PROMPT)
    finally:
        _remove(model_api)
    # Measured: 1.19 -> about 1.00 (seed 0, 40 steps). 0.93x leaves room for platform noise yet fails
    # when the LoRA does not learn (an untrained LoRA gives exactly the base loss).
    assert trained_loss < 0.93 * base_loss, (base_loss, trained_loss)
    assert [s for s, _, _ in steps] == list(range(1, 41)) and steps[-1][1] == 40
    assert result.stopped_reason == "finished" and result.steps_done == 40 and len(result.losses) == 40
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in result.state.modules)
    # The user's modules: same layer objects, bit-identical weights, eval mode, checkpointing off, frozen.
    assert {n: id(m) for n, m in unet.named_modules()} == modules_before
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items()) and before.keys() == unet.state_dict().keys()
    assert all(torch.equal(before_te[k], v) for k, v in te.state_dict().items())
    assert not unet.training and not te.training and not unet.is_gradient_checkpointing
    assert not any(p.requires_grad for p in unet.parameters())
    assert _denoising_loss(model_api, pixels, TRIGGER_PROMPT) == base_loss


def _prediction(api, pixels: torch.Tensor, prompt: str, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = api.encode_images(pixels)
        t = torch.randint(100, 900, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        noisy = objective.noisy_latents(x0, noise, t, api.schedule.alphas_cumprod)
        return api.predict_noise(noisy, t, api.encode_prompts([prompt] * x0.shape[0]))


def test_measure_binding_and_prior(model_api, dataset, tmp_path):
    pixels = _pixels(dataset)
    class_pixels = objective.class_images(model_api, PLAIN_PROMPT, 4, 0, 16, tmp_path)
    base_class = _prediction(model_api, class_pixels, PLAIN_PROMPT)
    base_t, base_p = _prediction(model_api, pixels, TRIGGER_PROMPT), _prediction(model_api, pixels, PLAIN_PROMPT)
    lt0, lp0 = _denoising_loss(model_api, pixels, TRIGGER_PROMPT), _denoising_loss(model_api, pixels, PLAIN_PROMPT)
    for kw in [dict(), dict(prior_preservation=True), dict(train_text_encoder=True),
               dict(train_text_encoder=True, prior_preservation=True),
               dict(train_text_encoder=True, prior_preservation=True, steps=80)]:
        _trained(model_api, dataset, _config(**kw), cache_dir=tmp_path)
        try:
            drift = float((_prediction(model_api, class_pixels, PLAIN_PROMPT) - base_class).norm() / base_class.norm())
            et = float((_prediction(model_api, pixels, TRIGGER_PROMPT) - base_t).norm())
            ep = float((_prediction(model_api, pixels, PLAIN_PROMPT) - base_p).norm())
            lt, lp = _denoising_loss(model_api, pixels, TRIGGER_PROMPT), _denoising_loss(model_api, pixels, PLAIN_PROMPT)
        finally:
            _remove(model_api)
        print(kw, f"class drift {drift:.4f} effect t {et:.4f} p {ep:.4f} r {et/ep:.3f} loss t {lt0:.4f}->{lt:.4f} p {lp0:.4f}->{lp:.4f} gain ratio {(lt0-lt)/(lp0-lp):.3f}")
