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
from lora_workbench.trainer.diffusers_backend import DiffusersModelApi

pytestmark = pytest.mark.slow
TRIGGER_PROMPT, PLAIN_PROMPT = "a photo of sks toy", "a photo of toy"


@pytest.fixture
def dataset(subject_folder):
    return load_image_folder(subject_folder, DatasetOptions(trigger="sks", class_noun="toy", resolution=16))


def _config(**kw) -> TrainConfig:
    base = dict(
        steps=40, rank=4, learning_rate=3e-3, batch_size=2, seed=0, class_prompt=PLAIN_PROMPT, num_class_images=4
    )
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
    result, _ = _trained(
        model_api,
        dataset,
        _config(train_text_encoder=True, gradient_checkpointing=True),
        callbacks=loop.TrainCallbacks(on_step=lambda s, n, loss: steps.append((s, n, loss))),
    )
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
    assert (
        all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
        and before.keys() == unet.state_dict().keys()
    )
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


def _drift_and_effects(api, pretrained, trigger="sks", **kw):
    """Train on the pretrained model; return (class drift, trigger effect, plain effect, result)."""
    _, subject, class_dir = pretrained
    dataset = load_image_folder(subject, DatasetOptions(trigger=trigger, class_noun="toy", resolution=16))
    spix = _pixels(dataset)
    cpix = _pixels(load_image_folder(class_dir, DatasetOptions(resolution=16)))
    base_class = _prediction(api, cpix, PLAIN_PROMPT)
    base_t, base_p = _prediction(api, spix, TRIGGER_PROMPT), _prediction(api, spix, PLAIN_PROMPT)
    result, _ = _trained(api, dataset, _config(class_images_dir=str(class_dir), num_class_images=6, **kw))
    try:
        drift = float((_prediction(api, cpix, PLAIN_PROMPT) - base_class).norm() / base_class.norm())
        trig = float((_prediction(api, spix, TRIGGER_PROMPT) - base_t).norm())
        plain = float((_prediction(api, spix, PLAIN_PROMPT) - base_p).norm())
    finally:
        _remove(api)
    return drift, trig, plain, result


def test_prior_preservation_keeps_class_predictions_near_the_base(pretrained):
    api = DiffusersModelApi(*pretrained[0])
    without, _, _, _ = _drift_and_effects(api, pretrained)
    with_prior, _, _, result = _drift_and_effects(api, pretrained, prior_preservation=True)
    # Measured (seed 0, 40 steps): relative drift of "a photo of toy" on class images 0.185 without, 0.125 with
    # prior preservation. 0.8x is well inside that gap and still fails if the prior term were not applied.
    assert with_prior < 0.8 * without, (with_prior, without)
    assert result.steps_done == 40


def test_trigger_binding(pretrained):
    # The LoRA's effect on subject predictions with "sks" in the prompt over its effect without, trained with the
    # trigger in the captions (binding) and without it (the control: nothing to bind), over 4 seeds each.
    # Measured (40 steps, text-encoder LoRA at lr 1e-2, prior preservation): binding 1.415, 1.101, 1.180, 1.195
    # (mean 1.223, sd 0.135); control 0.975, 0.981, 0.974, 0.952 (mean 0.971, sd 0.013). The gap of the means,
    # 0.25, is 3.7 times the binding mean's spread (0.135 / sqrt(4)) and 19 times the control's; the threshold
    # 0.12 is half the gap.
    api = DiffusersModelApi(*pretrained[0])
    means = {}
    for trigger in ("sks", ""):
        ratios = []
        for seed in range(4):
            _, trig, plain, _ = _drift_and_effects(
                api,
                pretrained,
                trigger=trigger,
                seed=seed,
                prior_preservation=True,
                train_text_encoder=True,
                te_learning_rate=1e-2,
            )
            ratios.append(trig / plain)
        means[trigger or "control"] = sum(ratios) / len(ratios)
    assert means["sks"] > means["control"] + 0.12, means


