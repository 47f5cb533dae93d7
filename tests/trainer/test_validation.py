"""Held-out validation loss (trainer/validation.py and its hook in the loop) on the tiny diffusers models."""

from __future__ import annotations

import random

import pytest
import torch

from lora_workbench.trainer import inject, loop, objective, validation
from lora_workbench.trainer.config import TrainConfig
from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder
from lora_workbench.trainer.diffusers_backend import DiffusersModelApi

pytestmark = pytest.mark.slow


@pytest.fixture
def dataset(subject_folder):
    return load_image_folder(subject_folder, DatasetOptions(trigger="sks", class_noun="toy", resolution=16))


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=12, rank=4, learning_rate=3e-3, batch_size=2, seed=0), **kw})


def _lora(api) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in inject.named_lora_tensors(api.unet).items()}


def _train(api, dataset, config, **kw):
    """Train with the layers kept; return (result, LoRA tensors) and remove the layers."""
    try:
        result = loop.train(api, dataset, config, keep_layers=True, **kw)
        return result, _lora(api)
    finally:
        inject.remove_adapter(api.unet)
        inject.remove_adapter(api.text_encoder)


def test_the_split_holds_out_the_same_files_whatever_the_order_and_keeps_one(dataset):
    train, held = validation.split(dataset, 2)
    assert len(held) == 2 and len(train.examples) == len(dataset.examples) - 2
    assert not {e.name for e in held} & {e.name for e in train.examples}
    reversed_set = type(dataset)(dataset.folder, dataset.examples[::-1], options=dataset.options)
    assert sorted(e.name for e in validation.split(reversed_set, 2)[1]) == sorted(e.name for e in held)
    assert validation.split(dataset, 0) == (dataset, [])
    # None held out: a few training images, chosen by name as the held-out ones are (the first of them).
    evaluated = validation.evaluation_set(dataset, [])
    assert len(evaluated) == validation.TRAINING_IMAGES_EVALUATED and evaluated[:2] == validation.chosen(held, 2)
    assert validation.evaluation_set(train, held) == held
    with pytest.raises(ValueError, match="no image would be left"):
        validation.ValidationConfig(hold_out=6).validate(6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_step_0_equals_a_direct_computation_and_evaluation_is_deterministic(tiny_parts, dataset, prediction):
    from diffusers import DDPMScheduler

    unet, te, tokenizer, vae, _ = tiny_parts
    model_api = DiffusersModelApi(unet, te, tokenizer, vae, DDPMScheduler(prediction_type=prediction))
    settings = validation.ValidationConfig(every=4, hold_out=2, draws=3, seed=5)
    _, held = validation.split(dataset, 2)
    # Directly: the DDPM forward process and the epsilon target, through the UNet itself (the LoRA starts at zero,
    # B = 0, so before training the model is the base).
    a_all = model_api.schedule.alphas_cumprod
    direct = []
    with torch.no_grad():
        for e in held:
            gen = validation._generator(5, e.name)
            t = objective.sample_timesteps(model_api.schedule, 3, gen)
            x0 = model_api.encode_images(e.pixels[None]).expand(3, -1, -1, -1)
            noise = torch.randn(x0.shape, generator=gen)
            a = a_all[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
            cond = model_api.encode_prompts([e.caption] * 3)
            pred = model_api.unet(noisy, t, encoder_hidden_states=cond).sample
            target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
            direct.append(((pred - target) ** 2).mean())
    expected = float(torch.stack(direct).mean())

    v = validation.Validator(model_api, held, settings)
    first, again = v.loss(), v.loss()
    assert first == again, "two evaluations without training in between give the same value"
    assert validation.Validator(model_api, held, settings).loss() == first, "the draws are fixed by the seed"
    # Same operations in another order (batch of 3 against the loop's batch of 3): float32 rounding only.
    assert first == pytest.approx(expected, rel=1e-5)

    seen = []
    result, _ = _train(
        model_api,
        dataset,
        _config(steps=8),
        validation=settings,
        callbacks=loop.TrainCallbacks(on_validation=lambda s, loss: seen.append((s, loss))),
    )
    assert [s for s, _ in result.validation] == [0, 4, 8] and seen == result.validation
    assert result.validation[0][1] == pytest.approx(expected, rel=1e-5)
    assert sorted(result.held_out) == sorted(e.name for e in held)


def test_validation_loss_falls_while_training(model_api, dataset):
    result, _ = _train(
        model_api,
        dataset,
        _config(steps=40),
        validation=validation.ValidationConfig(every=10, hold_out=1, draws=4),
    )
    values = [v for _, v in result.validation]
    assert [s for s, _ in result.validation] == [0, 10, 20, 30, 40]
    assert values[-1] < 0.9 * values[0], f"held-out loss should fall by 10% or more: {values}"


def _meddling(api):
    """An ``on_validation`` that uses every global generator and checks the model is in eval mode (previews)."""

    def callback(step, loss):
        assert not api.unet.training, "evaluation runs in eval mode"
        assert not torch.is_grad_enabled()
        torch.randn(1000)
        random.random()
        torch.manual_seed(1234)

    return callback


def test_training_is_unchanged_by_validation_with_hold_out_0(model_api, dataset):
    # LoRA dropout draws from the global generator, which the callback reseeds: the loop must fork it.
    config = _config(dropout=0.2, train_text_encoder=True)
    off, off_lora = _train(model_api, dataset, config)
    on, on_lora = _train(
        model_api,
        dataset,
        config,
        validation=validation.ValidationConfig(every=3, hold_out=0),
        callbacks=loop.TrainCallbacks(on_validation=_meddling(model_api)),
    )
    assert on.losses == off.losses
    assert all(torch.equal(on_lora[k], off_lora[k]) for k in off_lora)
    assert len(on.validation) == 5 and on.held_out == []
    assert model_api.unet.training is False, "the fixture's eval flag is given back"


def test_holding_out_trains_as_the_dataset_without_those_images(model_api, dataset):
    config = _config(dropout=0.1)
    rest, held = validation.split(dataset, 1)
    off, off_lora = _train(model_api, rest, config)
    on, on_lora = _train(
        model_api,
        dataset,
        config,
        validation=validation.ValidationConfig(every=5, hold_out=1),
        callbacks=loop.TrainCallbacks(on_validation=_meddling(model_api)),
    )
    assert on.losses == off.losses and all(torch.equal(on_lora[k], off_lora[k]) for k in off_lora)
    assert on.held_out == [held[0].name]


def test_a_resumed_run_keeps_the_validation_history(model_api, dataset, tmp_path):
    settings = validation.ValidationConfig(every=3, hold_out=1)
    stop_at = {"n": 0}

    def stop():
        stop_at["n"] += 1
        return stop_at["n"] == 4

    first, _ = _train(
        model_api,
        dataset,
        _config(steps=6),
        validation=settings,
        callbacks=loop.TrainCallbacks(should_stop=stop),
        checkpoint_dir=tmp_path,
    )
    assert first.stopped_reason == "cancelled" and [s for s, _ in first.validation] == [0, 3]
    second, _ = _train(model_api, dataset, _config(steps=6), validation=settings, checkpoint_dir=tmp_path)
    whole, _ = _train(model_api, dataset, _config(steps=6), validation=settings)
    assert second.resumed_from == 4 and [s for s, _ in second.validation] == [0, 3, 4, 6]
    assert second.validation[-1][1] == pytest.approx(whole.validation[-1][1], rel=1e-6)
