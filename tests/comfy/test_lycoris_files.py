"""LyCORIS LoHa and LoKr files written by ``lycoris-lora`` itself, through our nodes in ComfyUI's executor.

Info describes them; Save writes them back bit for bit; Apply LoRA Stack, Convert and Merge give ComfyUI (core
Load LoRA for the written files) exactly the changes computed independently in ``lycoris_files`` (float64, from
the file's tensors), and a rank-limited Convert/Merge reports the error an independent measurement finds.
Tolerance: ComfyUI rebuilds each change in float32 from float32 factors (four of them for LoHa); against float64
that is ~1e-7 of the largest entry, so 1e-5 bounds it and still fails a wrong scale (2x here) or layout.
"""

from __future__ import annotations

import json
import logging
import math
import struct

import lycoris_files
import pytest
import tool_files
import torch
from graphs import rows_json
from safetensors import safe_open
from safetensors.torch import load_file

from lora_workbench.headless import runner

pytestmark = pytest.mark.slow

SUB = "lw_lycoris"
UNLOADED = "lora key not loaded: "
TOLERANCE = 1e-5  # see the module docstring
META = {"modelspec.trigger_phrase": "sks toy", "ss_output_name": "made_by_lycoris"}


def _builder():
    from comfy_execution.graph_utils import GraphBuilder  # importable once the `comfy` fixture ran

    return GraphBuilder(prefix="")


@pytest.fixture(scope="module")
def files(comfy, loras_dir) -> dict:
    """name in models/loras -> expected change per ComfyUI weight key, for a LoHa and a LoKr file."""
    unet_map = tool_files.diffusers_unet_to_comfy()
    out = {}
    for algo, kwargs in (("loha", {}), ("lokr", {"factor": 8})):
        path = lycoris_files.write_lycoris_file(loras_dir / SUB / f"{algo}.safetensors", algo, metadata=META, **kwargs)
        deltas = lycoris_files.expected_deltas(path)
        out[f"{SUB}/{path.name}"] = {lycoris_files.comfy_key(n, unet_map): d for n, d in deltas.items()}
    return out


def _core_load(g, ckpt, names) -> list[str]:
    """Add a core LoraLoader per file name (and an output node each); return their node ids."""
    ids = []
    for i, name in enumerate(names):
        core = g.node(
            "LoraLoader",
            id=f"core_{i}",
            model=ckpt.out(0),
            clip=ckpt.out(1),
            lora_name=name,
            strength_model=1.0,
            strength_clip=1.0,
        )
        g.node("PreviewAny", id=f"core_{i}_show", source=core.out(0))
        ids.append(f"core_{i}")
    return ids


def _error(applied: dict, expected: dict) -> float:
    """sqrt(sum ||applied - expected||^2) / sqrt(sum ||expected||^2) over the expected weights."""
    assert set(applied) == set(expected), f"{len(applied)} weights patched, {len(expected)} expected"
    err2 = sum(float(((applied[k].reshape(e.shape) - e) ** 2).sum()) for k, e in expected.items())
    return math.sqrt(err2 / sum(float((e**2).sum()) for e in expected.values()))


def test_info_describes_loha_and_lokr(comfy, files):
    g = _builder()
    for i, name in enumerate(files):
        g.node("LoraWorkbenchInfo", id=f"info_{i}", lora_name=name)
    result = runner.run_prompt(comfy, g.finalize(), echo=False)
    for i, algo in enumerate(("loha", "lokr")):
        text = result.output(f"info_{i}", 0)
        for line in (f"algorithm: {algo}", "modules: 113", "ranks: [4]", "alphas: [2.0]", "family: sd1"):
            assert line in text, text
        assert result.output(f"info_{i}", 1) == "sks toy"


def test_save_writes_the_file_as_read(comfy, loras_dir, files):
    g = _builder()
    for i, name in enumerate(files):
        load = g.node("LoraWorkbenchLoad", id=f"load_{i}", lora_name=name)
        g.node(
            "LoraWorkbenchSave",
            id=f"save_{i}",
            adapter=load.out(0),
            filename=f"{SUB}/saved_{i}",
            trigger_words="",
            overwrite=True,
        )
    runner.run_prompt(comfy, g.finalize(), echo=False)
    for i, name in enumerate(files):
        original, saved = loras_dir / name, loras_dir / SUB / f"saved_{i}.safetensors"
        a, b = load_file(str(original)), load_file(str(saved))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        with safe_open(str(original), "pt") as f, safe_open(str(saved), "pt") as h:
            assert f.metadata() == h.metadata()
        # The tensor bytes are identical, and so is the header as JSON. Not compared byte for byte: safetensors
        # writes the metadata map in hash order, which differs between processes, for LyCORIS' own save too.
        (ha, da), (hb, db) = _split(original.read_bytes()), _split(saved.read_bytes())
        assert ha == hb and da == db, "same header (tensors, dtypes, offsets, metadata) and bit-identical data"


