"""LoRA Merge through the executor, measured against stacking the same LoRAs in Apply LoRA Stack.

A merge with weights w_i targets exactly what stacking the LoRAs at strengths w_i applies. ComfyUI
applies a stack one patch at a time (W + s1*d1 + s2*d2 + s3*d3); a concat merge is one patch whose
factors are the concatenated ones. Same sums of products, different order: the results differ by
float32 rounding only, so these tests compare each patched weight's total delta with tolerances
sized from float32 epsilon, and the sampled latents with a tolerance measured on this model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from graphs import rows_json
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_file_nodes import branches, latents

from lora_workbench.headless import runner
from lora_workbench.headless.example_loras import write_example_lora
from lora_workbench.lora import keys as lora_keys

pytestmark = pytest.mark.slow

SUB = "lw_merge_tests"
WEIGHTS = (0.8, -0.5, 0.3)
EPS32 = torch.finfo(torch.float32).eps


LORA_EFFECT = 1e-2  # the three LoRAs move the latents by more than this share of their scale (asserted)


def latent_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the latents' scale (max |b|)."""
    return float((a - b).abs().max() / b.abs().max())


def _run(comfy, prompt):
    return runner.run_prompt(comfy, prompt, echo=False)


@pytest.fixture(scope="module")
def names(comfy, loras_dir) -> dict[str, str]:
    folder = loras_dir / SUB
    out = {}
    for key, seed, rank in (("a", 201, 8), ("b", 202, 8), ("c", 203, 8), ("r16", 204, 16)):
        write_example_lora(folder / f"{key}.safetensors", seed=seed, rank=rank, trigger=f"tok_{key}")
        out[key] = f"{SUB}/{key}.safetensors"
    # SDXL-shaped (cross-attention context 2048): the family comes from the shapes, not the metadata.
    xl = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{xl}.lora_down.weight": torch.randn(8, 2048), f"{xl}.lora_up.weight": torch.randn(640, 8)},
        str(folder / "xl.safetensors"),
    )
    out["xl"] = f"{SUB}/xl.safetensors"
    return out


def merge_node(g, node_id, names, method, rank=0):
    """LoRA Merge of a, b (from a LoRA Stack) and c (as adapter_1, through Load LoRA) at WEIGHTS."""
    stack = g.node(
        "LoraWorkbenchStack",
        id=f"{node_id}_stack",
        rows=rows_json([(names["a"], WEIGHTS[0], WEIGHTS[0]), (names["b"], WEIGHTS[1], WEIGHTS[1])]),
    )
    load = g.node("LoraWorkbenchLoad", id=f"{node_id}_load", lora_name=names["c"])
    return g.node(
        "LoraWorkbenchMerge",
        id=node_id,
        method=method,
        rank=rank,
        energy=0.0,
        lora_stack=stack.out(0),
        adapter_1=load.out(0),
        adapter_1_strength=WEIGHTS[2],
    )


def patch_deltas(patcher) -> dict[str, torch.Tensor]:
    """Each patched weight's total delta, by ComfyUI's own calculate_weight on a zero base (float32)."""
    import comfy.lora
    import comfy.utils

    out = {}
    for key, patches in patcher.patches.items():
        weight = comfy.utils.get_attr(patcher.model, key)
        out[key] = comfy.lora.calculate_weight(patches, torch.zeros(weight.shape, dtype=torch.float32), key)
    return out


