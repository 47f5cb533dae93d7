"""The training loop: DreamBooth-LoRA steps with progress, Cancel and crash-safe checkpoints.

Reproducible and exactly resumable without depending on stored generator positions: the data order, flips,
noise, timesteps and dropout of step ``s`` are drawn from generators seeded by ``(seed, s)``, so a run resumed
from a checkpoint at step ``s`` continues as the uninterrupted run would have. The global generators (torch CPU
and CUDA, Python, NumPy) are still stored in checkpoints and restored on resume, and the caller's global
generator states are given back when ``train`` returns.

Data-parallel on ``torch.distributed`` when the caller has initialised a process group of more than one process
(``torchrun``; see ``_Ranks``): ``config.batch_size`` is then each process's share of a global batch of
``batch_size x world_size``, drawn as one process would draw it, so N processes with batch b train as one process
with batch N x b.

The model's modules are left as they were: LoRA layers are removed again, and the train/eval flags, gradient
checkpointing and ``requires_grad`` flags are restored (see ``inject.remove_adapter``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..lora.state import LoraState
from . import checkpoint as ckpt
from . import conds, inject, objective, run_record
from . import validation as val
from .config import TrainConfig
from .dataset import ImageDataset, crop_window

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped on a problem (e.g. a non-finite loss); the last good checkpoint is kept."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step and value and the last good checkpoint."""


