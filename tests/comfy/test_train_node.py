"""Train LoRA (DreamBooth) inside ComfyUI's executor: outputs, interop with core nodes, Cancel and resume."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import torch
from graphs import core_chain, train_patch, txt2img
from safetensors import safe_open

from lora_workbench.headless import examples
from lora_workbench.headless.runner import WorkflowError
from lora_workbench.trainer.loss_plot import MARGIN

pytestmark = pytest.mark.slow
PROMPT = "a photo of sks toy"


@pytest.fixture(scope="module")
def assets(comfy):
    examples.prepare_assets(comfy.base)
    return comfy


def _trained(run, ckpt_name, **train_inputs):
    """Run train -> sample; return the RunResult (read outputs before the next run)."""
    handles = {}
    prompt, _ = txt2img(ckpt_name, train_patch(examples.DATASET_INPUT_NAME, handles, **train_inputs), text=PROMPT)
    return run(prompt)


def test_trained_adapter_file_and_model_agree_with_core_lora_loader(assets, run, ckpt_name, caplog):
    # One graph: Train -> (its MODEL/CLIP) -> sampler; the adapter through Apply LoRA Stack on the base
    # MODEL/CLIP -> a second sampler; the adapter saved to a file.
    handles = {}
    prompt, _ = txt2img(ckpt_name, train_patch(examples.DATASET_INPUT_NAME, handles, run_name="agree"), text=PROMPT)
    applied, _ = txt2img(ckpt_name, text=PROMPT)
    applied["apply"] = {
        "class_type": "LoraWorkbenchApplyStack",
        "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "adapter": ["train", 2]},
    }
    for node in ("pos", "neg"):
        applied[node]["inputs"]["clip"] = ["apply", 1]
    applied["sampler"]["inputs"]["model"] = ["apply", 0]
    prompt.update(
        {f"b_{k}": _renamed(v, "b_", keep={"ckpt", "train"}) for k, v in applied.items() if k not in ("ckpt",)}
    )
    prompt["s"] = {
        "class_type": "LoraWorkbenchSave",
        "inputs": {"adapter": ["train", 2], "filename": "trained/agree", "trigger_words": "", "overwrite": True},
    }
    result = run(prompt)
    from_train_model = result.output("sampler")["samples"]
    from_apply = result.output("b_sampler")["samples"]
    summary, curve, saved_path = result.output("train", 4), result.output("train", 3), result.output("s", 0)
    assert "finished after 8/8 steps" in summary, summary
    # The moving average is drawn in blue (20, 60, 200) inside the plot box; the title and axes are black/grey.
    box = curve[0, MARGIN + 2 : -MARGIN - 2, MARGIN + 2 : -10]
    blue = (box[..., 2] > 0.6) & (box[..., 0] < 0.25) & (box[..., 1] < 0.4)
    assert curve.shape[-1] == 3 and int(blue.sum()) > 50, "the loss curve image should have a drawn line"
    adapter = result.output("train", 2)
    ups = [v for k, v in adapter.items() if k.endswith("lora_up.weight")]
    assert ups and all(float(v.abs().max()) > 0 for v in ups), "a trained adapter, not the zero-initialised one"
    assert torch.equal(from_apply, from_train_model)
    base_run = run(txt2img(ckpt_name, text=PROMPT)[0])
    assert not torch.equal(base_run.output("sampler")["samples"], from_train_model), "the LoRA changes the image"

    assert saved_path.endswith("trained/agree.safetensors")
    with safe_open(saved_path, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys), "kohya keys, diffusers-style UNet names"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert metadata["modelspec.trigger_phrase"] == "sks"
    assert json.loads(metadata["lora_workbench.training_settings"])["rank"] == 4
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"

    # The saved file through core LoraLoader: the same latents, and no "lora key not loaded" line.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        core = run(txt2img(ckpt_name, core_chain([("trained/agree.safetensors", 1.0, 1.0)]), text=PROMPT)[0])
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert torch.equal(core.output("sampler")["samples"], from_train_model)


def _renamed(node: dict, prefix: str, keep: set) -> dict:
    inputs = {}
    for name, value in node["inputs"].items():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in keep:
            value = [prefix + value[0], value[1]]
        inputs[name] = value
    return {**node, "inputs": inputs}


def test_cancel_keeps_a_checkpoint_and_resume_continues(assets, run, ckpt_name):
    import comfy.model_management as model_management

    checkpoint = assets.base / "output" / "lora_workbench" / "checkpoints" / "cancel_me" / "checkpoint.json"
    checkpoint.unlink(missing_ok=True)

    def interrupt_after_first_checkpoint():
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        model_management.interrupt_current_processing(True)

    watcher = threading.Thread(target=interrupt_after_first_checkpoint)
    watcher.start()
    with pytest.raises(WorkflowError, match="interrupted"):
        _trained(run, ckpt_name, run_name="cancel_me", steps=400, checkpoint_every=2)
    watcher.join()
    state = json.loads(checkpoint.read_text())
    stopped_at = state["step"]
    assert 2 <= stopped_at < 400
    assert (checkpoint.parent / state["tensors"]).is_file()

    resumed = _trained(run, ckpt_name, run_name="cancel_me", steps=stopped_at + 2, resume=True)
    summary = resumed.output("train", 4)
    assert f"resumed at step {stopped_at}" in summary and f"finished after {stopped_at + 2}/" in summary, summary


def test_bad_dataset_folder_names_the_node_and_folder(assets, run, ckpt_name):
    folder = assets.base / "input" / "broken_set"
    folder.mkdir(exist_ok=True)
    (folder / "broken.png").write_bytes(b"not a png")
    handles = {}
    prompt, _ = txt2img(ckpt_name, train_patch("broken_set", handles))
    with pytest.raises(WorkflowError) as e:
        run(prompt)
    message = str(e.value)
    assert "LoraWorkbenchImageFolder" in message and "'broken_set'" in message and "broken.png" in message
    assert str(assets.base) not in message.split("failed:", 1)[1].split(":", 1)[1], "no server path in the message"


@pytest.mark.parametrize(
    "given, expected",
    [
        ("2e-4", 2e-4),  # as typed in the learning-rate text field
        (0.0002, 2e-4),  # a number, as workflows and API prompts saved before the field was text carry it
    ],
    ids=["text", "number"],
)
def test_learning_rate_text_or_number_reaches_the_trainer_exactly(assets, run, ckpt_name, given, expected):
    name = f"lr_{type(given).__name__}"
    _trained(run, ckpt_name, steps=1, batch_size=1, run_name=name, resume=False, learning_rate=given)
    record = assets.base / "output" / "lora_workbench" / "checkpoints" / name / "checkpoint.json"
    config = json.loads(record.read_text())["config"]
    assert config["learning_rate"] == expected, config  # the same double: nothing rounded on the way


def test_a_learning_rate_that_is_not_a_number_names_the_input_and_value(assets, run, ckpt_name):
    with pytest.raises(WorkflowError) as e:
        _trained(run, ckpt_name, steps=1, run_name="lr_bad", learning_rate="1e-4x")
    message = str(e.value)
    assert "LoraWorkbenchTrain" in message and "learning_rate = '1e-4x': not a number" in message, message