def _split(raw: bytes) -> tuple[dict, bytes]:
    """A safetensors file -> (its header as JSON, its data bytes)."""
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_apply_stack_patches_every_layer_exactly(comfy, ckpt_name, files):
    for name, expected in files.items():
        g = _builder()
        ckpt = g.node("CheckpointLoaderSimple", id="ckpt", ckpt_name=ckpt_name)
        stack = g.node("LoraWorkbenchStack", id="stack", rows=rows_json([(name, 1.0, 1.0)]))
        apply = g.node(
            "LoraWorkbenchApplyStack", id="apply", model=ckpt.out(0), clip=ckpt.out(1), lora_stack=stack.out(0)
        )
        g.node("PreviewAny", id="show", source=apply.out(3))
        result = runner.run_prompt(comfy, g.finalize(), echo=False)
        assert "patched 113 model and 0 CLIP weights" in result.output("apply", 3)
        worst = tool_files.compare(tool_files.applied_deltas(result.output("apply", 0)), expected)
        assert worst < TOLERANCE, f"{name}: {worst}"


def test_convert_exact_and_to_a_rank_loads_in_core_with_every_key(comfy, ckpt_name, files, caplog):
    g = _builder()
    names = list(files)
    for i, name in enumerate(names):
        for rank in (0, 8):
            g.node(
                "LoraWorkbenchConvert",
                id=f"convert_{i}_{rank}",
                lora_name=name,
                format="kohya",
                filename=f"{SUB}/converted_{i}_{rank}",
                overwrite=True,
                rank=rank,
            )
    first = runner.run_prompt(comfy, g.finalize(), echo=False)
    written = [(f"{SUB}/converted_{i}_{r}.safetensors", i, r) for i in range(len(names)) for r in (0, 8)]

    g = _builder()
    ckpt = g.node("CheckpointLoaderSimple", id="ckpt", ckpt_name=ckpt_name)
    ids = _core_load(g, ckpt, [w[0] for w in written])
    with caplog.at_level(logging.WARNING):
        result = runner.run_prompt(comfy, g.finalize(), echo=False)
    unloaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith(UNLOADED)]
    assert unloaded == [], unloaded[:5]
    for node, (file, i, rank) in zip(ids, written):
        expected = files[names[i]]
        applied = tool_files.applied_deltas(result.output(node, 0))
        report = first.ui_outputs[f"convert_{i}_{rank}"]["text"][1]
        if rank == 0:
            worst = tool_files.compare(applied, expected)
            print(f"MEASURE {file}: exact, largest relative delta error {worst:.2e}")
            assert worst < TOLERANCE and "relative error 0" in report, (worst, report)
        else:
            measured = _error(applied, expected)
            reported = float(report.rsplit(" ", 1)[1])
            print(f"MEASURE {file}: rank 8, reported {reported:.4e}, measured {measured:.4e}")
            assert measured > 0.01 and abs(reported - measured) < 1e-3 * measured, (reported, measured)
            assert {t.shape[0] for k, t in load_file(str(comfy.base / "models" / "loras" / file)).items()
                    if k.endswith("lora_down.weight")} == {8}  # fmt: skip


def test_merge_of_loha_and_lokr_is_their_stacked_sum(comfy, ckpt_name, files, caplog):
    (loha, loha_exp), (lokr, lokr_exp) = files.items()
    expected = {k: 0.6 * loha_exp[k] + 0.8 * lokr_exp[k] for k in loha_exp}
    g = _builder()
    stack = g.node("LoraWorkbenchStack", id="stack", rows=rows_json([(loha, 0.6, 0.6), (lokr, 0.8, 0.8)]))
    for method, rank in (("concat", 0), ("svd", 16)):
        merged = g.node(
            "LoraWorkbenchMerge", id=f"merge_{method}", method=method, rank=rank, energy=0.0, lora_stack=stack.out(0)
        )
        g.node("PreviewAny", id=f"merge_{method}_show", source=merged.out(1))
        g.node(
            "LoraWorkbenchSave",
            id=f"save_{method}",
            adapter=merged.out(0),
            filename=f"{SUB}/merged_{method}",
            trigger_words="",
            overwrite=True,
        )
    first = runner.run_prompt(comfy, g.finalize(), echo=False)

    g = _builder()
    ckpt = g.node("CheckpointLoaderSimple", id="ckpt", ckpt_name=ckpt_name)
    ids = _core_load(g, ckpt, [f"{SUB}/merged_concat.safetensors", f"{SUB}/merged_svd.safetensors"])
    with caplog.at_level(logging.WARNING):
        result = runner.run_prompt(comfy, g.finalize(), echo=False)
    unloaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith(UNLOADED)]
    assert unloaded == [], unloaded[:5]
    concat = tool_files.compare(tool_files.applied_deltas(result.output(ids[0], 0)), expected)
    assert concat < TOLERANCE, concat
    measured = _error(tool_files.applied_deltas(result.output(ids[1], 0)), expected)
    report = first.ui_outputs["merge_svd_show"]["text"][0]
    reported = float(report.split("relative error (Frobenius, all modules): ")[1].split()[0])
    print(f"MEASURE merge loha x0.6 + lokr x0.8: concat {concat:.2e}; svd rank 16 reported {reported:.4e}, "
          f"measured {measured:.4e}")  # fmt: skip
    assert measured > 0.01 and abs(reported - measured) < 1e-3 * measured, (reported, measured)