@dataclass
class TrainCallbacks:
    """Hooks the caller gives the loop (all optional).

    ``on_step(step, total, loss)`` after each optimizer step; ``should_stop()`` after each step: True stops
    cleanly (a checkpoint is written first). An exception raised by any callback (ComfyUI's Cancel, raised
    by the server's progress hook inside ``on_step``) or by the model propagates after the last completed
    step's checkpoint is written. ``on_checkpoint(path)`` after each checkpoint;
    ``on_class_images(done, total)`` while class images are generated. ``on_validation(step, loss)`` after each
    validation evaluation (``train``'s ``validation``; rank 0 only), called while the model is still in eval mode
    under ``torch.no_grad`` with the global generators forked: a caller may sample previews of the current LoRA
    there without changing training.
    """

    on_step: Callable[[int, int, float], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_checkpoint: Callable[[Path], None] | None = None
    on_class_images: Callable[[int, int], None] | None = None
    on_validation: Callable[[int, float], None] | None = None


@dataclass
class TrainResult:
    """What a run produced: the adapter, its loss per step, and how it ended."""

    state: LoraState
    losses: list[float]
    steps_done: int
    stopped_reason: str  # "finished", "cancelled" or "already finished" (resumed at or past the last step)
    checkpoint_path: Path | None = None
    resumed_from: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # (step, validation loss) per evaluation, and the names of the images held out for it (see trainer.validation)
    validation: list[tuple[int, float]] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    validation_seconds: float = 0.0  # spent evaluating (and in on_validation: previews), in this call


def _seed_of(seed: int, *parts) -> int:
    """Return a 63-bit seed derived from ``seed`` and ``parts`` (any seed the widget allows stays in range)."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _seeded(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_of(seed, *parts))


@dataclass(frozen=True)
class _Ranks:
    """This process's place in a data-parallel job on ``torch.distributed`` (one process when there is none).

    The engine is PyTorch's collectives on the LoRA gradients: after the backward passes of a step, one
    ``all_reduce`` over the flattened LoRA gradients (the single bucket DistributedDataParallel would fill), not
    ``DistributedDataParallel`` itself. DDP wraps the module whose ``forward`` it calls, but here the forward goes
    through ``model_api.predict_noise`` (ComfyUI's ``apply_model`` with its patches and wrappers) into a frozen
    base model; wrapping that model would make DDP broadcast and track its billions of frozen weights, and the
    grad-accumulation and gradient-checkpointing paths would need ``no_sync`` and ``find_unused_parameters``.
    The LoRA parameters are all this job has to keep in step, so their gradients are what is reduced.

    Each rank's loss is its share of the global batch's loss (the sum over its examples divided by the global
    count), so the sum of the ranks' gradients is the gradient of the global mean: DDP's average when the
    shares are equal, and still exact when an epoch's last batch splits unevenly.
    """

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> _Ranks:
        """Return the ranks of the initialised default process group, or one process when there is none."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def shared(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """Return this rank's contiguous part of ``n`` items (rank r takes part r; sizes differ by 1 at most)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def _device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def broadcast(self, value):
        """Return rank 0's ``value`` on every rank (pickled: for small objects and tensors made once)."""
        box = [value if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def sum(self, value: float) -> float:
        """Return the sum of ``value`` over the ranks."""
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(t)
        return float(t)

    def any(self, flag: bool) -> bool:
        """Return whether ``flag`` is true on any rank (so every rank stops at the same step)."""
        return self.sum(1.0 if flag else 0.0) > 0

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (one flat buffer, one ``all_reduce``)."""
        for p in params:
            if p.grad is None:  # no example on this rank this step (a short last batch)
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        device = self._device()
        flat = torch.cat([g.reshape(-1).to(device, torch.float32) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    warmup, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):
        # Fused AdamW needs a supported device and dtype; the foreach version is the portable fallback.
        return torch.optim.AdamW(groups)


def _on_copies(forward, *args, **kwargs):
    """Run ``forward`` on copies of its tensor arguments.

    Some blocks add to their input in place (Flux's ``x += ...``); the checkpoint keeps that input to recompute
    the block, and would find it changed.
    """
    copy = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return forward(*map(copy, args), **{k: copy(v) for k, v in kwargs.items()})


def _enable_gradient_checkpointing(
    module: torch.nn.Module, blocks=None, copy_inputs: bool = False
) -> Callable[[], None]:
    """Turn on activation recomputation in ``module``; return a function that turns it off again.

    ``blocks``: the modules to recompute in the backward pass (the model says which: ``ModelApi.checkpoint_blocks``);
    without them the module's own switch is used (diffusers), else each ``BasicTransformerBlock``.
    ``copy_inputs``: the blocks change their inputs in place, so each runs on copies (``_on_copies``).
    """
    if blocks is None and hasattr(module, "enable_gradient_checkpointing"):
        was_on = bool(getattr(module, "is_gradient_checkpointing", False))
        module.enable_gradient_checkpointing()
        return (lambda: None) if was_on else module.disable_gradient_checkpointing
    if blocks is None:
        blocks = [m for m in module.modules() if type(m).__name__ == "BasicTransformerBlock"]
    patched = []
    for m in blocks:
        if "forward" in m.__dict__:
            continue  # already wrapped by someone else: leave it as it is

        def checkpointed(*args, _forward=m.forward, **kwargs):
            if copy_inputs:
                return torch.utils.checkpoint.checkpoint(_on_copies, _forward, *args, use_reentrant=False, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        m.forward = checkpointed
        patched.append(m)
    if not patched:
        log.warning("gradient checkpointing: no block of %s to recompute; not used", type(module).__name__)

    def undo() -> None:
        for m in patched:
            del m.forward  # the instance attribute shadowed the class's forward

    return undo


def _precision(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype to use, or None for fp32 (with a warning when the request cannot be honoured)."""
    if config.precision == "fp32":
        return None
    if config.precision == "fp16":
        if device.type == "cuda":
            return torch.float16
        log.warning("precision fp16 needs a CUDA device (%s given): training in fp32", device)
        return None
    if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    log.warning("precision bf16 is not supported on %s: training in fp32", device)
    return None


def _autocast(dtype: torch.dtype | None, device: torch.device):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _global_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Return the global generators' states as (tensors, JSON part) for a checkpoint."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    return tensors, {"python": [version, list(mt), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}


def _set_global_rng_state(tensors: dict[str, torch.Tensor], state: dict | None) -> None:
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if state:
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
        kind, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def train(
    model_api,
    dataset: ImageDataset,
    config: TrainConfig,
    callbacks: TrainCallbacks | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    cache_dir: str | Path | None = None,
    unet_name_map: Callable[[str], str] | dict[str, str] | None = None,
    keep_layers: bool = False,
    class_images_dir: str | Path | None = None,
    validation: val.ValidationConfig | None = None,
) -> TrainResult:
    """Train a DreamBooth LoRA on ``dataset`` and return it.

    With a ``torch.distributed`` process group of N > 1 processes initialised by the caller, every process calls
    this with the same arguments: ``config.batch_size`` is each one's share of a global batch of N x batch_size,
    the LoRA gradients are reduced after each backward pass (see ``_Ranks``), the reported loss is the global
    batch's, and rank 0 alone plans the resume, makes the class images and latents and writes checkpoints.

    Args:
        model_api: the model (see ``trainer.model_api.ModelApi``); LoRA layers are injected into its ``unet``
            (and ``text_encoder``) and removed again at the end unless ``keep_layers``; the modules' base weights
            are never changed.
        dataset: from ``trainer.dataset.load_image_folder``.
        config: the settings; validated first.
        callbacks: progress, Cancel and checkpoint hooks.
        checkpoint_dir: where checkpoints go; None falls back to ``config.checkpoint_dir``; empty disables them.
        resume: continue from the checkpoint in the checkpoint folder when it belongs to this run (same dataset
            content, base model and result-changing settings; see ``run_record``). A checkpoint of another run,
            or any checkpoint when ``resume`` is off, is renamed aside (kept, never overwritten) and training
            starts fresh; ``TrainResult.notes`` says why.
        cache_dir: where generated class images are cached (None: not cached).
        unet_name_map: translates UNet module paths for the exported kohya names (a function or a dict).
        keep_layers: leave the trained LoRA layers in the modules (to evaluate them; call
            ``inject.remove_adapter`` on ``unet`` and ``text_encoder`` afterwards).
        class_images_dir: the folder to read class images from, replacing ``config.class_images_dir`` (which
            then only names it in records): callers resolve user-given names to allowed folders.
        validation: compute a held-out validation loss every ``validation.every`` steps (see
            ``trainer.validation``): its ``hold_out`` images leave the training set (the run, its record and
            resume identity are those of the rest); 0 evaluates on the training images and trains exactly as
            without validation. Rank 0 evaluates; the values are in ``TrainResult.validation`` and go to
            ``callbacks.on_validation``.

    Returns:
        A ``TrainResult``: ``stopped_reason`` is "finished", "cancelled" (``should_stop`` returned True) or
        "already finished" (the checkpoint had reached ``steps``: nothing was trained), the state holds
        kohya-named modules with the configured alpha, ``losses`` one value per step since step 0 (including
        the steps before a resume).

    Raises:
        ValueError: invalid settings (field and value named), a rank above a layer's size, a text encoder
            requested but absent, or an unreadable checkpoint.
        trainer.dataset.DatasetError: a class-image folder without usable images.
        NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint is kept.
        TrainingError: the ranks of a distributed job resumed at different steps (a checkpoint folder that not
            every machine sees).
        BaseException: whatever a callback or the model raised (Cancel, out of memory, Ctrl-C), after the last
            completed step's checkpoint is written.
    """
    config.validate()
    held_out: list = []
    if validation is not None:
        validation.validate(len(dataset.examples))
        dataset, held_out = val.split(dataset, validation.hold_out)
    callbacks = callbacks or TrainCallbacks()
    started = time.monotonic()
    device = torch.device(model_api.device)
    if checkpoint_dir is None:
        checkpoint_dir = config.checkpoint_dir or None
    te = model_api.text_encoder if config.train_text_encoder else None
    if config.train_text_encoder and te is None:
        raise ValueError("TrainConfig.train_text_encoder = True, but the model gives no text encoder to train")

    if config.min_snr_gamma and model_api.schedule.prediction_type == "flow":
        raise ValueError(
            f"TrainConfig.min_snr_gamma = {config.min_snr_gamma:g}: min-SNR weights DDPM noise levels; this is a "
            "flow-matching model (set it to 0)"
        )
    identity = model_api.identity() if hasattr(model_api, "identity") else {"model": model_api.fingerprint()}
    ranks = _Ranks.current()
    settings = config.to_dict()
    if ranks.shared:
        # A run is defined by its global batch: 2 processes x batch b resume on 1 process x batch 2b and back.
        settings["batch_size"] = config.batch_size * ranks.world
    record = run_record.make_record(settings, dataset.identity(), identity)
    notes: list[str] = []
    if checkpoint_dir:
        # Rank 0 alone decides (and sets another run's checkpoint aside); the others follow its decision.
        resume = _plan_resume(Path(checkpoint_dir), resume, record, notes) if ranks.main else False
        if ranks.shared:
            resume = ranks.broadcast(resume)

    # Class images come from the frozen base model, so they are made before any LoRA layer exists: once, by rank 0.
    class_pixels = None
    if config.prior_preservation and ranks.main:
        class_pixels = objective.class_images(
            model_api,
            config.class_prompt or dataset.class_prompt,
            config.num_class_images,
            config.seed,
            dataset.options.resolution,
            cache_dir,
            class_images_dir or config.class_images_dir or None,
            progress=callbacks.on_class_images,
            fingerprint=run_record.combined(identity),
        )

    # Images and (with a frozen text encoder) prompts are encoded before the model is prepared for training:
    # the VAE and text encoders do their work first and may then make room for the denoiser.
    data = _EncodedData(model_api, dataset, config, te, class_pixels, ranks)
    validator = None
    if validation is not None and ranks.main:
        validator = val.Validator(
            model_api,
            val.evaluation_set(dataset, held_out),
            validation,
            noise_offset=config.noise_offset,
            min_snr_gamma=config.min_snr_gamma,
            timestep_sampling=config.timestep_sampling,
            frozen_text=te is None,
        )
    prepare = getattr(model_api, "prepare_for_training", None)
    if prepare is not None:
        prepare(config.batch_size * (2 if class_pixels is not None or data.class_latents else 1))
    modules = [m for m in (model_api.unet, te) if m is not None]
    was_training = [m.training for m in modules]
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [device.index or 0] if device.type == "cuda" else []
    # fork_rng gives the caller's torch generators back afterwards: training must not shift the user's seeds.
    with torch.random.fork_rng(devices=cuda):
        undo_checkpointing = None
        try:
            torch.manual_seed(config.seed)  # peft initialises lora_A from the global generator
            architecture = getattr(model_api, "architecture", "unet")
            inject.inject_lora(
                model_api.unet,
                config.targets_for(architecture),
                config.rank,
                config.effective_alpha,
                config.dropout,
                device=device,
            )
            if te is not None:
                inject.inject_lora(
                    te,
                    config.text_encoder_targets,
                    config.effective_te_rank,
                    config.effective_te_alpha,
                    config.dropout,
                    device=device,
                )
            if config.gradient_checkpointing:
                blocks = model_api.checkpoint_blocks() if hasattr(model_api, "checkpoint_blocks") else None
                copy_inputs = getattr(model_api, "blocks_change_inputs", False)
                undo_checkpointing = _enable_gradient_checkpointing(model_api.unet, blocks, copy_inputs)
            run = _Run(model_api, data, config, callbacks, checkpoint_dir, te, device, unet_name_map, started)
            run.record, run.ranks = record, ranks
            run.validation_settings, run.validator = validation, validator
            result = run.run(resume)
            result.held_out = [e.name for e in held_out]
            result.notes = notes + list(getattr(model_api, "notes", [])) + result.notes
            return result
        finally:
            if undo_checkpointing is not None:
                undo_checkpointing()
            for m, flag in zip(modules, was_training):
                m.train(flag)
            if not keep_layers:
                for m in modules:
                    inject.remove_adapter(m)
            end = getattr(model_api, "end_training", None)
            if end is not None:
                end()
            random.setstate(py_state)
            np.random.set_state(np_state)


def _plan_resume(folder: Path, resume: bool, record: dict, notes: list[str]) -> bool:
    """Return whether to resume from ``folder``'s checkpoint; set a checkpoint of another run (or any, when
    ``resume`` is off) aside, and say so in ``notes`` (an unreadable checkpoint, too).
    """
    if not (folder / ckpt.INDEX).is_file():
        return False
    try:
        saved = ckpt.read_index(folder)
        why = ["resume is off"] if not resume else run_record.differences(saved.get("run"), record)
    except ValueError as e:
        saved, why = {"step": 0}, [f"its index cannot be read: {e}"]
    if not why:
        return True
    kept = run_record.set_aside(folder, int(saved.get("step", 0)))
    notes.append(
        f"started fresh: the checkpoint in '{folder.name}' (step {saved.get('step')}) is for another run ("
        + "; ".join(why)
        + f"); it is kept in '{kept.name}'"
    )
    log.warning("%s", notes[-1])
    return False


class _EncodedData:
    """What the frozen VAE and text encoder give once: latents of every image (and mirror), class latents per image
    size, and the conditioning of every prompt when the text encoder is not trained."""

    def __init__(self, model_api, dataset, config, te, class_pixels, ranks: _Ranks | None = None):
        self.dataset = dataset
        ranks = ranks or _Ranks()
        self.class_prompt = config.class_prompt or dataset.class_prompt
        self.class_latents: dict[tuple[int, int], torch.Tensor] = {}
        if ranks.shared and not ranks.main:
            # Rank 0 encodes; the others receive its latents (made once, and the same bits on every rank).
            self.latents, self.flipped, self.class_latents = ranks.broadcast(None)
        else:
            self._encode(model_api, dataset, class_pixels)
            if ranks.shared:
                cpu = lambda ts: [t.cpu() for t in ts]  # noqa: E731
                flipped = cpu(self.flipped) if dataset.options.flip else None
                ranks.broadcast((cpu(self.latents), flipped, {k: v.cpu() for k, v in self.class_latents.items()}))
        if self.flipped is None:
            self.flipped = self.latents
        self.frozen_cond: dict[str, conds.Cond] = {}
        if te is None:
            prompts = {e.caption for e in dataset.examples}
            if config.caption_dropout or dataset.options.caption_dropout:
                prompts.add("")
            if self.class_latents:
                prompts.add(self.class_prompt)
            with torch.no_grad():
                for p in sorted(prompts):
                    self.frozen_cond[p] = conds.detached(model_api.encode_prompts([p]))

    def _encode(self, model_api, dataset, class_pixels) -> None:
        # Encode every image (and its mirror when flipping) once: the VAE is frozen. Random crops are cut
        # from the latents of the whole resized image, one latent pixel (8 image pixels) at a time.
        with torch.no_grad():
            self.latents = [model_api.encode_images(e.full_pixels[None]) for e in dataset.examples]
            self.flipped = (
                [model_api.encode_images(e.full_pixels.flip(-1)[None]) for e in dataset.examples]
                if dataset.options.flip
                else self.latents
            )
        if class_pixels is not None:
            # One set of class latents per image size (aspect buckets), so they join the instance batch.
            with torch.no_grad():
                for h, w in sorted({e.size for e in dataset.examples}):
                    fitted = objective.fit_images(class_pixels, h, w)
                    self.class_latents[(h, w)] = torch.cat(
                        [model_api.encode_images(fitted[i : i + 4]) for i in range(0, len(fitted), 4)]
                    )


class _Run:
    """The state of one training run between injection and removal (kept together so checkpoints see it all)."""

    record: dict | None = None
    ranks: _Ranks = _Ranks()
    validation_settings: val.ValidationConfig | None = None
    validator: val.Validator | None = None  # rank 0's (the others only take part in sharing its values)

    def __init__(
        self, model_api, data: _EncodedData, config, callbacks, checkpoint_dir, te, device, unet_name_map, started
    ):
        self.api, self.dataset, self.config, self.callbacks = model_api, data.dataset, config, callbacks
        self.data = data
        self.checkpoint_dir, self.te, self.device, self.started = checkpoint_dir, te, device, started
        self.unet = model_api.unet
        self.unet_name_map = unet_name_map
        groups = [{"params": inject.lora_parameters(self.unet), "lr": config.learning_rate}]
        if te is not None:
            groups.append({"params": inject.lora_parameters(te), "lr": config.effective_te_learning_rate})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = _make_optimizer(groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        self.dtype = _precision(config, device)
        # fp16 gradients underflow without loss scaling (fp16 autocast, or a base model ComfyUI keeps in fp16);
        # bf16 has fp32's range and needs none.
        fp16 = self.dtype is torch.float16 or getattr(model_api, "dtype", None) is torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 and device.type == "cuda" else None
        self.losses: list[float] = []
        self.validation: list[tuple[int, float]] = []
        self.validation_seconds = 0.0
        self.last_checkpoint: Path | None = None
        self.last_checkpoint_step = 0
        self.caption_dropout = config.caption_dropout or data.dataset.options.caption_dropout

    def cond_for(self, prompts: list[str]) -> conds.Cond:
        if self.te is not None:
            return self.api.encode_prompts(prompts)  # through the LoRA text encoder: gradients flow
        for p in prompts:
            if p not in self.data.frozen_cond:
                with torch.no_grad():
                    self.data.frozen_cond[p] = conds.detached(self.api.encode_prompts([p]))
        return conds.concat([self.data.frozen_cond[p] for p in prompts])

    def write_checkpoint(self, step: int) -> None:
        if not self.checkpoint_dir:
            return
        if not self.ranks.main:
            # Rank 0 alone writes; every rank holds the same weights, so the others only keep count.
            self.last_checkpoint, self.last_checkpoint_step = Path(self.checkpoint_dir) / ckpt.INDEX, step
            return
        tensors = {f"unet.{k}": v for k, v in inject.named_lora_tensors(self.unet).items()}
        if self.te is not None:
            tensors.update({f"te.{k}": v for k, v in inject.named_lora_tensors(self.te).items()})
        opt_tensors, opt_json = ckpt.flatten_optimizer(self.optimizer)
        tensors.update(opt_tensors)
        rng_tensors, rng_json = _global_rng_state()
        tensors.update(rng_tensors)
        state = {
            "config": self.config.to_dict(),
            "run": self.record,
            "optimizer": opt_json,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_json,
            "losses": self.losses,
            "validation": self.validation,
        }
        self.last_checkpoint = ckpt.save_checkpoint(self.checkpoint_dir, step, tensors, state)
        self.last_checkpoint_step = step
        if self.callbacks.on_checkpoint:
            self.callbacks.on_checkpoint(self.last_checkpoint)

    def load_checkpoint(self) -> int:
        """Restore the checkpoint in ``checkpoint_dir`` if there is one; return the step it reached (0 if none)."""
        loaded = ckpt.load_checkpoint(self.checkpoint_dir)
        if loaded is None:
            return 0
        step, tensors, state = loaded
        index = Path(self.checkpoint_dir) / ckpt.INDEX
        with torch.no_grad():
            for prefix, module in (("unet.", self.unet), ("te.", self.te)):
                if module is None:
                    continue
                for k, p in inject.named_lora_tensors(module).items():
                    if prefix + k not in tensors:
                        raise ValueError(f"checkpoint {index} has no tensor '{prefix + k}' (made for another model?)")
                    p.copy_(tensors[prefix + k])
        ckpt.restore_optimizer(self.optimizer, tensors, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_global_rng_state(tensors, state.get("rng"))
        self.losses = list(state["losses"])
        self.validation = [(int(s), float(v)) for s, v in state.get("validation") or []]
        self.last_checkpoint, self.last_checkpoint_step = index, step
        log.info("resumed from %s at step %d", index, step)
        return step

    def latent_of(self, item) -> torch.Tensor:
        """Return the latents ``(1, C, h, w)`` of one batch item: mirrored as drawn, cropped where drawn."""
        latents = (self.data.flipped if item.flip else self.data.latents)[item.index]
        example = self.dataset.examples[item.index]
        factor = example.data.shape[-1] / latents.shape[-1]  # the VAE's downscale (8 for SD, SDXL, Flux)
        h, w = round(example.size[0] / factor), round(example.size[1] / factor)
        top = crop_window(latents.shape[-2] - h, item.crop[0])
        left = crop_window(latents.shape[-1] - w, item.crop[1])
        return latents[..., top : top + h, left : left + w]

    def micro_step(self, step: int, micro: int) -> torch.Tensor:
        """Return this process's loss of one forward pass over the step's batch (instance + class examples).

        The batch (``batch_size x world``), its class-image picks, timesteps and noise are drawn from the step's
        generator on every rank exactly as one process with that batch draws them; rank r keeps its part
        (``_Ranks.share``) of the instance examples and the same part of the class examples, and its loss is the
        sum of their DreamBooth terms over the batch's counts, so the parts add up to the batch's loss (and
        their gradients to its gradient). One process's part is the whole batch. A rank whose part is empty
        returns a zero without gradient.
        """
        config, ranks = self.config, self.ranks
        batch = self.dataset.batch(
            config.batch_size * ranks.world,
            config.seed,
            step * config.grad_accumulation + micro,
            caption_dropout=self.caption_dropout,
        )
        n_global, mine = len(batch), ranks.share(len(batch))
        if mine.start == mine.stop:
            return torch.zeros((), device=self.device)
        x0 = torch.cat([self.latent_of(item) for item in batch[mine]]).to(self.device)
        prompts = ["" if item.drop_caption else self.dataset.examples[item.index].caption for item in batch[mine]]
        gen = _seeded(config.seed, step, micro)
        n_instance = x0.shape[0]
        rows = list(range(mine.start, mine.stop))
        with _autocast(self.dtype, self.device):
            cond = self.cond_for(prompts)
            if self.data.class_latents:
                # One forward pass over instance + class examples "to avoid doing two forward passes", as
                # diffusers' DreamBooth script puts it; the loss is split again in dreambooth_loss.
                pool = self.data.class_latents[self.dataset.examples[batch[0].index].size]
                pick = torch.randint(0, pool.shape[0], (n_global,), generator=gen)[mine]
                x0 = torch.cat([x0, pool[pick].to(self.device)])
                cond = conds.concat([cond, conds.repeat(self.cond_for([self.data.class_prompt]), n_instance)])
                rows += [n_global + r for r in rows]  # the class examples follow the instance examples
            n_all = n_global * (2 if self.data.class_latents else 1)
            timesteps = objective.sample_timesteps(self.api.schedule, n_all, gen, config.timestep_sampling)
            noise = objective.sample_noise((n_all, *x0.shape[1:]), gen, config.noise_offset)
            per_example = objective.per_example_loss(
                self.api,
                x0,
                cond,
                gen,
                noise_offset=config.noise_offset,
                min_snr_gamma=config.min_snr_gamma,
                timestep_sampling=config.timestep_sampling,
                timesteps=timesteps[rows],
                noise=noise[rows].to(self.device),
            )
            loss, _, _ = objective.dreambooth_loss(per_example, n_instance, config.prior_loss_weight, n_global)
        return loss

    def run(self, resume: bool) -> TrainResult:
        config = self.config
        start = self.load_checkpoint() if (self.checkpoint_dir and resume) else 0
        if self.ranks.shared and self.ranks.sum(start) != start * self.ranks.world:
            raise TrainingError(
                f"rank {self.ranks.rank} resumed at step {start} from '{self.checkpoint_dir}', another rank "
                "elsewhere: every process must see the checkpoint rank 0 writes (a shared folder on several machines)"
            )
        self.resumed_from = start
        if start >= config.steps:
            log.info("checkpoint already at step %d of %d: nothing to train", start, config.steps)
            return self.result(start, "already finished")
        self.unet.train()
        if self.te is not None:
            self.te.train()
        self.done, self.updating = start, False
        try:
            return self.steps(start)
        except NonFiniteLossError:
            raise  # the state that produced it is no good checkpoint: the last one is kept as it is
        except BaseException as error:
            self.save_before_failure(error)
            raise

    def save_before_failure(self, error: BaseException) -> None:
        """Write the last completed step's checkpoint before ``error`` propagates (Cancel, out of memory, ...)."""
        if not self.checkpoint_dir or self.done <= self.last_checkpoint_step:
            return
        if self.updating:
            # Parameters may be half-updated: the last checkpoint is the last consistent state.
            log.error(
                "training failed during an optimizer update; the last checkpoint (step %d) is kept",
                self.last_checkpoint_step,
            )
            return
        try:
            self.write_checkpoint(self.done)
            log.warning(
                "training stopped at step %d (%s); checkpoint written to %s",
                self.done,
                type(error).__name__,
                self.last_checkpoint,
            )
        except Exception as write_error:  # the original error is the one to report
            log.error("could not write the checkpoint of step %d: %s", self.done, write_error)

    def steps(self, start: int) -> TrainResult:
        """Run steps ``start`` .. ``config.steps``; return the result (finished, or cancelled by ``should_stop``)."""
        config, callbacks = self.config, self.callbacks
        if self.validation_settings is not None and not any(s == start for s, _ in self.validation):
            self.evaluate(start)  # the starting point of the curve (step 0, or the step a resume starts from)
        for step in range(start, config.steps):
            torch.manual_seed(_seed_of(config.seed, "dropout", step))  # LoRA dropout, reproducible per step
            total = 0.0
            for micro in range(config.grad_accumulation):
                loss = self.micro_step(step, micro)
                value = float(loss.detach())
                if self.ranks.shared:
                    value = self.ranks.sum(value)  # the global batch's loss: every rank sees (and checks) the same
                if not math.isfinite(value):
                    self.optimizer.zero_grad(set_to_none=True)
                    good = self.last_checkpoint_step
                    kept = (
                        f"the last good checkpoint (step {good}) is kept at {self.last_checkpoint}"
                        if self.last_checkpoint
                        else "no checkpoint was written before it (set checkpoint_every to keep one)"
                    )
                    raise NonFiniteLossError(
                        f"loss became {value} at step {step + 1} of {config.steps} (learning rate "
                        f"{self.scheduler.get_last_lr()[0]:g}); {kept}. Lower the learning rate, or use fp32."
                    )
                scaled = loss / config.grad_accumulation
                if scaled.requires_grad:  # False only for a rank without examples in this micro-batch
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                total += value / config.grad_accumulation
            self.updating = True
            if self.ranks.shared:
                self.ranks.sum_gradients(self.params)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(total)
            self.done, self.updating = step + 1, False
            done = self.done
            if callbacks.on_step:
                callbacks.on_step(done, config.steps, total)
            every = self.validation_settings.every if self.validation_settings is not None else 0
            if every and (done % every == 0 or done == config.steps):
                self.evaluate(done)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                self.write_checkpoint(done)
            stop = bool(callbacks.should_stop and callbacks.should_stop())
            if self.ranks.shared:
                stop = self.ranks.any(stop)
            if stop:
                if self.last_checkpoint_step != done:
                    self.write_checkpoint(done)
                return self.result(done, "cancelled" if done < config.steps else "finished")
        self.write_checkpoint(config.steps)
        return self.result(config.steps, "finished")

    def evaluate(self, step: int) -> None:
        """Compute the validation loss after ``step`` steps (rank 0; the others receive it) and report it.

        The model is in eval mode (no LoRA dropout) under ``torch.no_grad``, with the global generators forked, for
        the evaluation and ``on_validation``: training after it continues exactly as it would have without it.
        """
        value, started = None, time.monotonic()
        if self.ranks.main:
            modules = [m for m in (self.unet, self.te) if m is not None]
            flags = [m.training for m in modules]
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            try:
                for m in modules:
                    m.eval()
                with torch.random.fork_rng(devices=cuda), torch.no_grad():
                    with _autocast(self.dtype, self.device):
                        value = self.validator.loss()
                    if self.callbacks.on_validation:
                        self.callbacks.on_validation(step, value)
            finally:
                for m, flag in zip(modules, flags):
                    m.train(flag)
        if self.ranks.shared:
            value = self.ranks.broadcast(value)
        self.validation.append((step, value))
        self.validation_seconds += time.monotonic() - started

    def result(self, steps: int, reason: str) -> TrainResult:
        state = inject.export_state(self.unet, "lora_unet", self.unet_name_map, self.config.effective_alpha)
        if self.te is not None:
            prefix = getattr(self.api, "text_encoder_prefix", "lora_te")
            state.modules.update(inject.export_state(self.te, prefix, alpha=self.config.effective_te_alpha).modules)
        return TrainResult(
            state,
            self.losses,
            steps,
            reason,
            self.last_checkpoint,
            self.resumed_from,
            time.monotonic() - self.started,
            validation=list(self.validation),
            validation_seconds=self.validation_seconds,
        )
