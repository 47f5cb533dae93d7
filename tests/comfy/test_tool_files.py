"""Files written by other tools, applied through Apply LoRA Stack in ComfyUI's executor: every key, exact deltas.

Each test compares every patched weight's delta with ``(alpha / r) * up @ down`` computed in ``tool_files``
from the file's own tensors and the alphas it was written with. ComfyUI computes ``(alpha / r) * (up @ down)`` in
float32 and the expectation is float64: the measured gap is ~1e-7 of each delta's scale; 1e-5 bounds it and still
fails a wrong alpha (a factor 2 or 0.5 here) or a module patched onto the wrong weight.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import tool_files
import torch
from graphs import rows_json
from safetensors.torch import load_file, save_file

from lora_workbench.headless import runner

pytestmark = pytest.mark.slow

SUB = "lw_tool_files"
UNLOADED = "lora key not loaded: "
TOLERANCE = 1e-5  # see the module docstring


def _builder():
    from comfy_execution.graph_utils import GraphBuilder  # importable once the `comfy` fixture ran

    return GraphBuilder(prefix="")


@pytest.fixture(scope="module")
def tool(comfy, loras_dir) -> dict:
    """The tools' files under models/loras/<SUB>/, by role, with their expected deltas."""
    folder = loras_dir / SUB
    diffusers_path = tool_files.write_diffusers_file(folder)
    kohya_path = tool_files.write_kohya_from_diffusers(diffusers_path, folder / "kohya_from_diffusers.safetensors")
    tagged = tool_files.write_kohya_from_diffusers(
        diffusers_path, folder / "kohya_tagged_sdxl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"}
    )
    return {
        "diffusers": f"{SUB}/{diffusers_path.name}",
        "kohya": f"{SUB}/{kohya_path.name}",
        "tagged": f"{SUB}/{tagged.name}",
        "diffusers_expected": tool_files.expected_diffusers_deltas(diffusers_path),
        "kohya_expected": tool_files.expected_kohya_deltas(kohya_path, diffusers_path),
        "diffusers_path": diffusers_path,
    }


def apply_graph(ckpt_name: str, rows, ids=("stack", "apply")):
    """Checkpoint -> LoRA Stack(rows) -> Apply LoRA Stack; no sampling (the patches are read, not baked)."""
    g = _builder()
    ckpt = g.node("CheckpointLoaderSimple", id="ckpt", ckpt_name=ckpt_name)
    stack = g.node("LoraWorkbenchStack", id=ids[0], rows=rows_json(rows))
    apply = g.node("LoraWorkbenchApplyStack", id=ids[1], model=ckpt.out(0), clip=ckpt.out(1), lora_stack=stack.out(0))
    g.node("PreviewAny", id=f"{ids[1]}_show", source=apply.out(3))  # an output node, so the graph runs
    return g


def applied(result: runner.RunResult, node: str = "apply") -> dict[str, torch.Tensor]:
    model, clip = result.output(node, 0), result.output(node, 1)
    return {**tool_files.applied_deltas(model), **tool_files.applied_deltas(clip.patcher)}


def test_diffusers_file_applies_every_key_with_header_alphas(comfy, ckpt_name, tool):
    result = runner.run_prompt(comfy, apply_graph(ckpt_name, [(tool["diffusers"], 1.0, 1.0)]).finalize(), echo=False)
    report = result.output("apply", 3)
    expected = tool["diffusers_expected"]
    n_unet = sum(k.startswith("diffusion_model.") for k in expected)
    n_te = len(expected) - n_unet
    assert (n_unet, n_te) == (56, 4 * tool_files.TE_LAYERS)
    assert f"patched {n_unet} model and {n_te} CLIP weights" in report, report
    assert "all 64 modules converted" in report, report
    assert "matched nothing" not in report, report
    worst = tool_files.compare(applied(result), expected)
    print(f"MEASURE diffusers file: {len(expected)} weights, largest relative delta error {worst:.2e}")
    assert worst < TOLERANCE, f"largest relative delta error {worst}"


def test_diffusers_kohya_converter_output_applies_its_te1_text_encoder(comfy, ckpt_name, tool, caplog):
    rows = [(tool["kohya"], 0.7, 0.4)]
    with caplog.at_level(logging.WARNING):
        result = runner.run_prompt(comfy, apply_graph(ckpt_name, rows).finalize(), echo=False)
    report = result.output("apply", 3)
    assert "patched 56 model and 8 CLIP weights" in report, report
    # The UNet keys are ComfyUI's own; the lora_te1_encoder_layers_* keys (no text_model) are ours to convert.
    assert "ComfyUI's key map, and LoRA Workbench for 8 modules" in report, report
    assert "WARNING" not in report, "no metadata, SD1 shapes: nothing to warn about"
    deltas = applied(result)
    expected = tool["kohya_expected"]
    unet = {k: v for k, v in expected.items() if k.startswith("diffusion_model.")}
    te = {k: v for k, v in expected.items() if not k.startswith("diffusion_model.")}
    assert tool_files.compare({k: deltas[k] for k in unet}, unet, 0.7) < TOLERANCE
    assert tool_files.compare({k: deltas[k] for k in deltas if k in te or k.startswith("clip_")}, te, 0.4) < TOLERANCE


