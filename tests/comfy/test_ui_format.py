"""Frontend-format workflows converted to API prompts against the running ComfyUI's node definitions."""

from __future__ import annotations

import copy
import glob
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_workbench.headless import ui_format

pytestmark = pytest.mark.slow

SAVE_PREFIX = "test_ui_format/img"


def _link(link_id, origin, origin_slot, target, target_slot, type_):
    return [link_id, origin, origin_slot, target, target_slot, type_]


def _node(node_id, type_, inputs=(), outputs=(), widgets_values=(), mode=0, **extra):
    return {
        "id": node_id,
        "type": type_,
        "pos": [0, 0],
        "size": [200, 100],
        "flags": {},
        "order": 0,
        "mode": mode,
        "inputs": list(inputs),
        "outputs": list(outputs),
        "properties": {"Node name for S&R": type_},
        "widgets_values": list(widgets_values) if not isinstance(widgets_values, dict) else widgets_values,
        **extra,
    }


def _in(name, type_, link=None, widget=False):
    entry = {"localized_name": name, "name": name, "type": type_, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def _out(name, type_, links):
    return {"localized_name": name, "name": name, "type": type_, "links": list(links)}


def frontend_workflow(ckpt_name: str) -> dict:
    """A txt2img graph as frontend 1.32 saves it, with every frontend-only feature the converter handles.

    Reroute 10 carries CLIP to both encoders; PrimitiveNode 11 feeds KSampler's seed; Note 12 is
    dropped; the muted PrimitiveInt 13 feeds EmptyLatentImage's batch_size (so the widget value 1
    counts); the bypassed LatentUpscaleBy 14 sits between the empty latent and the sampler.
    Nodes 1-4 list only their links (older saves), 5-7 list their widgets too (1.32 saves).
    """
    nodes = [
        _node(
            1,
            "CheckpointLoaderSimple",
            [],
            [_out("MODEL", "MODEL", [1]), _out("CLIP", "CLIP", [2]), _out("VAE", "VAE", [3])],
            [ckpt_name],
        ),
        _node(
            10,
            "Reroute",
            [{"name": "", "type": "*", "link": 2}],
            [_out("", "CLIP", [4, 5])],
            properties={"showOutputText": False, "horizontal": False},
        ),
        _node(
            2,
            "CLIPTextEncode",
            [_in("clip", "CLIP", 4)],
            [_out("CONDITIONING", "CONDITIONING", [6])],
            ["a photo of a dog"],
        ),
        _node(3, "CLIPTextEncode", [_in("clip", "CLIP", 5)], [_out("CONDITIONING", "CONDITIONING", [7])], [""]),
        _node(
            4,
            "EmptyLatentImage",
            [_in("batch_size", "INT", 12, widget=True)],
            [_out("LATENT", "LATENT", [8])],
            [64, 64, 1],
        ),
        _node(13, "PrimitiveInt", [], [_out("INT", "INT", [12])], [999, "fixed"], mode=ui_format.MODE_MUTED),
        _node(
            14,
            "LatentUpscaleBy",
            [
                _in("samples", "LATENT", 8),
                _in("upscale_method", "COMBO", widget=True),
                _in("scale_by", "FLOAT", widget=True),
            ],
            [_out("LATENT", "LATENT", [9])],
            ["nearest-exact", 2.0],
            mode=ui_format.MODE_BYPASS,
        ),
        _node(
            11,
            "PrimitiveNode",
            [],
            [{"name": "INT", "type": "INT", "links": [10], "widget": {"name": "seed"}}],
            [7, "fixed"],
            title="seed",
        ),
        _node(
            5,
            "KSampler",
            [
                _in("model", "MODEL", 1),
                _in("positive", "CONDITIONING", 6),
                _in("negative", "CONDITIONING", 7),
                _in("latent_image", "LATENT", 9),
                _in("seed", "INT", 10, widget=True),
                _in("steps", "INT", widget=True),
                _in("cfg", "FLOAT", widget=True),
                _in("sampler_name", "COMBO", widget=True),
                _in("scheduler", "COMBO", widget=True),
                _in("denoise", "FLOAT", widget=True),
            ],
            [_out("LATENT", "LATENT", [11])],
            [7, "fixed", 4, 5.0, "euler", "normal", 1.0],
        ),
        _node(6, "VAEDecode", [_in("samples", "LATENT", 11), _in("vae", "VAE", 3)], [_out("IMAGE", "IMAGE", [13])]),
        _node(
            7,
            "SaveImage",
            [_in("images", "IMAGE", 13), _in("filename_prefix", "STRING", widget=True)],
            [],
            [SAVE_PREFIX],
        ),
        _node(12, "Note", [], [], ["the seed comes from node 11; node 13 is muted, node 14 bypassed"]),
    ]
    links = [
        _link(1, 1, 0, 5, 0, "MODEL"),
        _link(2, 1, 1, 10, 0, "*"),
        _link(3, 1, 2, 6, 1, "VAE"),
        _link(4, 10, 0, 2, 0, "CLIP"),
        _link(5, 10, 0, 3, 0, "CLIP"),
        _link(6, 2, 0, 5, 1, "CONDITIONING"),
        _link(7, 3, 0, 5, 2, "CONDITIONING"),
        _link(8, 4, 0, 14, 0, "LATENT"),
        _link(9, 14, 0, 5, 3, "LATENT"),
        _link(10, 11, 0, 5, 4, "INT"),
        _link(11, 5, 0, 6, 0, "LATENT"),
        _link(12, 13, 0, 4, 0, "INT"),
        _link(13, 6, 0, 7, 0, "IMAGE"),
    ]
    return {
        "id": "5d2c3b53-0d2f-4c1e-9d7c-8f1b1e3f2a10",
        "revision": 0,
        "last_node_id": 14,
        "last_link_id": 13,
        "nodes": nodes,
        "links": links,
        "groups": [{"id": 1, "title": "sampling", "bounding": [0, 0, 500, 500], "color": "#3f789e", "flags": {}}],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}, "frontendVersion": "1.32.9"},
        "version": 0.4,
    }


