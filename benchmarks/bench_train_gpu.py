"""GPU script (issue 9): peak VRAM and step time of LoRA training on real-size SD1.5 and SDXL: ours vs ComfyUI core.

Written for a machine with an NVIDIA GPU (an H200 when the ``device`` tool lends one; no network, nothing
downloaded); ``--device cpu --tiny`` runs the same code end to end on shrunken models, to check the script here.

Models, built in each process from ComfyUI's own configs with random weights (no checkpoint exists here), under
``torch.inference_mode`` as ComfyUI's executor runs a loader:

- ``sd15``: ``comfy.supported_models.SD15`` with the real UNet config (859.5 M parameters; ComfyUI's detection is
  checked to call it SD15) and the real-size CLIP-L (123.7 M);
- ``sdxl``: ``comfy.supported_models.SDXL`` with the real UNet config (2567.5 M) and real-size CLIP-L + CLIP-G
  (123.7 M + 694.7 M).

The UNet's dtype is what ComfyUI's checkpoint loader picks for an fp16 checkpoint (``model_management.unet_dtype``
/ ``unet_manual_cast``: expected fp16 on an H200, fp32 on a CPU; ``--unet-dtype`` forces one), the text encoders'
ComfyUI's text-encoder dtype (fp16); on a GPU all are built on it (random initialisation takes seconds there).
Every weight is initialised (torch's default init, norms to identity: ``headless.tiny_model._initialise``). What
differs from a real model: the weight values, and the VAE, a TAESD of ComfyUI's class (same 8x downscale and 4
latent channels, so the latents have the real sizes: 64x64 for SD1.5 at 512 px, 128x128 for SDXL at 1024 px; the
VAE only encodes, before training).

Sides, each in a fresh process (``bench_train_memory.train_comfy_side`` runs both nodes as that benchmark does):

- ours: our Train LoRA node, default targets (attention projections), rank 16, precision bf16 (autocast; LoRA in
  fp32; the base stays in ComfyUI's dtype, with loss scaling when that is fp16), gradient checkpointing off / on;
- core: ComfyUI core's TrainLoraNode (LoRA on every weight of 2+ dims plus diffs of 1-D weights and biases, its
  only choice), rank 16, training_dtype bf16, lora_dtype fp32 (``--core-lora-dtype``), checkpointing off / on.

Both get the 8 example images (examples/train_images) with their captions at the model's resolution, batch 1,
AdamW, learning rate 1e-4, alpha 1 (core's fixed value). The settings table marks every difference.

Measured per run, in the window from the start of training (ours: ``ComfyModelApi.prepare_for_training``, after
the node encoded images and captions; core: just before the node, after this script encoded them) to the end of
the last step: the peak of ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start ("extra"),
with the UNet alone resident: at the start the script moves every other model (text encoders, VAE) off the GPU
through ComfyUI's ``free_memory`` on both sides (core's own loading does the same). Also the absolute peak, and
"x UNet": extra / the UNet's bytes as loaded. Step time: the time between the starts of consecutive UNet forward
passes (CUDA synchronised), after ``--warmup`` steps; the median over ``--steps`` timed steps per run (one more
step is run to close the last interval). On the CPU (``--device cpu``) the memory figures are RSS instead.

The budget (``--budget``, default 300 s of wall time) runs every configuration once, checkpointing off first,
lowering the timed steps (to at least 3) from the second process on where the costs measured so far say the rest
would not fit, and leaving out (named in the output) a run that would not fit even so; then it adds repeats
(fresh processes, sides alternating) while a whole repeat still fits, up to ``--repeats``. A failed run (out of
memory, a missing package) is reported with the end of its error output, and the others go on.

On a GPU machine (an H200 lent by ``device``: its python3 has torch, transformers, peft, safetensors ...):

    python3 benchmarks/bench_train_gpu.py --device cuda            # sd15 + sdxl, 300 s budget
    python3 benchmarks/bench_train_gpu.py --device cuda --models sd15 --budget 120

It needs the pinned ComfyUI tree (``.cache/comfyui/0.3.75``, 25 MB; ``comfy_env.comfyui_path``) and wheels of what
that machine lacks (ComfyUI 0.3.75 imports them at start; the script names any missing one before it starts),
about 10 MB for Python 3.12, fetched here into a git-ignored ``.whl`` (device README):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        torchsde==0.2.6 trampoline==0.1.2 kornia==0.9.0 kornia_rs==0.2.0 spandrel==0.4.2 pydantic==2.14.4 \
        pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 \
        typing-inspection==0.4.5

then the device tool's ``run`` with ``carry=[".cache/comfyui/0.3.75", ".whl"]`` and ``timeout_s`` 480:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit
    PYTHONUNBUFFERED=1 python3 benchmarks/bench_train_gpu.py --device cuda 2>&1 | tee $OUT/bench_train_gpu.log

PyAV (``av``, a 36 MB wheel, which would pass the 64 MiB the tool carries) may stay behind: ComfyUI imports it for
its video nodes only, and the script puts placeholder modules in its place. The package need not be installed
either: the script puts a ``lora_workbench`` link to this checkout on ``sys.path`` when it is not importable.

Checks on a CPU machine (``--tiny``: 4 M-parameter UNets of the same classes with small text encoders; each
process spends 10-30 s importing ComfyUI, so the 8 runs take a few minutes on 2 cores, more when they are busy;
``--precision fp32`` because many CPUs run bf16 slowly; ``--size 32`` px):

    .venv/bin/python benchmarks/bench_train_gpu.py --device cpu --tiny --precision fp32 --size 32 --steps 3 \
        --warmup 1 --repeats 1
    .venv/bin/python benchmarks/bench_train_gpu.py --count-params           # real sizes on the meta device
    .venv/bin/python benchmarks/bench_train_gpu.py --device cpu --build-only --models sd15 --unet-dtype fp16
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from _common import MB, PeakMemory, StepClock, header, release_freed_memory, settings_table

REPO = Path(__file__).resolve().parent.parent
RANK = 16
ALPHA = 1.0  # core fixes alpha 1.0 for a new LoRA; ours takes it as a setting
LR = 1e-4
SIDES = ("ours", "core")
MIN_STEPS = 3
# Real UNet configs: ComfyUI 0.3.75's comfy/model_detection.py (unet_config_from_diffusers_unet, "SD15", "SDXL").
REAL_UNET = {
    "sd15": dict(
        use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
        adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
        use_linear_in_transformer=False, context_dim=768, num_heads=8,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
        use_temporal_resblock=False,
    ),
    "sdxl": dict(
        use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
        num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
        transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
        use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
        use_temporal_resblock=False,
    ),
}  # fmt: skip
RESOLUTION = {"sd15": 512, "sdxl": 1024}
TE_NAMES = {"sd15": "CLIP-L", "sdxl": "CLIP-L + CLIP-G"}


def _ensure_package() -> None:
    """Make ``lora_workbench`` importable: where it is not installed, a link named so to this checkout."""
    if importlib.util.find_spec("lora_workbench") is not None:
        return
    folder = Path(tempfile.mkdtemp(prefix="lora_workbench_pkg_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # removes the link, not what it points to
    (folder / "lora_workbench").symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(folder))


# What ComfyUI 0.3.75 and this pack import at start (import name, pip name), for the check before any run.
NEEDED = [
    ("torch", "torch"), ("torchvision", "torchvision"), ("transformers", "transformers"),
    ("tokenizers", "tokenizers"), ("sentencepiece", "sentencepiece"), ("safetensors", "safetensors"),
    ("peft", "peft"), ("einops", "einops"), ("scipy", "scipy"), ("PIL", "pillow"), ("yaml", "pyyaml"),
    ("aiohttp", "aiohttp"), ("psutil", "psutil"), ("tqdm", "tqdm"), ("torchsde", "torchsde"),
    ("trampoline", "trampoline"), ("kornia", "kornia"), ("kornia_rs", "kornia_rs"), ("spandrel", "spandrel"),
    ("av", "av"), ("pydantic", "pydantic"), ("pydantic_core", "pydantic_core"),
    ("pydantic_settings", "pydantic-settings"), ("dotenv", "python-dotenv"),
]  # fmt: skip


def _missing_packages() -> list[str]:
    return [pip for module, pip in NEEDED if module != "av" and importlib.util.find_spec(module) is None]


class _Placeholder(types.ModuleType):
    """A module whose every attribute is a new empty class (and whose submodules are such modules too)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {})
        setattr(self, name, value)
        return value


