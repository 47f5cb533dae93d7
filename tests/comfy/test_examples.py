"""The shipped example workflows: each runs headless, and the UI-format file equals its API twin."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lora_workbench.headless import examples, ui_format
from PIL import Image

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