def expected_prompt(ckpt_name: str) -> dict:
    """The API prompt the frontend would queue for ``frontend_workflow``."""

    def node(class_type, inputs, title=None):
        return {"inputs": inputs, "class_type": class_type, "_meta": {"title": title or class_type}}

    return {
        "1": node("CheckpointLoaderSimple", {"ckpt_name": ckpt_name}),
        "2": node("CLIPTextEncode", {"text": "a photo of a dog", "clip": ["1", 1]}),
        "3": node("CLIPTextEncode", {"text": "", "clip": ["1", 1]}),
        "4": node("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        "5": node(
            "KSampler",
            {
                "seed": 7,
                "steps": 4,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
            },
        ),
        "6": node("VAEDecode", {"samples": ["5", 0], "vae": ["1", 2]}),
        "7": node("SaveImage", {"filename_prefix": SAVE_PREFIX, "images": ["6", 0]}),
    }


def test_frontend_workflow_converts_to_the_expected_prompt(comfy, ckpt_name):
    prompt = ui_format.load_workflow(frontend_workflow(ckpt_name), comfy.node_classes)
    assert prompt == expected_prompt(ckpt_name)


def test_api_format_passes_through_and_files_are_read(comfy, ckpt_name, tmp_path):
    api = expected_prompt(ckpt_name)
    (tmp_path / "api.json").write_text(json.dumps(api))
    (tmp_path / "ui.json").write_text(json.dumps(frontend_workflow(ckpt_name)))
    assert ui_format.load_workflow(tmp_path / "api.json", comfy.node_classes) == api
    assert ui_format.load_workflow(str(tmp_path / "ui.json"), comfy.node_classes) == api
    assert ui_format.load_workflow({"prompt": api}, comfy.node_classes) == api  # a POST /prompt body


def _saved_pixels(comfy, result) -> np.ndarray:
    (images,) = [out["images"] for out in result.ui_outputs.values() if "images" in out]
    (item,) = images
    path = Path(comfy.folder_paths.get_output_directory()) / item["subfolder"] / item["filename"]
    return np.asarray(Image.open(path))