def max_rel_diff(a: dict, b: dict) -> float:
    """max over weights of max|a - b| / max|a| (keys must agree)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)


@pytest.fixture(scope="module")
def merged_run(comfy, ckpt_name, names):
    """One run: stacked (a, b, c at WEIGHTS), concat merge, full-rank svd, base; plus an svd rank 4 merge saved."""

    def stacked(g, b, model, clip):
        stack = g.node(
            "LoraWorkbenchStack", id=f"{b}_stack", rows=rows_json([(names[k], w, w) for k, w in zip("abc", WEIGHTS)])
        )
        apply = g.node("LoraWorkbenchApplyStack", id=f"{b}_apply", model=model, clip=clip, lora_stack=stack.out(0))
        return apply.out(0), apply.out(1)

    def merged(method, rank=0):
        def patch(g, b, model, clip):
            merge = merge_node(g, f"{b}_merge", names, method, rank)
            apply = g.node(
                "LoraWorkbenchApplyStack",
                id=f"{b}_apply",
                model=model,
                clip=clip,
                adapter=merge.out(0),
                adapter_strength=1.0,
                adapter_strength_clip=1.0,
            )
            return apply.out(0), apply.out(1)

        return patch

    def extra(g):
        merge = merge_node(g, "svd4_merge", names, "svd", rank=4)
        g.node(
            "LoraWorkbenchSave",
            id="svd4_save",
            adapter=merge.out(0),
            filename=f"{SUB}/svd4",
            trigger_words="",
            overwrite=True,
        )

    result = _run(
        comfy,
        branches(
            ckpt_name,
            {"stacked": stacked, "concat": merged("concat"), "svd24": merged("svd", 24), "base": None},
            extra,
        ),
    )
    out = {"latents": latents(result, ["stacked", "concat", "svd24", "base"])}
    for b in ("stacked", "concat", "svd24"):
        out[b] = (patch_deltas(result.output(f"{b}_apply", 0)), patch_deltas(result.output(f"{b}_apply", 1).patcher))
    for b in ("concat", "svd24", "svd4"):
        out[f"{b}_adapter"] = result.output(f"{b}_merge", 0)
        out[f"{b}_report"] = result.output(f"{b}_merge", 1)
    out["svd4_path"] = Path(result.output("svd4_save"))
    return out


def test_concat_merge_equals_stacking(merged_run):
    ref_model, ref_clip = merged_run["stacked"]
    model, clip = merged_run["concat"]
    # Each delta element is a sum of 24 products (3 LoRAs x rank 8) accumulated in another order: float32
    # rounding is a few eps of the largest delta. Measured here: ~1e-7 relative; 16 eps (~2e-6) is the bound.
    assert max_rel_diff(ref_model, model) < 16 * EPS32
    assert max_rel_diff(ref_clip, clip) < 16 * EPS32
    assert len(ref_model) == 56 and len(ref_clip) == 48, "every attention projection of UNet and CLIP is patched"
    assert "method concat: 3 LoRA(s) -> rank 24" in merged_run["concat_report"], merged_run["concat_report"]
    lat = merged_run["latents"]
    # The weight differences above pass through 4 sampler steps of a random tiny model (latents ~100 in size).
    # Measured: ~7e-6 of the latent scale (max |diff| 8e-4 at max |latent| ~110). 1e-4 leaves room for other
    # BLAS builds and is still 100x below what the LoRAs change (LORA_EFFECT).
    assert latent_rel_diff(lat["concat"], lat["stacked"]) < 1e-4
    assert latent_rel_diff(lat["stacked"], lat["base"]) > LORA_EFFECT


def test_full_rank_svd_merge_equals_stacking(merged_run):
    ref_model, ref_clip = merged_run["stacked"]
    model, clip = merged_run["svd24"]
    # Rank 24 keeps every singular value of the exact sum; the QR/SVD round trip in float32 costs a few hundred
    # eps of the largest delta (measured ~1e-6 relative): 1e-5 is the bound.
    assert max_rel_diff(ref_model, model) < 1e-5
    assert max_rel_diff(ref_clip, clip) < 1e-5
    report = merged_run["svd24_report"]
    assert "method svd: 3 LoRA(s) -> rank 24" in report, report
    error = float(re.search(r"relative error \(Frobenius, all modules\): (\S+)", report).group(1))
    assert error < 1e-6, report
    lat = merged_run["latents"]
    # Measured ~2e-5 of the latent scale (the weights differ ~10x more than for concat); bound 1e-4 as above.
    assert latent_rel_diff(lat["svd24"], lat["stacked"]) < 1e-4


def _modules(tensors, metadata=None):
    return lora_keys.state_from_dict(dict(tensors), metadata).modules


def test_low_rank_svd_reports_the_error_it_made(merged_run, loras_dir, names):
    inputs = [_modules(load_file(str(loras_dir / names[k]))) for k in "abc"]
    adapter = merged_run["svd4_adapter"]
    merged = _modules(adapter, adapter.metadata)
    assert {m.rank for m in merged.values()} == {4}
    assert set(merged) == set(inputs[0])
    err_sq = total_sq = 0.0
    for name, m in merged.items():
        # The target: what stacking applies, computed from each input's own delta, in float64.
        target = sum(w * mods[name].delta().double() for w, mods in zip(WEIGHTS, inputs))
        err_sq += float(((target - m.delta().double()) ** 2).sum())
        total_sq += float((target**2).sum())
    measured = math.sqrt(err_sq / total_sq)
    assert 1e-3 < measured < 1, f"rank 4 of a rank-24 sum must lose something, measured {measured}"
    recorded = float(json.loads(adapter.metadata["lora_workbench.merge_report"])["overall_error"])
    # Both sides are exact up to float32 factor rounding (~1e-7 relative): 1e-4 relative is the brief's bound.
    assert recorded == pytest.approx(measured, rel=1e-4)
    report = merged_run["svd4_report"]
    printed = float(re.search(r"relative error \(Frobenius, all modules\): (\S+)", report).group(1))
    # The report prints 4 significant digits (".3e"): at most half a unit of the 4th digit off.
    assert printed == pytest.approx(measured, rel=5e-4), report
    with safe_open(str(merged_run["svd4_path"]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["lora_workbench.base_family"] == "sd1", meta
    assert '"method": "svd"' in meta["lora_workbench.merge_recipe"], meta["lora_workbench.merge_recipe"]


def _merge_error(comfy, rows, method) -> str:
    from comfy_execution.graph_utils import GraphBuilder

    g = GraphBuilder(prefix="")
    stack = g.node("LoraWorkbenchStack", id="stack", rows=rows_json(rows))
    merge = g.node("LoraWorkbenchMerge", id="merge", method=method, rank=0, energy=0.0, lora_stack=stack.out(0))
    g.node(
        "LoraWorkbenchSave",
        id="save",
        adapter=merge.out(0),
        filename=f"{SUB}/never_written",
        trigger_words="",
        overwrite=True,
    )
    with pytest.raises(runner.WorkflowError) as err:
        _run(comfy, g.finalize())
    return str(err.value)


def test_linear_merge_of_different_ranks_is_refused(comfy, loras_dir, names):
    message = _merge_error(comfy, [(names["a"], 1.0, 1.0), (names["r16"], 1.0, 1.0)], "linear")
    assert "linear merge needs equal ranks" in message, message
    assert f"8 ({names['a']})" in message and f"16 ({names['r16']})" in message, message
    assert "use concat" in message
    assert not (loras_dir / SUB / "never_written.safetensors").exists()


def test_merge_of_sdxl_and_sd1_loras_is_refused(comfy, loras_dir, names):
    message = _merge_error(comfy, [(names["a"], 1.0, 1.0), (names["xl"], 1.0, 1.0)], "concat")
    assert "different base model families" in message, message
    assert f"{names['a']} is sd1" in message and f"{names['xl']} is sdxl" in message, message
    assert not (loras_dir / SUB / "never_written.safetensors").exists()
