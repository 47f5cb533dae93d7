"""Training you can trust: any seed trains, a checkpoint resumes only its own run, no failure loses the run,
names stay inside their folders, class images come in chunks under a key that covers the whole model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lora_workbench.trainer import checkpoint as ckpt
from lora_workbench.trainer import inject, loop, objective, paths
from lora_workbench.trainer.config import TrainConfig
from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder
from lora_workbench.trainer.diffusers_backend import DiffusersModelApi

pytestmark = pytest.mark.slow


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "rank": 4, "learning_rate": 1e-3, "batch_size": 2, "seed": 3, **kw})


@pytest.fixture
def dataset(subject_folder):
    return load_image_folder(subject_folder, DatasetOptions(resolution=16))


def _lora(api) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in inject.named_lora_tensors(api.unet).items()}


@pytest.mark.parametrize("seed", [2**44, 10**15, 2**53 + 1, 2**63 - 1])
def test_every_seed_the_widget_allows_trains(model_api, dataset, seed):
    # ComfyUI's "randomize" draws seeds up to about 1e15; seed * 1_000_003 overflowed torch.manual_seed above ~1.8e13.
    result = loop.train(model_api, dataset, _cfg(steps=2, seed=seed, dropout=0.1))
    assert result.steps_done == 2 and all(map(torch.isfinite, torch.tensor(result.losses)))


def test_resume_never_returns_another_datasets_lora(model_api, subject_folder, tmp_path, draw):
    run = tmp_path / "checkpoints" / "my_lora"
    first = loop.train(
        model_api, load_image_folder(subject_folder, DatasetOptions(resolution=16)), _cfg(), checkpoint_dir=run
    )
    # A second subject: other images, another trigger; same run name, resume on (the node's defaults).
    other = tmp_path / "cat"
    other.mkdir()
    for i in range(4):
        draw(i + 10).rotate(90).save(other / f"cat_{i}.png")
    second_ds = load_image_folder(other, DatasetOptions(resolution=16, trigger="zwx", class_noun="cat"))
    second = loop.train(model_api, second_ds, _cfg(), checkpoint_dir=run)
    assert second.resumed_from == 0 and second.stopped_reason == "finished" and second.steps_done == 6
    assert "dataset: 4 image(s) added: cat_0.png" in second.notes[0] and "6 image(s) removed" in second.notes[0]
    assert second.losses != first.losses, "trained anew on the new images"
    (kept,) = (tmp_path / "checkpoints").glob("my_lora.previous-step6-*")
    assert ckpt.load_checkpoint(kept)[2]["losses"] == first.losses, "the first subject's checkpoint is kept"

    # A caption edited, nothing else: still another run.
    (other / "cat_0.txt").write_text("a photo of zwx cat on a sofa")
    third_ds = load_image_folder(other, DatasetOptions(resolution=16, trigger="zwx", class_noun="cat"))
    third = loop.train(model_api, third_ds, _cfg(), checkpoint_dir=run)
    assert third.resumed_from == 0 and "1 image(s) changed (pixels or caption): cat_0.png" in third.notes[0]


def test_resume_on_another_base_model_starts_fresh(tiny_parts, dataset, tmp_path):
    import copy

    unet, te, tok, vae, sched = tiny_parts
    loop.train(DiffusersModelApi(unet, te, tok, vae, sched), dataset, _cfg(steps=2), checkpoint_dir=tmp_path / "r")
    fine_tuned = copy.deepcopy(unet)
    with torch.no_grad():
        fine_tuned.conv_in.weight.mul_(1.01)
    result = loop.train(
        DiffusersModelApi(fine_tuned, te, tok, vae, sched), dataset, _cfg(steps=4), checkpoint_dir=tmp_path / "r"
    )
    assert result.resumed_from == 0 and "the base model's unet differs" in result.notes[0], result.notes


def test_a_finished_run_says_so_and_more_steps_continue_it(model_api, dataset, tmp_path):
    first = loop.train(model_api, dataset, _cfg(), checkpoint_dir=tmp_path / "r", keep_layers=True)
    trained = _lora(model_api)
    inject.remove_adapter(model_api.unet)
    again = loop.train(model_api, dataset, _cfg(), checkpoint_dir=tmp_path / "r", keep_layers=True)
    assert again.stopped_reason == "already finished" and again.steps_done == 6 and again.resumed_from == 6
    assert again.losses == first.losses and again.notes == []
    assert all(torch.equal(trained[k], v) for k, v in _lora(model_api).items()), "that run's LoRA, not a new one"
    inject.remove_adapter(model_api.unet)
    longer = loop.train(model_api, dataset, _cfg(steps=8), checkpoint_dir=tmp_path / "r")
    assert longer.resumed_from == 6 and longer.steps_done == 8, "steps may grow: the same run, continued"


def test_an_unreadable_checkpoint_is_set_aside_not_a_dead_end(model_api, dataset, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "checkpoint.json").write_text("{not json")
    result = loop.train(model_api, dataset, _cfg(steps=2), checkpoint_dir=run)
    assert result.steps_done == 2 and "its index cannot be read" in result.notes[0], result.notes
    (kept,) = tmp_path.glob("r.previous-step0-*")
    assert (kept / "checkpoint.json").read_text() == "{not json"


class _FailAt:
    """The model interface whose ``n``-th prediction raises ``error`` (out of memory, Ctrl-C, a layer bug)."""

    def __init__(self, api, n: int, error: BaseException):
        self.api, self.n, self.error, self.calls = api, n, error, 0

    def __getattr__(self, name):
        return getattr(self.api, name)

    def predict_noise(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise self.error
        return self.api.predict_noise(*args)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), KeyboardInterrupt(), ValueError("layer bug")],
    ids=["out_of_memory", "keyboard_interrupt", "layer_raises"],
)
def test_any_failure_keeps_the_last_completed_step_and_resume_matches_a_straight_run(
    model_api, dataset, tmp_path, error
):
    straight = loop.train(model_api, dataset, _cfg(), checkpoint_dir=tmp_path / "straight", keep_layers=True)
    want = _lora(model_api)
    inject.remove_adapter(model_api.unet)
    # One prediction per step: the 5th call is step 5, so steps 1-4 completed; checkpoint_every 0 (none periodic).
    with pytest.raises(type(error)):
        loop.train(_FailAt(model_api, 5, error), dataset, _cfg(), checkpoint_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"] == 4
    resumed = loop.train(model_api, dataset, _cfg(), checkpoint_dir=tmp_path / "run", keep_layers=True)
    got = _lora(model_api)
    inject.remove_adapter(model_api.unet)
    assert resumed.resumed_from == 4 and resumed.losses == straight.losses
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed after the failure = never interrupted"


def test_cancel_raised_inside_the_progress_update_keeps_that_step(model_api, dataset, tmp_path):
    # ComfyUI's server hook raises the interrupt inside the progress update (the loop's on_step).
    class Interrupted(Exception):
        pass

    def on_step(step, total, loss):
        if step == 3:
            raise Interrupted("Processing interrupted")

    for every in (0, 2):
        folder = tmp_path / f"every{every}"
        with pytest.raises(Interrupted):
            loop.train(
                model_api,
                dataset,
                _cfg(checkpoint_every=every),
                loop.TrainCallbacks(on_step=on_step),
                checkpoint_dir=folder,
            )
        assert json.loads((folder / "checkpoint.json").read_text())["step"] == 3, f"checkpoint_every {every}"


def test_run_names_and_data_folders_stay_inside_their_roots(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    assert paths.run_folder(root, "client_a/my_lora") == root / "client_a" / "my_lora"
    for bad in ("..", ".", "../x", "a/../../x", ".hidden", "", "a//b", "a b", "/abs"):
        with pytest.raises(ValueError, match="run_name"):
            paths.run_folder(root, bad)
    inp, out = tmp_path / "input", tmp_path / "output"
    roots = {"input": str(inp), "output": str(out)}
    assert paths.resolve_data_folder("dogs", roots, "dataset folder") == str(inp / "dogs")
    assert paths.resolve_data_folder(str(out / "x"), roots, "dataset folder") == str(out / "x")
    for bad in ("../secret", "/etc", str(tmp_path), "dogs/../../x"):
        with pytest.raises(paths.PathNotAllowedError) as e:
            paths.resolve_data_folder(bad, roots, "dataset folder")
        assert f"'{bad}'" in str(e.value) and str(inp) not in str(e.value), "names the value, not server paths"
    assert paths.display_name(str(out / "sets" / "dog"), roots) == "output/sets/dog"
    assert paths.display_name("dog", roots) == "dog" and paths.display_name("/srv/x/dog", roots) == "dog"
    monkeypatch.setenv(paths.EXTRA_ROOTS_VARIABLE, str(tmp_path / "datasets"))
    assert paths.resolve_data_folder(str(tmp_path / "datasets" / "d"), roots, "x") == str(tmp_path / "datasets" / "d")


def test_class_images_come_in_chunks_with_progress_and_resume_an_interrupted_cache(model_api, tmp_path):
    calls, progress = [], []
    generate = model_api.generate
    model_api.generate = lambda prompt, n, seed, size: calls.append(n) or generate(prompt, n, seed, size)
    try:
        images = objective.class_images(
            model_api, "a photo of toy", 10, 5, 16, tmp_path, progress=lambda d, t: progress.append((d, t))
        )
        assert calls == [4, 4, 2], "never more than CLASS_IMAGE_CHUNK images at once"
        assert progress == [(4, 10), (8, 10), (10, 10)]
        # A generation cut after its first chunk resumes: only the missing chunks are sampled again.
        (cache,) = (tmp_path / "class_images").iterdir()
        for f in sorted(cache.glob("00*.png"))[4:]:
            f.unlink()
        calls.clear()
        again = objective.class_images(model_api, "a photo of toy", 10, 5, 16, tmp_path)
        assert calls == [4, 2] and torch.equal(images, again)
    finally:
        model_api.generate = generate


def test_class_image_cache_key_covers_text_encoder_and_vae(tiny_parts, tmp_path):
    import copy

    unet, te, tok, vae, sched = tiny_parts
    keys = set()
    for part in ("none", "text_encoder", "vae"):
        parts = {"text_encoder": te, "vae": vae}
        if part != "none":
            parts[part] = copy.deepcopy(parts[part])
            with torch.no_grad():
                next(parts[part].parameters()).mul_(1.01)
        api = DiffusersModelApi(unet, parts["text_encoder"], tok, parts["vae"], sched)
        keys.add(api.fingerprint())
    assert len(keys) == 3


def test_dataset_images_are_held_as_uint8(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(folder / f"{i}.png")
    ds = load_image_folder(folder, DatasetOptions(resolution=64))
    held = sum(e.data.numel() * e.data.element_size() for e in ds.examples)
    assert held == 3 * 3 * 64 * 64, "one byte per channel and pixel, a quarter of float32"
