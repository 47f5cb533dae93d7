"""LoRA as data: Load / Save / Convert / Info against core ComfyUI loaders, through the executor.

Every comparison is measured on the tiny SD1.5-shaped model: sampled latents of a 64x64, 4-step
graph. Several branches share one prompt (one checkpoint load, one run) to keep the suite lean.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from graphs import SAMPLER
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_workbench.headless import comfy_compat, runner
from lora_workbench.headless.example_loras import random_lora_tensors, write_example_lora
from lora_workbench.headless.tiny_model import UNET_CONFIG
from lora_workbench.lora import keys as lora_keys

pytestmark = pytest.mark.slow

SUB = "lw_file_tests"  # our files live in models/loras/<SUB>/, apart from other modules' files
UNLOADED = "lora key not loaded: "


# ----------------------------------------------------------------------------------------- helpers


def _run(comfy, prompt: dict) -> runner.RunResult:
    return runner.run_prompt(comfy, prompt, echo=False)


def _builder():
    from comfy_execution.graph_utils import GraphBuilder  # importable once the `comfy` fixture ran

    return GraphBuilder(prefix="")


def branches(ckpt_name: str, patches: dict, extra=None) -> dict:
    """A prompt with one sampler per branch (``<branch>_sampler``), all from one checkpoint and one latent.

    ``patches[branch](g, branch, model, clip) -> (model, clip)`` inserts LoRA nodes (None: the bare model);
    ``extra(g)`` adds other nodes (e.g. output nodes whose values a test reads).
    """
    g = _builder()
    ckpt = g.node("CheckpointLoaderSimple", id="ckpt", ckpt_name=ckpt_name)
    latent = g.node("EmptyLatentImage", id="latent", width=64, height=64, batch_size=1)
    for b, patch in patches.items():
        model, clip = ckpt.out(0), ckpt.out(1)
        if patch is not None:
            model, clip = patch(g, b, model, clip)
        pos = g.node("CLIPTextEncode", id=f"{b}_pos", text="a photo of a dog", clip=clip)
        neg = g.node("CLIPTextEncode", id=f"{b}_neg", text="", clip=clip)
        ks = g.node(
            "KSampler",
            id=f"{b}_sampler",
            model=model,
            positive=pos.out(0),
            negative=neg.out(0),
            latent_image=latent.out(0),
            **SAMPLER,
        )
        g.node("SaveLatent", id=f"{b}_save", samples=ks.out(0), filename_prefix=f"{SUB}/{b}")
    if extra is not None:
        extra(g)
    return g.finalize()


def latents(result: runner.RunResult, names) -> dict[str, torch.Tensor]:
    return {b: result.output(f"{b}_sampler")["samples"] for b in names}


def core_loader(name, sm=1.0, sc=1.0):
    def patch(g, b, model, clip):
        node = g.node(
            "LoraLoader", id=f"{b}_lora", model=model, clip=clip, lora_name=name, strength_model=sm, strength_clip=sc
        )
        return node.out(0), node.out(1)

    return patch


def our_adapter(name, strength=1.0, strength_clip=1.0, with_clip=True):
    """Load LoRA as Adapter -> Apply LoRA Stack's ``adapter`` input."""

    def patch(g, b, model, clip):
        load = g.node("LoraWorkbenchLoad", id=f"{b}_load", lora_name=name)
        inputs = dict(model=model, adapter=load.out(0), adapter_strength=strength, adapter_strength_clip=strength_clip)
        if with_clip:
            inputs["clip"] = clip
        apply = g.node("LoraWorkbenchApplyStack", id=f"{b}_apply", **inputs)
        return apply.out(0), (apply.out(1) if with_clip else clip)

    return patch


def unloaded_keys(caplog) -> list[str]:
    return [r.getMessage()[len(UNLOADED) :] for r in caplog.records if r.getMessage().startswith(UNLOADED)]


def rel(path: Path, loras_dir: Path) -> str:
    """The name ComfyUI's loras combo lists for a file under models/loras."""
    return path.relative_to(loras_dir).as_posix()