def test_both_formats_run_and_give_identical_images(comfy, ckpt_name, run):
    ui_prompt = ui_format.load_workflow(frontend_workflow(ckpt_name), comfy.node_classes)
    api_prompt = copy.deepcopy(expected_prompt(ckpt_name))
    # fresh_cache: both runs really execute every node instead of reusing the first one's outputs.
    from_ui = _saved_pixels(comfy, run(ui_prompt, fresh_cache=True))
    from_api = _saved_pixels(comfy, run(api_prompt, fresh_cache=True))
    assert from_ui.shape == (64, 64, 3)
    # Same prompt, same seed, same CPU kernels: the PNGs' pixels are equal, not merely close.
    np.testing.assert_array_equal(from_ui, from_api)
    assert from_ui.std() > 0, "a flat image would make the comparison meaningless"


@pytest.mark.parametrize(
    "values, expected_seed, expected_steps",
    [
        ([7, "randomize", 4, 5.0, "euler", "normal", 1.0], 7, 4),  # 1.32: control value after the seed
        ([7, 4, 5.0, "euler", "normal", 1.0], 7, 4),  # hand-written or older: no control value
        ({"seed": 7, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}, 7, 4),
        ([7, "increment", 4], 7, 4),  # values missing at the end keep their defaults
    ],
)
def test_widget_values_skip_control_after_generate(comfy, values, expected_seed, expected_steps):
    node = _node(5, "KSampler", widgets_values=values)
    inputs = ui_format.widget_values(node, comfy.node_classes["KSampler"])
    assert (inputs["seed"], inputs["steps"]) == (expected_seed, expected_steps)
    assert inputs["sampler_name"] == "euler" and inputs["denoise"] == 1.0
    assert "randomize" not in inputs.values() and "increment" not in inputs.values()


def test_noise_seed_and_upload_values_are_skipped(comfy):
    noise = ui_format.widget_values(
        _node(1, "RandomNoise", widgets_values=[42, "fixed"]), comfy.node_classes["RandomNoise"]
    )
    assert noise == {"noise_seed": 42}
    image = ui_format.widget_values(
        _node(2, "LoadImage", widgets_values=["cat.png", "image"]), comfy.node_classes["LoadImage"]
    )
    assert image == {"image": "cat.png"}


def test_bypassed_node_passes_through_and_muted_output_is_unconnected(comfy, ckpt_name):
    wf = frontend_workflow(ckpt_name)
    (upscale,) = [n for n in wf["nodes"] if n["id"] == 14]
    upscale["mode"] = 0  # enabled: now it is in the prompt and feeds the sampler
    prompt = ui_format.load_workflow(wf, comfy.node_classes)
    assert prompt["5"]["inputs"]["latent_image"] == ["14", 0]
    assert prompt["14"]["inputs"] == {"samples": ["4", 0], "upscale_method": "nearest-exact", "scale_by": 2.0}
    (primitive_int,) = [n for n in wf["nodes"] if n["id"] == 13]
    primitive_int["mode"] = 0  # unmuted: its output now feeds batch_size
    assert ui_format.load_workflow(wf, comfy.node_classes)["4"]["inputs"]["batch_size"] == ["13", 0]


def test_subgraph_is_flattened_with_prefixed_ids(comfy, ckpt_name):
    wf = frontend_workflow(ckpt_name)
    subgraph_id = "0b6f1f5e-2c71-4a8e-bb3c-5d0a4c1b9e77"
    # Replace the positive encoder (node 2) by a subgraph instance (node 20) holding the same encoder.
    wf["nodes"] = [n for n in wf["nodes"] if n["id"] != 2] + [
        _node(20, subgraph_id, [_in("clip", "CLIP", 4)], [_out("CONDITIONING", "CONDITIONING", [6])])
    ]
    wf["definitions"] = {
        "subgraphs": [
            {
                "id": subgraph_id,
                "version": 1,
                "name": "encode",
                "inputNode": {"id": -10},
                "outputNode": {"id": -20},
                "inputs": [{"id": "in-clip", "name": "clip", "type": "CLIP", "linkIds": [1]}],
                "outputs": [{"id": "out-cond", "name": "CONDITIONING", "type": "CONDITIONING", "linkIds": [2]}],
                "widgets": [],
                "nodes": [
                    _node(
                        1,
                        "CLIPTextEncode",
                        [_in("clip", "CLIP", 1)],
                        [_out("CONDITIONING", "CONDITIONING", [2])],
                        ["a photo of a dog"],
                    )
                ],
                "links": [
                    {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "CLIP"},
                    {
                        "id": 2,
                        "origin_id": 1,
                        "origin_slot": 0,
                        "target_id": -20,
                        "target_slot": 0,
                        "type": "CONDITIONING",
                    },
                ],
            }
        ]
    }
    wf["links"] = [
        _link(4, 10, 0, 20, 0, "CLIP") if lk[0] == 4 else _link(6, 20, 0, 5, 1, "CONDITIONING") if lk[0] == 6 else lk
        for lk in wf["links"]
    ]
    prompt = ui_format.load_workflow(wf, comfy.node_classes)
    expected = expected_prompt(ckpt_name)
    expected["20:1"] = expected.pop("2")
    expected["5"]["inputs"]["positive"] = ["20:1", 0]
    assert prompt == expected


