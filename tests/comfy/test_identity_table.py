"""lora.identity's ldm -> diffusers renaming against ComfyUI's own table (comfy.utils.unet_to_diffusers).

lora/ may not import ComfyUI, so it carries its own rule; this checks the rule on every weight of three UNet
layouts: SD1 (4 levels, 2 res blocks), SDXL (3 levels, deep transformers) and the tiny test model (2 levels, 1).
"""

from __future__ import annotations

import pytest
import torch

from lora_workbench.headless.tiny_model import UNET_CONFIG
from lora_workbench.lora import identity
from lora_workbench.lora.state import LoraModule

SD1 = dict(
    num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    transformer_depth_middle=1,
)
SDXL = dict(
    num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10,
)
TINY = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in UNET_CONFIG.items()}


@pytest.mark.parametrize("config", [SD1, SDXL, TINY], ids=["sd1", "sdxl", "tiny"])
def test_every_ldm_weight_gets_comfyuis_diffusers_name(comfy, config):
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(config)
    # ComfyUI lists some ldm weights under two diffusers names (label_emb: class_ and add_embedding); any is right.
    names: dict[str, set[str]] = {}
    for d, ldm in table.items():
        if d.endswith(".weight"):
            names.setdefault(ldm[: -len(".weight")], set()).add("lora_unet_" + d[: -len(".weight")].replace(".", "_"))
    assert len(names) > 50
    n_res = config["num_res_blocks"][0]
    wrong = []
    for ldm_path, expected in names.items():
        ours = identity.ldm_to_diffusers_name("lora_unet_" + ldm_path.replace(".", "_"), n_res)
        if ours not in expected:
            wrong.append((ldm_path, sorted(expected), ours))
    assert wrong == [], f"{len(wrong)} of {len(names)} differ, e.g. {wrong[:3]}"


def test_res_blocks_are_inferred_from_ldm_names_and_widths():
    def modules(indices_widths, kind="input_blocks"):
        out = {}
        for index, width in indices_widths:
            name = f"lora_unet_{kind}_{index}_1_transformer_blocks_0_attn1_to_q"
            out[name] = LoraModule(down=torch.zeros(2, width), up=torch.zeros(width, 2))
        return out

    assert identity.infer_res_blocks(modules([(1, 320), (2, 320), (4, 640), (5, 640), (7, 1280)])) == 2  # SD1
    assert identity.infer_res_blocks(modules([(1, 320), (3, 640)])) == 1  # the tiny model
    assert identity.infer_res_blocks(modules([(3, 640), (4, 640), (6, 320)], "output_blocks")) == 2
    assert identity.infer_res_blocks(modules([(1, 320)])) == identity.DEFAULT_RES_BLOCKS  # cannot tell