class _NanAfter:
    """A model interface that returns NaN from the ``n``-th prediction on (forced numerical failure)."""

    def __init__(self, api, n: int):
        self.api, self.n, self.calls = api, n, 0

    def __getattr__(self, name):
        return getattr(self.api, name)

    def predict_noise(self, noisy, t, cond):
        self.calls += 1
        out = self.api.predict_noise(noisy, t, cond)
        return out * float("nan") if self.calls >= self.n else out


def test_resume_continues_exactly(model_api, dataset, tmp_path):
    # Warmup + cosine, accumulation, dropout and a text-encoder LoRA: every piece of state a resume must restore.
    config = _config(
        steps=20,
        lr_scheduler="cosine",
        warmup_steps=3,
        grad_accumulation=2,
        dropout=0.1,
        train_text_encoder=True,
        checkpoint_every=5,
    )
    straight, straight_tensors = _trained(model_api, dataset, config, checkpoint_dir=tmp_path / "a")
    _remove(model_api)

    stop_at_10 = loop.TrainCallbacks(should_stop=lambda: len(seen) >= 10, on_step=lambda s, n, loss: seen.append(s))
    seen: list[int] = []
    first = loop.train(model_api, dataset, config, stop_at_10, checkpoint_dir=tmp_path / "b")
    assert first.stopped_reason == "cancelled" and first.steps_done == 10
    second, resumed_tensors = _trained(model_api, dataset, config, checkpoint_dir=tmp_path / "b")
    _remove(model_api)
    assert second.resumed_from == 10 and second.steps_done == 20
    # Same ops in the same order on the same CPU: the resumed run must be bit-identical, not merely close.
    assert straight_tensors.keys() == resumed_tensors.keys()
    assert all(torch.equal(straight_tensors[k], resumed_tensors[k]) for k in straight_tensors)
    assert second.losses == straight.losses
    assert all(torch.equal(a.up, b.up) for a, b in zip(straight.state.modules.values(), second.state.modules.values()))


def test_cancel_by_exception_leaves_a_loadable_checkpoint(model_api, dataset, tmp_path):
    tmp_path = tmp_path / "run"
    checkpoints = []

    def cancel():
        if len(steps) == 3:
            raise InterruptedError("Processing interrupted")
        return False

    steps: list[int] = []
    callbacks = loop.TrainCallbacks(
        on_step=lambda s, n, loss: steps.append(s), should_stop=cancel, on_checkpoint=checkpoints.append
    )
    with pytest.raises(InterruptedError):
        loop.train(model_api, dataset, _config(steps=50, checkpoint_every=2), callbacks, checkpoint_dir=tmp_path)
    index = json.loads((tmp_path / "checkpoint.json").read_text())
    assert index["step"] == 3 and checkpoints[-1] == tmp_path / "checkpoint.json"
    tensors = load_file(tmp_path / index["tensors"])  # safetensors + JSON only: nothing to unpickle
    assert any(k.startswith("unet.") and k.endswith(".lora_B") for k in tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", index["tensors"]], "old files removed"
    assert not any(isinstance(m, inject.LoraLayer) for m in model_api.unet.modules()), "layers removed on error"

    resumed = loop.train(model_api, dataset, _config(steps=5), checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 3 and resumed.steps_done == 5 and len(resumed.losses) == 5


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(model_api, dataset, tmp_path):
    tmp_path = tmp_path / "run"
    before = {k: v.clone() for k, v in model_api.unet.state_dict().items()}
    broken = _NanAfter(model_api, n=5)  # one prediction per step: steps 1-4 are fine, step 5 is NaN
    with pytest.raises(loop.NonFiniteLossError, match=r"loss became nan at step 5 of 10") as e:
        loop.train(broken, dataset, _config(steps=10, checkpoint_every=2), checkpoint_dir=tmp_path)
    assert "last good checkpoint (step 4)" in str(e.value) and str(tmp_path) in str(e.value)
    index = json.loads((tmp_path / "checkpoint.json").read_text())
    tensors = load_file(tmp_path / index["tensors"])
    assert index["step"] == 4 and all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("unet."))
    assert all(torch.equal(before[k], v) for k, v in model_api.unet.state_dict().items())


def test_class_images_are_generated_once_and_cached(model_api, tmp_path):
    calls = []
    generate = model_api.generate
    model_api.generate = lambda *a, **k: calls.append(a) or generate(*a, **k)
    first = objective.class_images(model_api, PLAIN_PROMPT, 3, 5, 16, tmp_path)
    again = objective.class_images(model_api, PLAIN_PROMPT, 3, 5, 16, tmp_path)
    other = objective.class_images(model_api, PLAIN_PROMPT, 3, 6, 16, tmp_path)
    assert len(calls) == 2, "the second call with the same prompt/seed/size/model reuses the cache"
    assert first.shape == (3, 3, 16, 16) and torch.equal(first, again) and not torch.equal(first, other)
    assert 0 <= first.min() and first.max() <= 1


def test_objective_targets_and_weights():
    alphas = torch.linspace(0.99, 0.01, 1000)
    x0, noise, t = torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 2.0), torch.tensor([0, 999])
    v = objective.target_for("v_prediction", x0, noise, t, alphas)
    a = alphas[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * 2 - (1 - a).sqrt())
    assert torch.equal(objective.target_for("epsilon", x0, noise, t, alphas), noise)
    w = objective.min_snr_weights(t, alphas, 5.0, "epsilon")
    snr = alphas[t] / (1 - alphas[t])
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    total, inst, prior = objective.dreambooth_loss(torch.tensor([1.0, 3.0, 10.0, 20.0]), 2, 0.5)
    assert (float(inst), float(prior), float(total)) == (2.0, 15.0, 9.5)
    with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
        objective.target_for("sample", x0, noise, t, alphas)