def test_metadata_that_disagrees_with_the_shapes_is_a_warning_not_a_refusal(comfy, ckpt_name, tool):
    result = runner.run_prompt(comfy, apply_graph(ckpt_name, [(tool["tagged"], 1.0, 1.0)]).finalize(), echo=False)
    report = result.output("apply", 3)
    assert "patched 56 model and 8 CLIP weights" in report, report
    assert "WARNING: its metadata says sdxl, but its tensor shapes are sd1's" in report, report
    assert tool_files.compare(applied(result), tool["kohya_expected"]) < TOLERANCE


def test_converted_and_saved_files_load_in_core_lora_loader_with_every_key(comfy, ckpt_name, loras_dir, tool, caplog):
    g = _builder()
    ckpt = g.node("CheckpointLoaderSimple", id="ckpt", ckpt_name=ckpt_name)
    g.node(
        "LoraWorkbenchConvert",
        id="convert",
        lora_name=tool["diffusers"],
        format="kohya",
        filename=f"{SUB}/diffusers_to_kohya",
        overwrite=True,
    )
    load = g.node("LoraWorkbenchLoad", id="load", lora_name=tool["kohya"])
    g.node(
        "LoraWorkbenchSave",
        id="save",
        adapter=load.out(0),
        filename=f"{SUB}/kohya_saved",
        trigger_words="",
        overwrite=True,
    )
    runner.run_prompt(comfy, g.finalize(), echo=False)
    converted, saved = f"{SUB}/diffusers_to_kohya.safetensors", f"{SUB}/kohya_saved.safetensors"
    assert {k.split(".")[0][:9] for k in load_file(str(loras_dir / saved))} == {"lora_unet", "lora_te_t"}, (
        "Save writes the canonical SD1 names: lora_te_text_model_..., not diffusers' lora_te1_encoder_..."
    )

    g = _builder()
    ckpt = g.node("CheckpointLoaderSimple", id="ckpt", ckpt_name=ckpt_name)
    for i, name in enumerate((converted, saved)):
        core = g.node(
            "LoraLoader",
            id=f"core_{i}",
            model=ckpt.out(0),
            clip=ckpt.out(1),
            lora_name=name,
            strength_model=1.0,
            strength_clip=1.0,
        )
        pos = g.node("CLIPTextEncode", id=f"core_{i}_text", text="x", clip=core.out(1))
        g.node("PreviewAny", id=f"core_{i}_show", source=pos.out(0))  # an output node, so the graph runs
    with caplog.at_level(logging.WARNING):
        result = runner.run_prompt(comfy, g.finalize(), echo=False)
    unloaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith(UNLOADED)]
    assert unloaded == [], unloaded[:5]
    for node, expected in (("core_0", tool["diffusers_expected"]), ("core_1", tool["kohya_expected"])):
        worst = tool_files.compare(applied(result, node), expected)
        print(f"MEASURE core LoraLoader on {node}: largest relative delta error {worst:.2e}")
        assert worst < TOLERANCE, f"{node}: core applies the file with relative error {worst}"


def test_lora_for_another_model_is_refused_with_file_module_and_shapes(comfy, ckpt_name, loras_dir):
    # An SDXL-shaped kohya module (ldm name, cross-attention context 2048) on the SD1 model: ComfyUI maps the
    # name, then fails per layer at sampling. We say which file, which module and which shapes, before sampling.
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    tensors = {
        f"{name}.lora_down.weight": torch.randn(4, 2048),
        f"{name}.lora_up.weight": torch.randn(320, 4),
        f"{name}.alpha": torch.tensor(4.0),
    }
    path = loras_dir / SUB / "sdxl_shaped.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(runner.WorkflowError) as err:
        runner.run_prompt(comfy, apply_graph(ckpt_name, [(f"{SUB}/{path.name}", 1.0, 1.0)]).finalize(), echo=False)
    message = str(err.value)
    assert f"{SUB}/sdxl_shaped.safetensors" in message, message
    assert name in message and "320 x 2048" in message and "(320, 768)" in message, message
    assert "sdxl's" in message and "the model is sd1" in message, message


def damaged_files(folder: Path) -> dict[str, tuple[dict, list[str]]]:
    """name -> (tensors, phrases the error must contain)."""
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return {
        "shapes_disagree": (
            {
                f"{good}.lora_down.weight": torch.randn(4, 320),
                f"{good}.lora_up.weight": torch.randn(320, 8),
            },
            [good, "mismatched shapes", "down (4, 320), up (320, 8)"],
        ),
        "checkpoint": (
            {
                "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4),
                "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4),
            },
            ["applies to nothing", "full model checkpoint"],
        ),
        "missing_up": (
            {f"{good}.lora_down.weight": torch.randn(4, 320), f"{good}.alpha": torch.tensor(4.0)},
            [good, "incomplete", "needs both down and up"],
        ),
    }


@pytest.mark.parametrize("case", ["shapes_disagree", "checkpoint", "missing_up"])
def test_damaged_file_is_answered_with_file_module_and_problem(comfy, ckpt_name, loras_dir, case):
    tensors, phrases = damaged_files(loras_dir / SUB)[case]
    path = loras_dir / SUB / f"damaged_{case}.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(runner.WorkflowError) as err:
        runner.run_prompt(comfy, apply_graph(ckpt_name, [(f"{SUB}/{path.name}", 1.0, 1.0)]).finalize(), echo=False)
    message = str(err.value)
    assert f"{SUB}/damaged_{case}.safetensors" in message, message
    assert "sdxl" not in message, f"wrong diagnosis: {message}"
    for phrase in phrases:
        assert phrase in message, message
