"""The shipped example workflows: each runs headless, and the UI-format file equals its API twin."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lora_workbench.headless import examples, ui_format

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(comfy):
    examples.prepare_assets(comfy.base)
    return comfy


def _saved_image(comfy, result) -> np.ndarray:
    (images,) = [out["images"] for out in result.ui_outputs.values() if "images" in out]
    item = images[0]
    path = comfy.base / "output" / item["subfolder"] / item["filename"]
    return np.asarray(Image.open(path))


def test_stack_example_ui_and_api_formats_give_the_same_image(assets, run):
    ui_prompt = ui_format.load_workflow(examples.EXAMPLES_DIR / "stack_loras.json", assets.node_classes)
    api_prompt = json.loads((examples.EXAMPLES_DIR / "stack_loras_api.json").read_text())
    assert {k: v["inputs"] for k, v in ui_prompt.items()} == {k: v["inputs"] for k, v in api_prompt.items()}
    from_ui = _saved_image(assets, run(ui_prompt, fresh_cache=True))
    from_api = _saved_image(assets, run(api_prompt, fresh_cache=True))
    assert from_ui.shape == (64, 64, 3)
    np.testing.assert_array_equal(from_ui, from_api)
    assert from_ui.std() > 1.0, "a flat image would make the comparison meaningless"


def test_train_then_stack_example_runs_from_its_ui_format(assets, run):
    ui_prompt = ui_format.load_workflow(examples.EXAMPLES_DIR / "train_then_stack.json", assets.node_classes)
    api_prompt = json.loads((examples.EXAMPLES_DIR / "train_then_stack_api.json").read_text())
    for node_id, node in api_prompt.items():
        # The UI file also holds the optional widgets' defaults that the API file leaves out.
        converted = ui_prompt[node_id]["inputs"]
        assert {k: converted[k] for k in node["inputs"]} == node["inputs"], node_id
    result = run(ui_prompt, fresh_cache=True)
    assert "finished after 12/12 steps" in result.output("3", 4)
    images = [out["images"][0] for out in result.ui_outputs.values() if "images" in out]
    assert {i["filename"].split("_0")[0] for i in images} == {"train_then_stack", "loss_curve"}
    saved = result.output("13", 0)
    assert saved.endswith("example_sks.safetensors")