def _stub_missing_av() -> bool:
    """Where PyAV (``av``, a 36 MB wheel) is missing, put placeholder modules in its place; return whether it did.

    ComfyUI imports it at start for its video types and nodes only, which training never calls; leaving it out keeps
    what travels to a GPU machine under its size limit.
    """
    try:
        import av  # noqa: F401
    except ImportError:
        pass
    else:
        return False
    for name in ("av", "av.container", "av.subtitles", "av.subtitles.stream", "av.video", "av.audio", "av.logging"):
        module = _Placeholder(name)
        module.__path__ = []
        sys.modules[name] = module
    return True


def _tiny_configs():
    """Shrunken configs of the same classes, for ``--tiny``: the tiny families' SDXL and an SD1.5 of that size."""
    from lora_workbench.headless import tiny_families as tf

    sd15 = dict(
        tf._UNET_COMMON,
        adm_in_channels=None,
        transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1],
        use_linear_in_transformer=False,
        context_dim=tf.CLIP_L_CONFIG["hidden_size"],
    )
    unet = {"sd15": sd15, "sdxl": dict(tf.SDXL_UNET_CONFIG)}
    te = {
        "sd15": {"clip_l_model_config": tf.CLIP_L_CONFIG},
        "sdxl": {"clip_l_model_config": tf.CLIP_L_CONFIG, "clip_g_model_config": tf.CLIP_G_CONFIG},
    }
    return unet, te


