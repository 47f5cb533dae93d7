"""Training Previews -> Train LoRA in ComfyUI's executor: validation losses and preview images reach the page, and
training is the same as without them."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from graphs import train_patch, txt2img
from PIL import Image

from lora_workbench.headless import examples

pytestmark = pytest.mark.slow
PREVIEWS = dict(every=3, hold_out=0, prompt="", seed=3, sampler_steps=3, cfg=5.0, size=64)


@pytest.fixture
def events(comfy, monkeypatch):
    examples.prepare_assets(comfy.base)
    # The pack as ComfyUI loaded it (from custom_nodes), not the lora_workbench import the tests use.
    train_module = sys.modules[comfy.node_classes["LoraWorkbenchTrain"].__module__]
    progress = sys.modules[train_module.TrainingProgress.__module__]
    sent = []
    monkeypatch.setattr(progress, "_send", lambda event, data: sent.append((event, data)))
    return sent


def _prompt(ckpt_name, previews: dict | None, steps=6, **train):
    prompt, _ = txt2img(ckpt_name, train_patch(examples.DATASET_INPUT_NAME, {}, steps=steps, **train))
    if previews is not None:
        prompt["previews"] = {"class_type": "LoraWorkbenchTrainingPreviews", "inputs": previews}
        prompt["train"]["inputs"]["previews"] = ["previews", 0]
    return prompt


def _done(sent) -> dict:
    return [d for e, d in sent if e == "lora_workbench.train_done"][-1]


def test_previews_send_validation_losses_and_images_and_training_is_unchanged(run, ckpt_name, events):
    plain = run(_prompt(ckpt_name, None, run_name="plain"))
    plain_losses = _done(events)["losses"]
    plain_adapter = plain.output("train", 2)
    assert not [e for e, _ in events if e == "lora_workbench.train_validation"], "no previews: no validation events"
    events.clear()

    watched = run(_prompt(ckpt_name, PREVIEWS, run_name="watched"))
    validation = [d for e, d in events if e == "lora_workbench.train_validation"]
    assert [d["step"] for d in validation] == [0, 3, 6]
    assert all(np.isfinite(d["loss"]) for d in validation)
    done = _done(events)
    assert done["validation"] == [[d["step"], d["loss"]] for d in validation]
    assert done["losses"] == plain_losses, "hold_out 0: previews and validation leave training as it was"
    adapter = watched.output("train", 2)
    assert adapter.keys() == plain_adapter.keys() and all(torch.equal(adapter[k], plain_adapter[k]) for k in adapter)

    import folder_paths

    temp = folder_paths.get_temp_directory()
    firsts, lasts = validation[0]["images"], validation[-1]["images"]
    assert [i["label"] for i in firsts] == ["with trigger", "without trigger"]
    assert [i["prompt"] for i in firsts] == ["a photo of sks toy", "a photo of toy"]
    pixels = {}
    for d in validation:
        for image in d["images"]:
            assert image["type"] == "temp" and image["subfolder"] == ""
            with Image.open(os.path.join(temp, image["filename"])) as img:
                assert img.size == (64, 64)
                pixels[image["filename"]] = np.asarray(img, dtype=np.float32)
    # The fixed seed and zero-initialised LoRA: both prompts' step-0 previews come from the base model, and the
    # trained LoRA changes the trigger prompt's preview by the end.
    first_with, last_with = pixels[firsts[0]["filename"]], pixels[lasts[0]["filename"]]
    assert np.abs(first_with - last_with).mean() > 0.5, "the LoRA should show in the preview after 6 steps"
    summary = watched.output("train", 4)
    assert "validation loss" in summary and "held out: none (evaluated on training images)" in summary


def test_held_out_images_are_named_and_not_trained_on(run, ckpt_name, events):
    result = run(_prompt(ckpt_name, {**PREVIEWS, "hold_out": 1, "size": 0}, steps=3, run_name="held"))
    validation = [d for e, d in events if e == "lora_workbench.train_validation"]
    assert [d["step"] for d in validation] == [0, 3] and all(d["images"] == [] for d in validation)
    summary = result.output("train", 4)
    held = summary.split("held out: ")[1]
    assert held.endswith(".jpg") and "none" not in held, summary


def test_preview_prompts_with_and_without_the_trigger(comfy):
    from lora_workbench.nodes.preview_nodes import preview_prompts

    assert preview_prompts("", "sks", "a photo of sks toy") == ("a photo of sks toy", "a photo of toy")
    assert preview_prompts("sks  toy on a beach", "sks", "-") == ("sks toy on a beach", "toy on a beach")
    assert preview_prompts("a toy", "sks", "-") == ("sks a toy", "a toy"), "a prompt without it gets it in front"
    assert preview_prompts("sksx toy", "sks", "-") == ("sks sksx toy", "sksx toy"), "whole words only"