def test_buckets_with_prior_preservation_and_precision_fallback(model_api, tmp_path, draw, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    draw(0, 32).resize((64, 32)).save(folder / "wide.png")
    draw(1, 32).save(folder / "square.png")
    dataset = load_image_folder(folder, DatasetOptions(resolution=32, buckets=True))
    assert {tuple(e.pixels.shape[1:]) for e in dataset.examples} == {(16, 32), (32, 32)}, (
        "2:1 and 1:1 buckets within 32^2 pixels"
    )
    # Class images (square, generated) are fitted to each bucket so they share the instance forward pass.
    # fp16 autocast needs CUDA: on the CPU the run falls back to fp32 and says so.
    with caplog.at_level("WARNING"):
        result = loop.train(
            model_api,
            dataset,
            _config(steps=4, prior_preservation=True, num_class_images=2, precision="fp16"),
            cache_dir=tmp_path,
        )
    assert result.steps_done == 4 and all(map(torch.isfinite, torch.tensor(result.losses)))
    assert "precision fp16 needs a CUDA device" in caplog.text
    bf16 = loop.train(model_api, dataset, _config(steps=2, precision="bf16"))  # CPU autocast supports bf16
    assert all(map(torch.isfinite, torch.tensor(bf16.losses)))


def test_gradient_checkpointing_without_a_switch_is_patched_and_undone(tiny_parts):
    # ComfyUI's ldm UNet has no enable_gradient_checkpointing(): the loop wraps each BasicTransformerBlock.
    class Wrapper(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.inner = unet

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs).sample

    unet = tiny_parts[0]
    wrapper = Wrapper(unet)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 16, 32)
    reference = wrapper(x, t, cond)
    undo = loop._enable_gradient_checkpointing(wrapper)
    try:
        blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
        assert blocks and all("forward" in m.__dict__ for m in blocks)
        assert torch.equal(wrapper(x, t, cond), reference), "recomputation must not change the forward result"
    finally:
        undo()
    assert not any("forward" in m.__dict__ for m in unet.modules()), "the patch is removed again"
