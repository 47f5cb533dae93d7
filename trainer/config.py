"""Training settings: one dataclass whose field help texts also become the nodes' tooltips.

Each field's ``metadata`` holds ``help`` (the tooltip text, ``help_text(name)``) and, where it applies, ``min``,
``max`` and ``options``, which ``validate()`` enforces and the node layer can reuse for its widgets. Zero means
"same as" for the derived text-encoder settings (``te_rank``, ``te_alpha``, ``te_learning_rate``) and for
``alpha``, because ComfyUI widgets have no ``None``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

# Module-name suffixes per preset and denoiser architecture: the UNets of SD1/SD2/SDXL (diffusers and ComfyUI's
# ldm UNet share these names), Flux's double/single-stream transformer, and SD3's MMDiT (as ComfyUI names them).
TARGET_PRESETS_BY_ARCHITECTURE = {
    "unet": {
        "attention": ("to_q", "to_k", "to_v", "to_out.0"),
        "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
        "all_linear": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
    },
    # A single-stream block fuses attention and MLP in linear1 (qkv + MLP in) and linear2 (out + MLP out).
    "flux": {
        "attention": ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2"),
        "attention+ff": (
            *("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2"),
            *("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"),
        ),
        "all_linear": (
            *("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2"),
            *("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin", "modulation.lin"),
        ),
    },
    "mmdit": {
        "attention": ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj"),
        "attention+ff": ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2"),
        "all_linear": (
            *("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"),
        ),
    },
}
TARGET_PRESETS = TARGET_PRESETS_BY_ARCHITECTURE["unet"]
# CLIP projections (transformers and ComfyUI's CLIP share these names); the MLP only with the ff presets.
TEXT_ENCODER_TARGETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attention+ff": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "all_linear": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
TIMESTEP_SAMPLINGS = ("auto", "uniform", "logit_normal")


def _f(default, help_text: str, **kw):
    return field(default=default, metadata={"help": help_text, **kw})


@dataclass
class TrainConfig:
    """Everything that decides a training run (and goes into the LoRA's metadata)."""

    steps: int = _f(200, "Optimizer steps to train.", min=1, max=100000)
    rank: int = _f(
        8, "LoRA rank r: rows of A and columns of B. 4-32 is typical; higher learns more, costs more.", min=1, max=256
    )
    alpha: float = _f(
        0.0, "LoRA alpha; the update is scaled by alpha / rank. 0 means alpha = rank (scale 1).", min=0.0, max=1024.0
    )
    dropout: float = _f(0.0, "Dropout on the LoRA input during training.", min=0.0, max=0.9)
    target: str = _f(
        "attention",
        "Which layers get a LoRA: attention projections (to_q, to_k, to_v, to_out.0), "
        "attention + feed-forward, or all linear layers of the transformer blocks.",
        options=tuple(TARGET_PRESETS),
    )
    custom_targets: str = _f(
        "", "Comma-separated module-name suffixes that replace the preset (e.g. 'to_k,to_v'); empty: the preset."
    )
    learning_rate: float = _f(
        1e-4,
        "AdamW learning rate of the LoRA (on the text encoder too unless te_learning_rate is set), e.g. 1e-4 "
        "(= 0.0001); 5e-5 to 5e-4 is typical.",
        min=1e-7,
        max=1.0,
    )
    lr_scheduler: str = _f(
        "constant",
        "Learning-rate schedule after warmup: constant, constant_with_warmup, cosine or linear (both decay to 0 at "
        "the last step). Warmup also applies to 'constant'.",
        options=LR_SCHEDULERS,
    )
    warmup_steps: int = _f(0, "Steps of linear learning-rate warmup.", min=0, max=100000)
    batch_size: int = _f(
        1, "Subject images per step (class images are added on top with prior preservation).", min=1, max=64
    )
    grad_accumulation: int = _f(1, "Batches whose gradients add up before one optimizer step.", min=1, max=1024)
    train_text_encoder: bool = _f(
        False,
        "Also train a LoRA on the text encoder: q/k/v/out projections, plus fc1/fc2 with 'attention+ff' or "
        "'all_linear'. Binds the trigger word faster.",
    )
    te_rank: int = _f(0, "Rank of the text-encoder LoRA; 0: the same as rank.", min=0, max=256)
    te_alpha: float = _f(0.0, "Alpha of the text-encoder LoRA; 0: the same as the UNet alpha.", min=0.0, max=1024.0)
    te_learning_rate: float = _f(
        0.0, "Learning rate of the text-encoder LoRA, e.g. 5e-5; 0: the same as learning_rate.", min=0.0, max=1.0
    )
    prior_preservation: bool = _f(
        False,
        "DreamBooth prior preservation: also train on class images (made by "
        "the base model from the class prompt, or from a folder) so the model does "
        "not forget the class.",
    )
    class_prompt: str = _f(
        "", "Prompt for class images, e.g. 'a photo of a dog'. Empty: from the dataset's class noun."
    )
    num_class_images: int = _f(8, "How many class images to use (generated once and cached).", min=1, max=1000)
    prior_loss_weight: float = _f(1.0, "Weight of the class-image loss.", min=0.0, max=10.0)
    class_images_dir: str = _f("", "Folder of class images to use instead of generating them.")
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma (5 is common); 0 turns it off.", min=0.0, max=20.0)
    noise_offset: float = _f(0.0, "Noise offset (helps very dark/bright images); 0 turns it off.", min=0.0, max=1.0)
    timestep_sampling: str = _f(
        "auto",
        "How training noise levels are drawn: auto (uniform for SD1/SD2/SDXL, logit-normal for flow models such as "
        "Flux and SD3, through the model's own shift), uniform, or logit_normal (most weight on middle levels).",
        options=TIMESTEP_SAMPLINGS,
    )
    caption_dropout: float = _f(
        0.0,
        "Probability of training an image with an empty caption (helps the LoRA work without the trigger); "
        "above 0 it replaces the dataset's own setting.",
        min=0.0,
        max=0.99,
    )
    seed: int = _f(0, "Seed for noise, timesteps, data order and LoRA initialisation.", min=0, max=2**63 - 1)
    precision: str = _f(
        "fp32",
        "Mixed precision: fp32 (off), bf16 or fp16 autocast, honoured only where the device supports it (fp16 "
        "on CUDA with loss scaling; bf16 on CUDA with bf16 support and on CPU); otherwise fp32 with a warning.",
        options=PRECISIONS,
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, slower.")
    offload: bool = _f(
        False,
        "For models that do not fit in VRAM: load as much of the base model as fits, keep the rest in CPU memory "
        "and bring each layer over when it runs (ComfyUI's low-VRAM loading); those layers are recomputed in the "
        "backward pass. Slower; the result is the same.",
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 turns it off.", min=0.0, max=100.0)
    checkpoint_every: int = _f(
        0,
        "Write a resumable checkpoint every N steps (and always at the end, on "
        "Cancel and before a failure); 0 means only then.",
        min=0,
        max=100000,
    )
    checkpoint_dir: str = _f("", "Folder for this run's checkpoints; empty: none (unless the caller gives one).")

    @property
    def effective_alpha(self) -> float:
        """Return alpha, with 0 meaning alpha = rank."""
        return float(self.alpha) if self.alpha > 0 else float(self.rank)

    @property
    def effective_te_rank(self) -> int:
        """Return the text-encoder rank (``rank`` when ``te_rank`` is 0)."""
        return int(self.te_rank) if self.te_rank > 0 else int(self.rank)

    @property
    def effective_te_alpha(self) -> float:
        """Return the text-encoder alpha (the UNet's effective alpha when ``te_alpha`` is 0)."""
        return float(self.te_alpha) if self.te_alpha > 0 else self.effective_alpha

    @property
    def effective_te_learning_rate(self) -> float:
        """Return the text-encoder learning rate (``learning_rate`` when ``te_learning_rate`` is 0)."""
        return float(self.te_learning_rate) if self.te_learning_rate > 0 else float(self.learning_rate)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Return the module-name suffixes the UNet LoRA targets: ``custom_targets`` if given, else the preset's."""
        return self.targets_for("unet")

    def targets_for(self, architecture: str) -> tuple[str, ...]:
        """Return the suffixes the denoiser LoRA targets in an architecture ("unet", "flux" or "mmdit").

        Raises:
            ValueError: an architecture without presets (and no ``custom_targets``).
        """
        custom = tuple(t.strip() for t in self.custom_targets.split(",") if t.strip())
        if custom:
            return custom
        if architecture not in TARGET_PRESETS_BY_ARCHITECTURE:
            raise ValueError(f"no target presets for a '{architecture}' denoiser: name its layers in custom_targets")
        return TARGET_PRESETS_BY_ARCHITECTURE[architecture][self.target]

    @property
    def text_encoder_targets(self) -> tuple[str, ...]:
        """Return the module-name suffixes the text-encoder LoRA targets (by preset)."""
        return TEXT_ENCODER_TARGETS[self.target]

    def validate(self) -> TrainConfig:
        """Check every field against its type, range and options.

        Returns:
            self (so ``TrainConfig(...).validate()`` chains).

        Raises:
            ValueError: naming the field, its value and what is allowed.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
            # bool is an int subclass: a True rank would otherwise pass as 1.
            if not isinstance(value, expected) or (f.type in ("int", "float") and isinstance(value, bool)):
                raise ValueError(f"TrainConfig.{f.name} = {value!r}: expected a {f.type}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"TrainConfig.{f.name} = {value!r}: must be a finite number")
            lo, hi, options = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("options")
            if options is not None and value not in options:
                raise ValueError(f"TrainConfig.{f.name} = {value!r}: expected one of {list(options)}")
            if lo is not None and value < lo:
                raise ValueError(f"TrainConfig.{f.name} = {value!r}: must be at least {lo}")
            if hi is not None and value > hi:
                raise ValueError(f"TrainConfig.{f.name} = {value!r}: must be at most {hi}")
        return self

    def to_dict(self) -> dict:
        """Return the settings as a plain JSON-ready dict (for metadata and checkpoints)."""
        return asdict(self)


# Settings the Train node takes as text ("1e-4"): ComfyUI's number widgets round or mangle values this small in
# some frontends (Nodes 2.0 of frontend 1.32 shows 1e-4 as "0").
RATE_FIELDS = ("learning_rate", "te_learning_rate")


def parse_rate(value: str | float | int, name: str = "learning_rate") -> float:
    """Return a learning rate given as text ("1e-4", "0.0001", "2E-4") or as a number, checked against its range.

    ``te_learning_rate`` also takes an empty text as 0 (the same as ``learning_rate``). A number (a workflow saved
    when the input was a number widget) is taken as it is.

    Args:
        value: the input's value.
        name: the ``TrainConfig`` field (and node input) it is for; the error names it.

    Raises:
        ValueError: naming the input and the value, when it is not a finite number or is out of the field's range.
    """
    f = next(f for f in fields(TrainConfig) if f.name == name)
    text = value.strip() if isinstance(value, str) else value
    if text == "" and f.default == 0:
        return 0.0
    try:
        if isinstance(text, bool):
            raise TypeError
        rate = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name} = {value!r}: not a number; type it like 1e-4 or 0.0001") from None
    if not math.isfinite(rate):
        raise ValueError(f"{name} = {value!r}: must be a finite number, like 1e-4 or 0.0001")
    lo, hi = f.metadata["min"], f.metadata["max"]
    if not lo <= rate <= hi:
        zero = " (0: the same as learning_rate)" if f.default == 0 else ""
        raise ValueError(f"{name} = {value!r}: must be between {lo:g} and {hi:g}{zero}")
    return rate


def parse_rates(settings: dict) -> dict:
    """Return ``settings`` with the learning rates among them (``RATE_FIELDS``) parsed by ``parse_rate``.

    A rate given as None (an optional node input left out) is dropped, so the field's default applies.

    Raises:
        ValueError: a rate that is not a number in its range (see ``parse_rate``).
    """
    return {
        k: parse_rate(v, k) if k in RATE_FIELDS else v
        for k, v in settings.items()
        if not (k in RATE_FIELDS and v is None)
    }


def help_text(name: str) -> str:
    """Return the help text of a ``TrainConfig`` field (used as a node tooltip).

    Raises:
        KeyError: ``name`` is not a field.
    """
    for f in fields(TrainConfig):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(name)