def _config(model: str, tiny: bool):
    """Return the ComfyUI model config (a ``supported_models`` instance) and the text-encoder options."""
    import comfy.model_detection
    import comfy.supported_models

    cls = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[model]
    if tiny:
        unet, te = _tiny_configs()
        return cls(unet[model]), te[model]
    config = comfy.model_detection.model_config_from_unet_config(dict(REAL_UNET[model]))
    if type(config) is not cls:
        raise RuntimeError(f"ComfyUI detects the {model} config as {type(config).__name__}, not {cls.__name__}")
    return config, {}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _main_dtype(module) -> str:
    """Return the dtype that holds most of ``module``'s parameters."""
    sizes: dict[str, int] = {}
    for p in module.parameters():
        name = str(p.dtype).replace("torch.", "")
        sizes[name] = sizes.get(name, 0) + p.numel()
    return max(sizes, key=sizes.get)


def _unet_parameters(config) -> int:
    """Count the UNet's parameters by building it on the meta device (no memory), as the loader counts a file's."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(
        **config.unet_config, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init
    )
    return _count(unet)


def count_params(models: list[str]) -> list[dict]:
    """Build the real-size UNets and text encoders on the meta device; return their parameter counts."""
    import comfy.sd
    import torch

    rows = []
    for model in models:
        config, _ = _config(model, tiny=False)
        clip = comfy.sd.CLIP(
            config.clip_target(), model_options={"initial_device": torch.device("meta"), "dtype": torch.float16}
        )
        encoders = {name: _count(child) for name, child in clip.cond_stage_model.named_children()}
        rows.append({"model": model, "class": type(config).__name__, "unet": _unet_parameters(config), **encoders})
    return rows


def build(model: str, tiny: bool, unet_dtype: str, cuda: bool):
    """Build MODEL, CLIP and VAE as ComfyUI's checkpoint loader would hand them out; random weights, initialised.

    Call under ``torch.inference_mode`` (as the executor runs a loader). Returns (model, clip, vae, info).
    """
    import comfy.model_management as mm
    import comfy.sd
    import torch

    from lora_workbench.headless import tiny_families as tf
    from lora_workbench.headless.comfy_compat import checkpoint_model_patcher_class
    from lora_workbench.headless.tiny_model import _initialise

    config, te_options = _config(model, tiny)
    params = _unet_parameters(config)
    load_device = mm.get_torch_device()
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if unet_dtype == "auto":  # the loader's choice for an fp16 checkpoint (comfy.sd.load_state_dict_guess_config)
        weight_dtype = mm.unet_dtype(
            model_params=params, supported_dtypes=list(config.supported_inference_dtypes), weight_dtype=torch.float16
        )
    else:
        weight_dtype = dtypes[unet_dtype]
    manual_cast = mm.unet_manual_cast(weight_dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(weight_dtype, manual_cast)
    # Where the loader would put the weights first (the GPU where they fit); on a GPU machine the GPU itself, where
    # random initialisation takes a second (the model ends up there either way).
    initial_device = load_device if cuda else mm.unet_inital_load_device(params, weight_dtype)
    base = config.get_model({}, "", device=initial_device)
    _initialise(base.diffusion_model)
    tf._check_buffers(base.diffusion_model, type(config).__name__)
    patcher = checkpoint_model_patcher_class()(base, load_device=load_device, offload_device=mm.unet_offload_device())
    if initial_device != torch.device("cpu"):
        mm.load_models_gpu([patcher], force_full_load=True)
    # Text encoders: ComfyUI's classes and dtype; built where they run (random init is fast there). Tiny ones in
    # fp32 on a CPU, as the tiny families (fp16 matrix products are slow on CPUs).
    te_device = mm.text_encoder_device() if cuda else torch.device("cpu")
    options = {"initial_device": te_device, **te_options}
    if tiny and not cuda:
        options["dtype"] = torch.float32
    clip = comfy.sd.CLIP(config.clip_target(), model_options=options)
    _initialise(clip.cond_stage_model)
    tf._check_buffers(clip.cond_stage_model, "text encoders")
    vae = tf._taesd(4)
    dm = base.diffusion_model
    info = {
        "unet_class": type(config).__name__,
        "unet_params": _count(dm),
        "unet_bytes": sum(p.numel() * p.element_size() for p in dm.parameters()),
        "unet_dtype": str(weight_dtype).replace("torch.", ""),
        "manual_cast": str(manual_cast).replace("torch.", "") if manual_cast else "none",
        "te_params": {name: _count(child) for name, child in clip.cond_stage_model.named_children()},
        "te_dtype": _main_dtype(clip.cond_stage_model),
        "device": str(load_device),
    }
    return patcher, clip, vae, info


def _offload_all_but(model) -> None:
    """Move every model but ``model``'s UNet off the GPU (ComfyUI's ``free_memory``, keeping its clones)."""
    import comfy.model_management as mm

    keep = [lm for lm in mm.current_loaded_models if lm.model is not None and lm.model.is_clone(model)]
    mm.free_memory(1e30, mm.get_torch_device(), keep_loaded=keep)


def _child(args) -> dict:
    """One process: build the model, train one side for warm-up + timed + 1 steps, return what was measured."""
    started = time.perf_counter()
    import bench_train_memory as btm

    model, side = args.child
    cuda = args.device == "cuda"
    av_placeholder = _stub_missing_av()
    runtime = btm.import_runtime(cuda, prefix="bench_gpu_", checkpoint=False)
    import torch

    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    imported = time.perf_counter()
    with torch.inference_mode():
        m, clip, vae, info = build(model, args.tiny, args.unet_dtype, cuda)
    if cuda:
        torch.cuda.synchronize()
    built = time.perf_counter()
    out = {"model": model, "side": side, "checkpointing": args.checkpointing == "on", **info}
    out["av_placeholder"] = av_placeholder
    out.update(import_s=imported - started, build_s=built - imported)
    if args.build_only:
        return out

    size = args.size or RESOLUTION[model]
    dataset = btm.example_dataset(runtime, size)
    dm = m.model.diffusion_model
    mem = PeakMemory(cuda)
    window: dict = {"stamps": [], "peak_gpu": 0, "peak_rss": 0}

    def sample_peak() -> None:
        if "base_gpu" in window:
            window["peak_gpu"] = max(window["peak_gpu"], mem.gpu_peak())
            window["peak_rss"] = max(window["peak_rss"], mem.peak_rss())

    def on_forward(_module, _args) -> None:
        """A UNet forward pass starts: a training step starts (one per step on both sides, batch 1)."""
        if cuda:
            torch.cuda.synchronize()
        window["stamps"].append(time.perf_counter())
        if len(window["stamps"]) == 1:  # ours' LoRA layers are in the UNet (core's are weight wrappers beside it)
            window["lora_params"] = sum(p.numel() for p in dm.parameters() if p.requires_grad)
        sample_peak()

    dm.register_forward_pre_hook(on_forward)
    clock = StepClock(on_step=sample_peak)  # optimizer steps taken (loss scaling may skip some) and what they train

    def on_start() -> None:
        """The start of training: the UNet alone on the GPU; the memory in use now is the baseline."""
        if cuda:
            _offload_all_but(m)
        release_freed_memory()
        window["base_gpu"], window["base_rss"] = mem.gpu_now(), mem.rss()
        mem.reset()
        window["peak_gpu"], window["peak_rss"] = window["base_gpu"], window["base_rss"]
        window["t_start"] = time.perf_counter()

    if cuda:  # the loader loads the UNet straight to the GPU when it fits; make sure, as a workflow's first use would
        import comfy.model_management

        comfy.model_management.load_models_gpu([m], force_full_load=True)
    release_freed_memory()
    steps = args.warmup + args.steps + 1
    call_start = time.perf_counter()
    btm.train_comfy_side(
        runtime,
        side,
        m,
        clip,
        vae,
        dataset,
        steps=steps,
        rank=RANK,
        batch=args.batch,
        on_start=on_start,
        lr=LR,
        precision=args.precision,
        training_dtype=args.precision,
        lora_dtype=args.core_lora_dtype,
        gradient_checkpointing=args.checkpointing == "on",
        alpha=ALPHA,
        run_name="bench_gpu",
    )
    call_end = time.perf_counter()
    clock.close()
    stamps = window["stamps"]
    if len(stamps) != steps:
        raise RuntimeError(f"{side}: {len(stamps)} UNet forward passes seen, {steps} steps expected")
    intervals = [b - a for a, b in zip(stamps[args.warmup :], stamps[args.warmup + 1 :])]
    out.update(
        size=size,
        steps=args.steps,
        warmup=args.warmup,
        s_step=statistics.median(intervals),
        s_min=min(intervals),
        s_max=max(intervals),
        opt_steps=len(clock.stamps),
        trainable=clock.trainable or window.get("lora_params", 0),
        base_gpu=window["base_gpu"],
        peak_gpu=window["peak_gpu"],
        base_rss=window["base_rss"],
        peak_rss=window["peak_rss"],
        train_s=call_end - window["t_start"],
        call_s=call_end - call_start,
        wall_s=time.perf_counter() - started,
    )
    return out


def _settings(model: str, first: dict, args) -> list[tuple[str, str, str]]:
    size = args.size or RESOLUTION[model]
    weights = f"{first['unet_dtype']} (manual cast {first['manual_cast']}), {first['te_dtype']} text encoders"
    fp16_cuda = first["unet_dtype"] == "float16" and args.device == "cuda"
    scaled = "with loss scaling (fp16 base)" if fp16_cuda else "no loss scaling"
    p = args.precision
    autocast = "no autocast" if p == "fp32" else f"{p} autocast"
    built = f"{first['unet_class']} + {TE_NAMES[model]}, random init"
    data = f"8 example images, {size} px, batch {args.batch}"
    return [
        ("model (the same object)", built, built),
        ("weights", weights, weights),
        ("VAE", "TAESD (latents of the real size)", "TAESD (latents of the real size)"),
        ("images, resolution, batch", data, data),
        ("encoding", "inside the node", "this script, before the node"),
        ("rank / alpha (core: fixed)", f"{RANK} / {ALPHA:g}", f"{RANK} / {ALPHA:g}"),
        ("learning rate", f"{LR:g}", f"{LR:g}"),
        ("optimizer", "AdamW (fused where supported)", "AdamW (torch default: foreach)"),
        ("precision", f"{autocast}, fp32 LoRA, {scaled}", f"training_dtype {p}, lora {args.core_lora_dtype}"),
        ("targets", "attention projections (our default)", "every 2+-dim weight + 1-D weight and bias diffs"),
        ("gradient checkpointing", "per row", "per row"),
        ("objective", "MSE on the model's output (epsilon)", "MSE on the denoised x0"),
        ("gradient clipping", "1.0 (fixed)", "none"),
        ("other models on the GPU", "moved off at the start of training", "moved off at the start of training"),
    ]  # fmt: skip


def _plan_steps(args, done: list[dict], model: str, remaining: float, left: int) -> int | None:
    """Return the timed steps for the next run of ``model``: ``--steps``, lowered where runs measured so far say
    ``left`` more runs would not fit in ``remaining`` seconds (at least ``MIN_STEPS``); None where even that run
    would not fit (for a model not run yet: where the longest process so far would not)."""
    same = [r for r in done if r["model"] == model and "s_step" in r]
    if not same:
        others = [r["process_s"] for r in done if "process_s" in r]
        return None if others and max(others) > remaining else args.steps
    s_step = max(r["s_step"] for r in same)
    overhead = max(r["process_s"] - (r["warmup"] + r["steps"] + 1) * r["s_step"] for r in same)
    if overhead + (args.warmup + MIN_STEPS + 1) * s_step > remaining:
        return None
    share = remaining / max(left, 1)
    fit = int((share - overhead) / max(s_step, 1e-6)) - args.warmup - 1
    return max(MIN_STEPS, min(args.steps, fit))


def _run_child(args, model: str, side: str, checkpointing: str, steps: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", model, side, "--device", args.device, "--checkpointing", checkpointing]
    cmd += ["--steps", str(steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    cmd += ["--unet-dtype", args.unet_dtype, "--core-lora-dtype", args.core_lora_dtype, "--precision", args.precision]
    cmd += ["--size", str(args.size)] * bool(args.size) + ["--tiny"] * args.tiny + ["--build-only"] * args.build_only
    started = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "model": model,
            "side": side,
            "checkpointing": checkpointing == "on",
            "error": f"timeout {timeout:.0f} s",
        }
    if r.returncode:
        tail = "\n".join(r.stderr.strip().splitlines()[-12:])
        print(
            f"--- child {model} {side} checkpointing {checkpointing} failed (exit {r.returncode}):\n{tail}", flush=True
        )
        return {"model": model, "side": side, "checkpointing": checkpointing == "on", "error": f"exit {r.returncode}"}
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["process_s"] = time.monotonic() - started
    return row


def _mb(rows: list[dict], key: str) -> str:
    values = [r[key] / MB for r in rows]
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.fmean(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def _ratio(ours: list[float], core: list[float]) -> str:
    if not ours or not core or not statistics.fmean(core):
        return "n/a"
    mean = statistics.fmean(ours) / statistics.fmean(core)
    pairs = [a / b for a, b in zip(ours, core) if b]
    return f"{mean:.2f} ({min(pairs):.2f}-{max(pairs):.2f})" if len(pairs) > 1 else f"{mean:.2f}"


def _report(args, rows: list[dict], models: list[str], checkpointing: list[str]) -> None:
    cuda = args.device == "cuda"
    unit = "torch.cuda.max_memory_allocated" if cuda else "RSS (CPU run: no GPU figures)"
    base_key, peak_key = ("base_gpu", "peak_gpu") if cuda else ("base_rss", "peak_rss")
    print(f"\nMemory: {unit}. extra = peak during training - memory in use at its start (UNet alone loaded; MB, mean")
    print(
        "(min-max) over repeats); x UNet = extra / the UNet's bytes; peak = the absolute peak. s/step: median over a"
    )
    print(
        "run's timed steps, mean (min-max) of those medians over repeats; within = the fastest-slowest timed step of"
    )
    print("all runs. params: trainable elements. opt = optimizer steps taken of all steps (loss scaling skips some).")
    for model in models:
        mrows = [r for r in rows if r["model"] == model and "s_step" in r]
        if not mrows:
            print(f"\n{model}: no successful run")
            continue
        first = mrows[0]
        te = ", ".join(f"{n} {p / 1e6:.1f} M" for n, p in first["te_params"].items())
        print(
            f"\n{model}: UNet {first['unet_class']} {first['unet_params'] / 1e6:.1f} M parameters, "
            f"{first['unet_dtype']}, {first['unet_bytes'] / MB:.0f} MB as loaded; text encoders {te} "
            f"({first['te_dtype']}); {first['size']} px, batch {args.batch}; device {first['device']}"
        )
        print("Settings (same on both sides unless marked):")
        settings_table(_settings(model, first, args), "ours", "core")
        print(
            f"{'ckpt':<4} {'side':<4} | {'params':>9} | {'base MB':>19} {'peak MB':>19} | {'extra MB':>19} "
            f"{'x UNet':>6} | {'s/step':>22} {'within':>13} | {'steps':>5} {'opt':>5} {'runs':>4}"
        )
        for ckpt in checkpointing:
            by = {
                side: [r for r in mrows if r["side"] == side and r["checkpointing"] == (ckpt == "on")]
                for side in SIDES
            }
            for side in SIDES:
                rs = by[side]
                if not rs:
                    print(f"{ckpt:<4} {side:<4} | (no successful run)")
                    continue
                extra = [r[peak_key] - r[base_key] for r in rs]
                for r, e in zip(rs, extra):
                    r["extra"] = e
                times = [r["s_step"] for r in rs]
                spread = (
                    f"{statistics.fmean(times):.3f} ({min(times):.3f}-{max(times):.3f})"
                    if len(times) > 1
                    else f"{times[0]:.3f}"
                )
                within = f"{min(r['s_min'] for r in rs):.3f}-{max(r['s_max'] for r in rs):.3f}"
                x_unet = statistics.fmean(extra) / rs[0]["unet_bytes"]
                print(
                    f"{ckpt:<4} {side:<4} | {rs[0]['trainable'] / 1e6:>8.3f}M | {_mb(rs, base_key):>19} "
                    f"{_mb(rs, peak_key):>19} | {_mb(rs, 'extra'):>19} {x_unet:>6.2f} | {spread:>22} {within:>13} | "
                    f"{'/'.join(str(s) for s in sorted({r['steps'] for r in rs})):>5} "
                    f"{sum(r['opt_steps'] for r in rs)}/{sum(r['warmup'] + r['steps'] + 1 for r in rs):<3} "
                    f"{len(rs):>4}"
                )
            o, c = by["ours"], by["core"]
            if o and c:
                memory = _ratio([r["extra"] for r in o], [r["extra"] for r in c])
                speed = _ratio([r["s_step"] for r in o], [r["s_step"] for r in c])
                print(f"  ours/core, checkpointing {ckpt}: extra memory {memory}, s/step {speed}")
    if any(r.get("av_placeholder") for r in rows):
        print("PyAV (av) is not installed: placeholder modules stood in for it (ComfyUI's video nodes only).")
    for r in rows:
        what = f"{r['model']} {r['side']} checkpointing {'on' if r['checkpointing'] else 'off'}"
        if "error" in r:
            print(f"FAILED: {what}: {r['error']}")
        elif "left_out" in r:
            print(f"LEFT OUT (budget): {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl (default both)")
    parser.add_argument("--tiny", action="store_true", help="shrunken UNets and text encoders (checks on a CPU)")
    parser.add_argument("--size", type=int, default=0, help="image size in px (default 512 for sd15, 1024 for sdxl)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10; the budget lowers it)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="most fresh processes per configuration (default 3)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of wall time to fit in (default 300)")
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing: off, on or off,on")
    parser.add_argument("--unet-dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto")
    parser.add_argument("--core-lora-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--precision", choices=("bf16", "fp32"), default="bf16", help="ours' precision and core's training_dtype"
    )
    parser.add_argument(
        "--build-only", action="store_true", help="build the models in a child, print sizes, no training"
    )
    parser.add_argument("--count-params", action="store_true", help="real sizes on the meta device, in this process")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    _ensure_package()
    if args.child:
        print(json.dumps(_child(args)), flush=True)
        return

    models = args.models.split(",")
    checkpointing = args.checkpointing.split(",")
    print(
        "GPU SCRIPT (issue 9): peak GPU memory (torch.cuda.max_memory_allocated over the loaded UNet) and seconds per "
        "step of LoRA training on real-size SD1.5 / SDXL (random weights), ours vs ComfyUI core's TrainLoraNode, "
        "each side in a fresh process."
        + ("" if args.device == "cuda" and not (args.tiny or args.count_params) else " THIS RUN: a check only."),
        flush=True,
    )
    if args.count_params:
        from lora_workbench.headless import comfy_env

        comfy_env.import_comfy_core(Path(tempfile.mkdtemp(prefix="bench_gpu_count_")))
        for row in count_params(models):
            encoders = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in row.items() if k.startswith("clip"))
            print(f"{row['model']}: detected as {row['class']}, UNet {row['unet'] / 1e6:.1f} M parameters; {encoders}")
        return
    missing = _missing_packages()
    if missing:
        raise SystemExit(
            f"missing Python packages: {' '.join(missing)} (carry them as wheels: device README, 'pip download')"
        )
    header(
        f"bench_train_gpu: peak memory and s/step of LoRA training, {'tiny' if args.tiny else 'real-size'} "
        "SD1.5 / SDXL, ours vs core",
        f"ours (Train LoRA node: attention, rank {RANK}, {args.precision}) vs core TrainLoraNode (all layers, rank "
        f"{RANK}, {args.precision}), "
        f"gradient checkpointing {' and '.join(checkpointing)}",
        "ComfyUI core TrainLoraNode (comfy_extras/nodes_train.py) of the ComfyUI imported here",
        [
            f"device {args.device}, models {', '.join(models)}{' (tiny)' if args.tiny else ' (real size)'}, "
            f"{args.warmup} warm-up + {args.steps} timed steps (+1 closing), up to {args.repeats} repeats, "
            f"budget {args.budget:.0f} s"
        ],
    )
    t0 = time.monotonic()
    deadline = t0 + args.budget
    # Checkpointing off for every model first: where the budget runs out, the last configurations are left out.
    configs = [(model, ckpt) for ckpt in checkpointing for model in models]
    rows: list[dict] = []
    repeat_walls: list[float] = []
    for rep in range(1 if args.build_only else args.repeats):
        runs = [(model, ckpt, side) for model, ckpt in configs for side in (SIDES if rep % 2 == 0 else SIDES[::-1])]
        if args.build_only:
            runs = [(model, "off", "ours") for model in models]
        remaining = deadline - time.monotonic()
        if rep and repeat_walls and max(repeat_walls) > remaining:
            print(f"repeat {rep + 1} left out: a repeat took {max(repeat_walls):.0f} s, {remaining:.0f} s are left")
            break
        rep_start = time.monotonic()
        for i, (model, ckpt, side) in enumerate(runs):
            remaining = deadline - time.monotonic()
            steps = _plan_steps(args, rows, model, remaining, len(runs) - i)
            if steps is None:
                print(f"  {model} {side} checkpointing {ckpt}: left out, {remaining:.0f} s of the budget left")
                rows.append({"model": model, "side": side, "checkpointing": ckpt == "on", "left_out": "budget"})
                continue
            if steps < args.steps:
                print(f"  {model} {side} checkpointing {ckpt}: {steps} timed steps to fit the budget", flush=True)
            row = _run_child(args, model, side, ckpt, steps, timeout=max(120.0, min(600.0, remaining + 60)))
            rows.append({**row, "rep": rep})
            print(json.dumps(rows[-1]), flush=True)  # partial results survive an interrupted run
        repeat_walls.append(time.monotonic() - rep_start)
        print(f"repeat {rep + 1} done ({time.monotonic() - t0:.0f} s of {args.budget:.0f})", flush=True)
    print(f"\nwall {time.monotonic() - t0:.0f} s (budget {args.budget:.0f} s)")
    if args.build_only:
        for r in rows:
            if "error" not in r:
                te = ", ".join(f"{n} {p / 1e6:.1f} M" for n, p in r["te_params"].items())
                print(
                    f"{r['model']}: {r['unet_class']} UNet {r['unet_params'] / 1e6:.1f} M parameters, "
                    f"{r['unet_dtype']}, {r['unet_bytes'] / MB:.0f} MB; text encoders {te} ({r['te_dtype']}); "
                    f"built in {r['build_s']:.1f} s on {r['device']} (ComfyUI imported in {r['import_s']:.1f} s)"
                )
        return
    _report(args, rows, models, checkpointing)


if __name__ == "__main__":
    main()
