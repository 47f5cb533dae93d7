"""Merging files that name the same layer differently: one name per layer, and the merge equals the stack.

Three files by three tools, overlapping on the same layers under different names: our kohya example (diffusers-style
UNet names, ``lora_te_text_model_...``), diffusers' own kohya converter (``lora_te1_encoder_layers_...``), and
ComfyUI's own TrainLoraNode output (ldm names ``diffusion_model.input_blocks...``, every linear and conv layer, plus
``.diff``/``.diff_b`` full deltas). ComfyUI maps all of these to the same weights, so a merge that kept both names
would lose one input's part when loaded.
"""

from __future__ import annotations

import logging
import math
import re

import pytest
import tool_files
import torch
from graphs import rows_json
from safetensors.torch import load_file, save_file
from test_tool_files import applied

from lora_workbench.headless import runner
from lora_workbench.headless.example_loras import write_example_lora

pytestmark = pytest.mark.slow

SUB = "lw_merge_names"
ROWS = [("a", 0.8, 0.6), ("kohya_te1", -0.5, 0.7), ("core_trained", 0.9, 1.0)]
UNLOADED = "lora key not loaded: "


@pytest.fixture(scope="module")
def files(comfy, ckpt_name, loras_dir) -> dict[str, str]:
    folder = loras_dir / SUB
    write_example_lora(folder / "a.safetensors", seed=301, rank=8)
    diffusers_path = tool_files.write_diffusers_file(folder, "diffusers.safetensors", seed=5)
    tool_files.write_kohya_from_diffusers(diffusers_path, folder / "kohya_te1.safetensors")
    save_file(tool_files.core_train_lora(comfy, ckpt_name), str(folder / "core_trained.safetensors"))
    return {k: f"{SUB}/{k}.safetensors" for k in ("a", "kohya_te1", "core_trained")}


def _graph(ckpt_name, files, merge_inputs):
    from comfy_execution.graph_utils import GraphBuilder

    rows = [(files[k], sm, sc) for k, sm, sc in ROWS]
    g = GraphBuilder(prefix="")
    ckpt = g.node("CheckpointLoaderSimple", id="ckpt", ckpt_name=ckpt_name)
    stack = g.node("LoraWorkbenchStack", id="stack", rows=rows_json(rows))
    stacked = g.node(
        "LoraWorkbenchApplyStack", id="stacked", model=ckpt.out(0), clip=ckpt.out(1), lora_stack=stack.out(0)
    )
    g.node("PreviewAny", id="stacked_show", source=stacked.out(3))
    for name, inputs in merge_inputs.items():
        merge = g.node("LoraWorkbenchMerge", id=f"{name}_merge", lora_stack=stack.out(0), **inputs)
        apply = g.node("LoraWorkbenchApplyStack", id=name, model=ckpt.out(0), clip=ckpt.out(1), adapter=merge.out(0))
        g.node("PreviewAny", id=f"{name}_show", source=apply.out(3))
        g.node("PreviewAny", id=f"{name}_merge_show", source=merge.out(1))
        g.node(
            "LoraWorkbenchSave",
            id=f"{name}_save",
            adapter=merge.out(0),
            filename=f"{SUB}/merged_{name}",
            trigger_words="",
            overwrite=True,
        )
    return g.finalize()


@pytest.fixture(scope="module")
def merged(comfy, ckpt_name, files):
    merges = {
        "concat": dict(method="concat", rank=0, energy=0.0),
        "svd": dict(method="svd", rank=4, energy=0.0),
    }
    return runner.run_prompt(comfy, _graph(ckpt_name, files, merges), echo=False)


def _matrices(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # LoRA modules patch matrices and conv kernels; 1-D keys are the exact .diff/.diff_b deltas.
    return {k: v for k, v in deltas.items() if v.dim() >= 2}


def test_every_input_keeps_its_part_in_one_name_per_layer(merged, files, loras_dir):
    report = merged.output("stacked", 3)
    assert "matched nothing" not in report, report
    merged_file = load_file(str(loras_dir / SUB / "merged_concat.safetensors"))
    modules = {k.split(".")[0] for k in merged_file}
    assert not any(
        m.startswith(("lora_te1_", "lora_unet_input_blocks", "lora_unet_output_blocks")) for m in modules
    ), "the merged file must use one (canonical) name per layer"
    # The overlap exists: the same layer is in all three inputs under three spellings.
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    stacked, concat = applied(merged, "stacked"), applied(merged, "concat")
    assert set(concat) == set(stacked), sorted(set(stacked) ^ set(concat))[:5]
    worst = max(float((concat[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)) for k, v in stacked.items())
    print(f"MEASURE concat merge vs stack: {len(stacked)} weights, largest relative difference {worst:.2e}")
    # Stacking adds three float32 patches in turn; concat adds one patch of the concatenated factors: the same
    # sums in another order, measured ~1e-6 of each delta's scale. 1e-4 still fails a lost or doubled input.
    assert worst < 1e-4, f"concat merge differs from stacking by {worst} (relative)"


def test_svd_merge_reports_the_error_measured_on_what_the_stack_applies(merged):
    stacked, svd = _matrices(applied(merged, "stacked")), _matrices(applied(merged, "svd"))
    err_sq = sum(float(((svd[k] - v) ** 2).sum()) for k, v in stacked.items())
    total_sq = sum(float((v**2).sum()) for v in stacked.values())
    measured = math.sqrt(err_sq / total_sq)
    report = merged.output("svd_merge", 1)
    reported = float(re.search(r"relative error \(Frobenius, all modules\): (\S+)", report).group(1))
    print(f"MEASURE svd rank 4: reported {reported:.4e}, measured on applied deltas {measured:.6e}")
    assert 1e-3 < measured < 1, f"rank 4 of inputs of rank 8 + 4 + 4 loses something; measured {measured}"
    # The report prints 4 significant digits; the two sides differ by float32 factor rounding (~1e-6).
    assert reported == pytest.approx(measured, rel=1e-3), (reported, measured)


def test_merged_files_load_in_core_lora_loader_with_every_key(comfy, ckpt_name, merged, caplog):
    from comfy_execution.graph_utils import GraphBuilder

    # The executor drops cached outputs of nodes the next prompt lacks: read ours first.
    ours = {name: applied(merged, name) for name in ("concat", "svd")}
    g = GraphBuilder(prefix="")
    ckpt = g.node("CheckpointLoaderSimple", id="ckpt", ckpt_name=ckpt_name)
    for name in ("concat", "svd"):
        core = g.node(
            "LoraLoader",
            id=f"core_{name}",
            model=ckpt.out(0),
            clip=ckpt.out(1),
            lora_name=f"{SUB}/merged_{name}.safetensors",
            strength_model=1.0,
            strength_clip=1.0,
        )
        pos = g.node("CLIPTextEncode", id=f"core_{name}_text", text="x", clip=core.out(1))
        g.node("PreviewAny", id=f"core_{name}_show", source=pos.out(0))
    with caplog.at_level(logging.WARNING):
        result = runner.run_prompt(comfy, g.finalize(), echo=False)
    unloaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith(UNLOADED)]
    assert unloaded == [], unloaded[:5]
    for name in ("concat", "svd"):
        core = applied(result, f"core_{name}")
        assert set(core) == set(ours[name])
        assert all(torch.equal(core[k], v) for k, v in ours[name].items()), f"{name}: core applies it differently"
