"""Checkpoints: exact resume (10 + 10 = 20 steps), Cancel at a step, settings checks, class images, loss plot."""

from __future__ import annotations

import pytest
import torch

from lora_workbench.trainer import checkpoint as ckpt
from lora_workbench.trainer.config import TrainConfig
from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder
from lora_workbench.trainer.loop import TrainCallbacks, train
from lora_workbench.trainer.loss_plot import MARGIN, plot_losses


@pytest.fixture
def dataset(subject_folder):
    return load_image_folder(subject_folder, DatasetOptions(resolution=16))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 20, "rank": 4, "learning_rate": 1e-3, "batch_size": 2, "seed": 3, **kw})


class _Counting:
    """The model interface with ``generate`` counted (to see whether class images were made or reused)."""

    def __init__(self, api):
        self._api, self.generated = api, 0

    def __getattr__(self, name):
        return getattr(self._api, name)

    def generate(self, *args, **kwargs):
        self.generated += 1
        return self._api.generate(*args, **kwargs)


def test_resume_with_other_settings_starts_fresh_and_keeps_the_old_checkpoint(model_api, dataset, tmp_path):
    run = tmp_path / "run"
    first = train(model_api, dataset, _cfg(steps=2), checkpoint_dir=run)
    other = train(model_api, dataset, _cfg(steps=4, rank=8), checkpoint_dir=run, resume=True)
    assert other.resumed_from == 0 and other.steps_done == 4
    assert "started fresh" in other.notes[0] and "rank was 4, now 8" in other.notes[0], other.notes
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-step2-")]
    assert kept.name in other.notes[0]
    step, _, state = ckpt.load_checkpoint(kept)
    assert step == 2 and state["losses"] == first.losses, "the first run's checkpoint, untouched"
    # resume off: never resumes, and the checkpoint it would have overwritten is kept as well.
    again = train(model_api, dataset, _cfg(steps=4, rank=8), checkpoint_dir=run, resume=False)
    assert again.resumed_from == 0 and "resume is off" in again.notes[0]
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]) == 2


def test_should_stop_true_at_step_5_cancels_with_a_checkpoint(model_api, dataset, tmp_path):
    steps, written = [], []
    callbacks = TrainCallbacks(
        on_step=lambda step, total, loss: steps.append(step),
        should_stop=lambda: steps[-1] == 5,
        on_checkpoint=written.append,
    )
    result = train(model_api, dataset, _cfg(checkpoint_every=3), callbacks, checkpoint_dir=tmp_path)
    assert (result.stopped_reason, result.steps_done, steps) == ("cancelled", 5, [1, 2, 3, 4, 5])
    assert len(written) == 2 and result.checkpoint_path == written[-1], "step 3 periodic, then step 5 on Cancel"
    step, tensors, state = ckpt.load_checkpoint(tmp_path)
    assert step == 5 and len(state["losses"]) == 5
    assert all(torch.isfinite(v).all() for v in tensors.values())
    lora = {k: v for k, v in tensors.items() if k.startswith("unet.") and k.endswith("lora_B")}
    assert lora and any(v.abs().sum() > 0 for v in lora.values()), "the checkpoint holds the trained lora_B"
    resumed = train(model_api, dataset, _cfg(steps=6), checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 5 and resumed.steps_done == 6


@pytest.mark.parametrize("field, value", [("steps", 0), ("rank", 0)])
def test_train_refuses_zero_steps_or_rank(model_api, dataset, field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} = 0: must be at least 1"):
        train(model_api, dataset, _cfg(**{field: value}))
    assert not hasattr(model_api.unet, "peft_config"), "a refused config must not touch the model"


def test_class_images_from_a_folder_are_not_generated(model_api, dataset, tmp_path, draw):
    folder = tmp_path / "dogs"
    folder.mkdir()
    for i in range(3):
        draw(i + 3).rotate(90).save(folder / f"dog_{i}.png")
    counting = _Counting(model_api)
    result = train(
        counting,
        dataset,
        _cfg(steps=2, prior_preservation=True, class_images_dir=str(folder)),
        cache_dir=tmp_path / "cache",
    )
    assert counting.generated == 0 and result.steps_done == 2
    assert not (tmp_path / "cache").exists(), "a class folder needs no cache"


def test_generated_class_images_are_cached_and_reused(model_api, dataset, tmp_path):
    cfg = _cfg(steps=1, prior_preservation=True, num_class_images=3)
    counting = _Counting(model_api)
    first = train(counting, dataset, cfg, cache_dir=tmp_path)
    assert counting.generated == 1 and len(list(tmp_path.glob("class_images/*/0*.png"))) == 3
    second = train(counting, dataset, cfg, cache_dir=tmp_path)
    assert counting.generated == 1, "the second run must reuse the cached class images"
    assert first.losses == second.losses, "the reused (8-bit) images are exactly the ones the first run trained on"


def test_loss_plot_draws_the_curve():
    img = plot_losses([1.0 / (i + 1) for i in range(50)], title="loss")
    assert img.shape == (256, 512, 3) and img.dtype.name == "float32"
    assert 0.0 <= img.min() and img.max() <= 1.0
    box = img[MARGIN + 2 : 256 - MARGIN - 2, MARGIN + 2 : 512 - 10]
    assert (box < 0.9).any(axis=-1).sum() > 100, "the curve must draw some non-white pixels inside the plot box"
    empty = plot_losses([])
    assert (empty[MARGIN + 2 : 256 - MARGIN - 2, MARGIN + 2 : 512 - 10] == 1.0).all(), "no data: an empty box"
    assert plot_losses([1.0, float("nan"), 0.5]).shape == (256, 512, 3), "a NaN in the history must not break it"
