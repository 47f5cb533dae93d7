"""Training a model that does not fit: ``offload`` loads what fits and ComfyUI keeps the rest in CPU memory.

These CPU machines have no VRAM to run out of, so the tests put ComfyUI in the state a small GPU leaves it in:
after each load, ComfyUI's own ``ModelPatcher.partially_unload`` moves half the denoiser's weights back to the
offload device and marks those layers to bring their weights over at each call (``comfy_cast_weights``), as its
low-VRAM loading does. What the tests show, on ComfyUI's tiny SDXL and Flux models:

- autograd keeps no weight of those layers for the backward pass (each is recomputed there), while without the
  recomputation it keeps one per layer: the term proportional to the model that offloading must not have;
- the gradients and the trained LoRA are the same as with the whole model loaded.
"""

from __future__ import annotations

import pytest
import torch
from graphs import build_tiny, run_train_node

from lora_workbench.headless import examples
from lora_workbench.trainer import inject
from lora_workbench.trainer.config import TrainConfig
from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder

pytestmark = pytest.mark.slow
SIZE = 32
TRAIN = dict(steps=4, learning_rate=1e-2, target="all_linear", rank=4, batch_size=2, seed=0, checkpoint_every=0)


@pytest.fixture(scope="module")
def dataset(comfy):
    examples.prepare_assets(comfy.base)
    options = DatasetOptions(trigger="sks", class_noun="toy", resolution=SIZE)
    return load_image_folder(comfy.base / "input" / examples.DATASET_INPUT_NAME, options)


@pytest.fixture
def small_gpu(comfy, monkeypatch):
    """ComfyUI as on a GPU with room for half the denoiser: every load that is not forced to be full is followed
    by ComfyUI's own partial unloading of half the model's weights."""
    import comfy.model_base
    import comfy.model_management

    load = comfy.model_management.load_models_gpu

    def load_half(models, *args, **kwargs):
        load(models, *args, **kwargs)
        if kwargs.get("force_full_load"):
            return
        for patcher in models:
            if isinstance(patcher.model, comfy.model_base.BaseModel):
                patcher.partially_unload(patcher.offload_device, memory_to_free=patcher.model_size() // 2)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", load_half)


def _cast_layers(module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if getattr(m, "comfy_cast_weights", False)]


def _one_step(api, cast, latents, recompute: bool):
    """Return the LoRA gradients of one loss and the base weights of cast layers autograd kept for the backward."""
    from lora_workbench.nodes.comfy_backend import restore_forward

    if not recompute:
        restore_forward(api._recomputed)
    cast_ids = {id(m) for m in cast}
    weights = {
        m.weight.untyped_storage().data_ptr(): name
        for name, m in api.unet.named_modules()
        if id(m) in cast_ids and getattr(m, "weight", None) is not None
    }
    kept = set()

    def pack(t):
        if t.untyped_storage().data_ptr() in weights:
            kept.add(weights[t.untyped_storage().data_ptr()])
        return t

    params = inject.lora_parameters(api.unet)
    for p in params:
        p.grad = None
    cond = api.encode_prompts(["a photo of sks toy"] * len(latents))
    timesteps = torch.tensor([0.3, 0.7]) if api.schedule.prediction_type == "flow" else torch.tensor([300, 700])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = api.predict_noise(latents, timesteps, cond)
    (out.float() ** 2).mean().backward()
    return [p.grad.clone() for p in params], kept


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_offloaded_layers_leave_no_weight_to_autograd(comfy, small_gpu, family):
    from lora_workbench.nodes.comfy_backend import ComfyModelApi

    tiny = build_tiny(family)
    with torch.inference_mode(False), torch.enable_grad():
        api = ComfyModelApi(tiny.model, tiny.clip, tiny.vae, offload=True)
        latents = torch.randn(2, tiny.model.model.latent_format.latent_channels, 4, 4)
        api.prepare_for_training(2)
        cast = _cast_layers(api.unet)
        assert len(cast) >= 4, "ComfyUI left some layers in CPU memory"
        assert len(api._recomputed) == len(cast) and api.notes, api.notes
        config = TrainConfig(**TRAIN)
        torch.manual_seed(0)
        inject.inject_lora(api.unet, config.targets_for(api.architecture), 4, 4.0)
        try:
            grads_recomputed, kept_recomputed = _one_step(api, cast, latents, recompute=True)
            grads_kept, kept = _one_step(api, cast, latents, recompute=False)
        finally:
            inject.remove_adapter(api.unet)
            api.end_training()
    print(f"{family}: {len(cast)} cast layers; autograd kept {len(kept)} of their weights without recomputation")
    assert kept_recomputed == set()
    assert len(kept) >= 4, "the check can fail: without recomputation autograd keeps weights (where grads pass)"
    assert all(torch.equal(a, b) for a, b in zip(grads_recomputed, grads_kept))
    assert any(g.abs().sum() > 0 for g in grads_recomputed)


def _train(comfy, tiny, dataset, run_name, **settings):
    _model, _clip, adapter, summary = run_train_node(comfy, tiny, dataset, run_name, **{**TRAIN, **settings})
    return adapter, summary


def test_offloaded_training_gives_the_same_lora(comfy, dataset, monkeypatch, request):
    full, full_summary = _train(comfy, build_tiny("sdxl"), dataset, "offload_full")
    assert "recomputed in the backward pass" not in full_summary

    request.getfixturevalue("small_gpu")
    offloaded, summary = _train(comfy, build_tiny("sdxl"), dataset, "offload_half", offload=True)
    assert "recomputed in the backward pass" in summary, summary
    assert full.keys() == offloaded.keys()
    differ = [k for k in full if not torch.allclose(full[k], offloaded[k], rtol=1e-5, atol=1e-7)]
    assert not differ, differ[:5]
    assert any(k.endswith("lora_up.weight") and full[k].abs().sum() > 0 for k in full), "the LoRA trained"