def read_metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def module_counts(path) -> tuple[int, int]:
    """(UNet modules, text-encoder modules) of a kohya file."""
    names = {k.split(".")[0] for k in load_file(str(path))}
    return sum(n.startswith("lora_unet_") for n in names), sum(n.startswith("lora_te") for n in names)


def native_mapping() -> dict[str, str]:
    """kohya name (diffusers paths) -> ComfyUI model key, from ComfyUI's own unet_to_diffusers table."""
    import comfy.utils

    config = dict(UNET_CONFIG)
    config["num_res_blocks"] = list(config["num_res_blocks"])
    out = {}
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(config).items():
        if diffusers_key.endswith(".weight"):
            out["lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")] = "diffusion_model." + ldm_key
    return out


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(comfy, loras_dir) -> dict[str, str]:
    """Example LoRAs (random kohya files for the tiny model, UNet + CLIP-L attention), by role."""
    folder = loras_dir / SUB
    out = {}
    for key, seed, rank in (("a", 101, 8), ("b", 102, 8), ("c", 103, 8), ("r16", 104, 16)):
        path = write_example_lora(folder / f"{key}.safetensors", seed=seed, rank=rank, trigger=f"tok_{key}")
        out[key] = rel(path, loras_dir)
    # alpha 4 at rank 8 (scale 0.5): a conversion that drops alpha changes the output by 2x.
    path = folder / "alpha4.safetensors"
    meta = {"ss_network_dim": "8", "ss_network_alpha": "4", "ss_base_model_version": "sd_v1"}
    save_file(random_lora_tensors(105, 8, alpha=4.0), str(path), metadata=meta)
    out["alpha4"] = rel(path, loras_dir)
    # The same tensors as "b" but tagged SDXL in its metadata.
    path = folder / "tagged_sdxl.safetensors"
    save_file(random_lora_tensors(102, 8), str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    out["sdxl"] = rel(path, loras_dir)
    return out


@pytest.fixture(scope="module")
def saved_a(comfy, loras_dir, files) -> Path:
    """Load LoRA (a) -> Save LoRA with trigger words: the saved file."""
    g = _builder()
    load = g.node("LoraWorkbenchLoad", id="load", lora_name=files["a"])
    g.node(
        "LoraWorkbenchSave",
        id="save",
        adapter=load.out(0),
        filename=f"{SUB}/saved_a",
        trigger_words="tok_a, red hat",
        overwrite=False,
    )
    result = _run(comfy, g.finalize())
    path = Path(result.output("save"))
    assert path == (loras_dir / SUB / "saved_a.safetensors").resolve()
    return path


# ---------------------------------------------------------------- 1. Save LoRA -> core LoraLoader


def test_saved_file_through_core_loader_equals_in_graph_adapter(comfy, ckpt_name, loras_dir, files, saved_a, caplog):
    prompt = branches(
        ckpt_name,
        {"ours": our_adapter(files["a"]), "core": core_loader(rel(saved_a, loras_dir)), "base": None},
    )
    with caplog.at_level(logging.WARNING):
        result = _run(comfy, prompt)
    lat = latents(result, ["ours", "core", "base"])
    report = result.output("ours_apply", 3)
    # Same factors, same ComfyUI patch code, same order of operations: bit-for-bit equal.
    assert torch.equal(lat["ours"], lat["core"]), f"max diff {(lat['ours'] - lat['core']).abs().max()}"
    assert not torch.equal(lat["ours"], lat["base"]), "the LoRA changed nothing: the comparison proves nothing"
    assert unloaded_keys(caplog) == [], (
        f"core LoraLoader left keys of the saved file unloaded: {unloaded_keys(caplog)[:5]}"
    )
    n_unet, n_te = module_counts(saved_a)
    assert (n_unet, n_te) == (56, 48), "tiny UNet: 7 transformer blocks x 2 attentions x q/k/v/out; CLIP-L: 12 x 4"
    assert f"patched {n_unet} model and {n_te} CLIP weights" in report, report
    assert "matched nothing" not in report, report


def test_saved_file_metadata_and_tensors(files, loras_dir, saved_a):
    meta = read_metadata(saved_a)
    assert meta["modelspec.trigger_phrase"] == "tok_a, red hat"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8", meta
    assert meta["lora_workbench.rank"] == "8" and meta["lora_workbench.alpha"] == "8", meta
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_base_model_version"] == "sd_v1", "the source file's base model must be kept"
    original = load_file(str(loras_dir / files["a"]))
    saved = load_file(str(saved_a))
    assert set(saved) == set(original)
    for k in original:
        assert torch.equal(saved[k], original[k]), k


def test_save_refuses_overwrite_unless_asked(comfy, loras_dir, files, saved_a):
    def save(lora, words, overwrite):
        g = _builder()
        load = g.node("LoraWorkbenchLoad", id="load", lora_name=files[lora])
        g.node(
            "LoraWorkbenchSave",
            id="save",
            adapter=load.out(0),
            filename=f"{SUB}/overwrite_me",
            trigger_words=words,
            overwrite=overwrite,
        )
        return _run(comfy, g.finalize())

    target = loras_dir / SUB / "overwrite_me.safetensors"
    save("a", "first", False)
    assert read_metadata(target)["modelspec.trigger_phrase"] == "first"
    with pytest.raises(runner.WorkflowError) as err:
        save("b", "second", False)
    assert "overwrite_me.safetensors" in str(err.value) and "already exists" in str(err.value), str(err.value)
    assert read_metadata(target)["modelspec.trigger_phrase"] == "first", "a refused save must not touch the file"
    save("b", "second", True)
    assert read_metadata(target)["modelspec.trigger_phrase"] == "second"
    written, b = load_file(str(target)), load_file(str(loras_dir / files["b"]))
    assert all(torch.equal(written[k], b[k]) for k in b), "overwrite=True must write the new adapter"


@pytest.mark.parametrize("filename", ["../escaped", f"{SUB}/../../escaped", "/tmp/escaped"])
def test_save_refuses_names_outside_the_loras_folder(comfy, loras_dir, files, filename):
    g = _builder()
    load = g.node("LoraWorkbenchLoad", id="load", lora_name=files["a"])
    g.node("LoraWorkbenchSave", id="save", adapter=load.out(0), filename=filename, trigger_words="", overwrite=True)
    with pytest.raises(runner.WorkflowError, match="outside the loras folder"):
        _run(comfy, g.finalize())
    assert not (loras_dir.parent / "escaped.safetensors").exists()
    assert not Path("/tmp/escaped.safetensors").exists()


# ----------------------------------------------------------------------------- 2. core interop


def test_core_lora_model_loader_equals_apply_with_clip_strength_zero(comfy, ckpt_name, files, caplog):
    # Newer ComfyUI (0.33) has a required `bypass` input; off is the patching the test compares with.
    bypass = {"bypass": False} if "bypass" in comfy_compat.input_names(comfy.node_classes["LoraModelLoader"]) else {}

    def core_model_loader(g, b, model, clip):
        load = g.node("LoraWorkbenchLoad", id=f"{b}_load", lora_name=files["a"])
        node = g.node("LoraModelLoader", id=f"{b}_core", model=model, lora=load.out(0), strength_model=0.7, **bypass)
        return node.out(0), clip

    prompt = branches(
        ckpt_name,
        {
            "core": core_model_loader,
            "clip0": our_adapter(files["a"], 0.7, 0.0),
            "noclip": our_adapter(files["a"], 0.7, with_clip=False),
            "base": None,
        },
    )
    with caplog.at_level(logging.WARNING):
        result = _run(comfy, prompt)
    lat = latents(result, ["core", "clip0", "noclip", "base"])
    # Core's LoraModelLoader is load_lora_for_models(model, None, lora, s, 0): the same patches as ours.
    assert torch.equal(lat["core"], lat["clip0"]), f"max diff {(lat['core'] - lat['clip0']).abs().max()}"
    assert torch.equal(lat["core"], lat["noclip"]), f"max diff {(lat['core'] - lat['noclip']).abs().max()}"
    assert not torch.equal(lat["core"], lat["base"])
    # Core has no CLIP to patch, so it warns once per CLIP key (48 modules x down/up/alpha). This also shows the
    # capture of ComfyUI's warnings works, which the zero-warning assertions elsewhere rely on.
    warned = unloaded_keys(caplog)
    assert len(warned) == 48 * 3 and all(k.startswith("lora_te_") for k in warned), warned[:5]
    # Ours reports the CLIP part it could not apply (its 144 tensor keys) instead of warning per key.
    report = result.output("noclip_apply", 3)
    assert "144 key(s) matched nothing: lora_te_" in report, report


def test_core_save_lora_accepts_our_adapter(comfy, ckpt_name, loras_dir, files):
    import folder_paths

    out_dir = Path(folder_paths.get_output_directory()) / SUB
    before = set(out_dir.glob("core_saved_*.safetensors"))

    def extra(g):
        load = g.node("LoraWorkbenchLoad", id="x_load", lora_name=files["b"])
        g.node("SaveLoRA", id="x_core_save", lora=load.out(0), prefix=f"{SUB}/core_saved")

    _run(comfy, branches(ckpt_name, {}, extra))
    written = sorted(set(out_dir.glob("core_saved_*.safetensors")) - before)
    assert len(written) == 1, f"core SaveLoRA wrote {written}"
    original = load_file(str(loras_dir / files["b"]))
    saved = load_file(str(written[0]))
    assert set(saved) == set(original) and all(torch.equal(saved[k], original[k]) for k in original)
    # Our Load reads models/loras; the copy is what a user would do with core's output file.
    copy = loras_dir / SUB / "from_core_save.safetensors"
    shutil.copyfile(written[0], copy)
    result = _run(
        comfy, branches(ckpt_name, {"orig": our_adapter(files["b"]), "core": our_adapter(rel(copy, loras_dir))})
    )
    lat = latents(result, ["orig", "core"])
    assert torch.equal(lat["orig"], lat["core"]), f"max diff {(lat['orig'] - lat['core']).abs().max()}"


def test_comfy_native_file_is_read_by_info_and_convert(comfy, ckpt_name, loras_dir, files, caplog):
    # A file in core TrainLoraNode's key form: diffusion_model.<ldm path>.lora_down/lora_up/alpha, and
    # text_encoders.clip_l.transformer.<path> for CLIP (ComfyUI's generic text-encoder form).
    tensors = load_file(str(loras_dir / files["alpha4"]))
    state = lora_keys.state_from_dict(tensors, source="alpha4")
    mapping = native_mapping()

    def to_model_path(name: str) -> str:
        return mapping[name] if name.startswith("lora_unet_") else lora_keys._default_model_path(name)

    native = lora_keys.to_comfy_native_dict(state, to_model_path)
    assert any(k.startswith("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.") for k in native)
    native_path = loras_dir / SUB / "native.safetensors"
    save_file(native, str(native_path))
    native_name = rel(native_path, loras_dir)

    def extra(g):
        g.node(
            "LoraWorkbenchConvert",
            id="x_convert",
            lora_name=native_name,
            format="kohya",
            filename=f"{SUB}/native_to_kohya",
            overwrite=True,
        )
        g.node("LoraWorkbenchInfo", id="x_info", lora_name=native_name)
        # With MODEL and CLIP, Info reads only the file's header and still counts what ComfyUI patches.
        ckpt = g.lookup_node("ckpt")
        for key, name in (("native", native_name), ("kohya", files["alpha4"])):
            g.node("LoraWorkbenchInfo", id=f"x_match_{key}", lora_name=name, model=ckpt.out(0), clip=ckpt.out(1))

    result = _run(comfy, branches(ckpt_name, {}, extra))
    for key in ("native", "kohya"):
        matched = result.output(f"x_match_{key}")
        assert "matches 56 model weights and 48 CLIP weights" in matched and "match nothing" not in matched, matched
    info = result.output("x_info")
    assert "format: comfy_native" in info, info
    assert "modules: 104" in info and "unet_modules: 56" in info and "te_modules: 48" in info, info
    assert "ranks: [8]" in info and "alphas: [4.0]" in info and "family: sd1" in info, info
    converted = Path(result.output("x_convert"))
    assert lora_keys.detect_format(load_file(str(converted))) == lora_keys.KeyFormat.KOHYA

    patches = {
        "orig": core_loader(files["alpha4"]),
        "native": core_loader(native_name),
        "kohya": core_loader(rel(converted, loras_dir)),
        "ours": our_adapter(native_name),
    }
    with caplog.at_level(logging.WARNING):
        result = _run(comfy, branches(ckpt_name, patches))
    lat = latents(result, patches)
    for b in ("native", "kohya", "ours"):
        # Same factors and alpha on the same weights: ComfyUI computes identical patches.
        assert torch.equal(lat["orig"], lat[b]), f"{b}: max diff {(lat['orig'] - lat[b]).abs().max()}"
    assert unloaded_keys(caplog) == [], unloaded_keys(caplog)[:5]


# ----------------------------------------------------------------------------------- 3. Convert


def test_convert_kohya_to_peft_and_back(comfy, ckpt_name, loras_dir, files, caplog):
    def convert(name, fmt, filename):
        g = _builder()
        g.node(
            "LoraWorkbenchConvert",
            id="convert",
            lora_name=name,
            format=fmt,
            filename=f"{SUB}/{filename}",
            overwrite=True,
        )
        return Path(_run(comfy, g.finalize()).output("convert"))

    peft_path = convert(files["alpha4"], "peft", "alpha4_peft")
    peft_sd = load_file(str(peft_path))
    assert lora_keys.detect_format(peft_sd) == lora_keys.KeyFormat.DIFFUSERS
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in peft_sd
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in peft_sd
    assert not any(k.endswith(".alpha") for k in peft_sd), "peft files carry alpha in metadata, not tensors"
    back_path = convert(rel(peft_path, loras_dir), "kohya", "alpha4_back")
    original, back = load_file(str(loras_dir / files["alpha4"])), load_file(str(back_path))
    assert set(back) == set(original)
    for k in original:
        assert torch.equal(back[k], original[k]), k  # includes the .alpha tensors (4.0, from the peft metadata)

    patches = {"orig": core_loader(files["alpha4"]), "back": core_loader(rel(back_path, loras_dir))}
    with caplog.at_level(logging.WARNING):
        result = _run(comfy, branches(ckpt_name, patches))
    lat = latents(result, patches)
    assert torch.equal(lat["orig"], lat["back"]), f"max diff {(lat['orig'] - lat['back']).abs().max()}"
    assert unloaded_keys(caplog) == []


def test_core_lora_loader_reads_only_the_clip_part_of_a_peft_file(comfy, ckpt_name, loras_dir, files, caplog):
    """What ComfyUI 0.3.75 does with a diffusers/peft SD1 file (asserted so a change shows up).

    Its SD1 key map knows ``text_encoder.text_model.encoder.layers.N.<proj>`` (diffusers CLIP names) but for
    the UNet only ``[unet.]<path>.processor.to_q`` style names (the old attention-processor format), so
    ``unet.<path>.to_q.lora_A.weight`` matches nothing; and it ignores diffusers' ``lora_adapter_metadata``,
    so alphas fall back to the rank. A peft file from Convert LoRA is for diffusers; ComfyUI users want kohya.
    """
    g = _builder()
    g.node(
        "LoraWorkbenchConvert",
        id="convert",
        lora_name=files["a"],
        format="peft",
        filename=f"{SUB}/a_peft",
        overwrite=True,
    )
    peft_name = rel(Path(_run(comfy, g.finalize()).output("convert")), loras_dir)
    patches = {
        "peft": core_loader(peft_name),
        "clip_only": core_loader(files["a"], 0.0, 1.0),  # a has alpha = rank, so alpha loss cannot matter here
        "full": core_loader(files["a"]),
    }
    with caplog.at_level(logging.WARNING):
        result = _run(comfy, branches(ckpt_name, patches))
    lat = latents(result, patches)
    warned = unloaded_keys(caplog)
    assert len(warned) == 56 * 2 and all(k.startswith("unet.") for k in warned), warned[:5]
    assert torch.equal(lat["peft"], lat["clip_only"]), "core applied the peft file's CLIP part only"
    assert not torch.equal(lat["peft"], lat["full"])