def test_unknown_node_type_names_node_and_asks_about_custom_nodes(comfy, ckpt_name):
    wf = frontend_workflow(ckpt_name)
    wf["nodes"].append(_node(30, "SomePackUpscaler", [], [], [1.5]))
    with pytest.raises(ui_format.UnknownNodeTypeError) as err:
        ui_format.load_workflow(wf, comfy.node_classes)
    message = str(err.value)
    assert "node 30" in message and "'SomePackUpscaler'" in message and "is the custom node installed?" in message


def test_link_from_a_missing_node_is_an_error(comfy, ckpt_name):
    wf = frontend_workflow(ckpt_name)
    wf["links"] = [_link(6, 99, 0, 5, 1, "CONDITIONING") if lk[0] == 6 else lk for lk in wf["links"]]
    with pytest.raises(ui_format.WorkflowFormatError, match=r"node 5 \(KSampler\): link 6 comes from node 99"):
        ui_format.load_workflow(wf, comfy.node_classes)


def test_input_naming_a_missing_link_is_an_error(comfy, ckpt_name):
    wf = frontend_workflow(ckpt_name)
    wf["links"] = [lk for lk in wf["links"] if lk[0] != 3]
    with pytest.raises(ui_format.WorkflowFormatError, match=r"node 6 \(VAEDecode\): input 'vae' names link 3"):
        ui_format.load_workflow(wf, comfy.node_classes)


def test_neither_format_is_an_error(comfy, tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(ui_format.WorkflowFormatError, match="neither an API prompt"):
        ui_format.load_workflow(path, comfy.node_classes)


# Files the frontend itself wrote, from ComfyUI's templates package (a ComfyUI requirement), with their
# KSampler's (steps, cfg). The classic default graph, default.json, is only in 0.3.75's package (newer
# ComfyUI moved the templates to comfyui-workflow-templates-json and dropped it); flux_schnell.json is in both.
TEMPLATES = {"default.json": (20, 8), "flux_schnell.json": (4, 1)}


def _templates() -> dict[str, Path]:
    purelib = Path(sysconfig.get_paths()["purelib"])
    found = {}
    for name in TEMPLATES:
        hits = sorted(glob.glob(str(purelib / "comfyui_workflow_templates*" / "templates" / name)))
        if hits:
            found[name] = Path(hits[0])
    return found


def test_frontends_own_workflows_convert(comfy):
    found = _templates()
    assert "flux_schnell.json" in found, "comfyui-workflow-templates (a ComfyUI requirement) has no flux_schnell.json"
    for name, path in found.items():
        prompt = ui_format.load_workflow(path, comfy.node_classes)
        (sampler,) = [p for p in prompt.values() if p["class_type"] == "KSampler"]
        steps, cfg = TEMPLATES[name]
        assert (sampler["inputs"]["steps"], sampler["inputs"]["cfg"]) == (steps, cfg), (name, sampler)
        assert sampler["inputs"]["sampler_name"] == "euler" and isinstance(sampler["inputs"]["seed"], int), name
        assert not any(p["class_type"] in ("Note", "MarkdownNote") for p in prompt.values()), name
