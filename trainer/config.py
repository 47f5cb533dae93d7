"""Training settings: one dataclass whose field help texts also become the nodes' tooltips."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

TARGET_PRESETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    "all_linear": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")


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
    learning_rate: float = _f(1e-4, "AdamW learning rate for the UNet LoRA.", min=1e-7, max=1.0)
    lr_scheduler: str = _f("constant", "Learning-rate schedule after warmup.", options=LR_SCHEDULERS)
    warmup_steps: int = _f(0, "Steps of linear learning-rate warmup.", min=0, max=100000)
    batch_size: int = _f(
        1, "Subject images per step (class images are added on top with prior preservation).", min=1, max=64
    )
    grad_accumulation: int = _f(1, "Batches whose gradients add up before one optimizer step.", min=1, max=1024)
    train_text_encoder: bool = _f(False, "Also train a LoRA on the text encoder's attention and MLP projections.")
    text_encoder_lr: float = _f(5e-5, "Learning rate of the text-encoder LoRA.", min=1e-7, max=1.0)
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
    seed: int = _f(0, "Seed for noise, timesteps, data order and LoRA initialisation.", min=0, max=2**63 - 1)
    precision: str = _f(
        "fp32", "Autocast precision; bf16/fp16 only where the device supports them.", options=PRECISIONS
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, slower.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 turns it off.", min=0.0, max=100.0)
    checkpoint_every: int = _f(
        0,
        "Write a resumable checkpoint every N steps (and always at the end, on "
        "Cancel and before a failure); 0 means only then.",
        min=0,
        max=100000,
    )

    @property
    def effective_alpha(self) -> float:
        """Return alpha, with 0 meaning alpha = rank."""
        return float(self.alpha) if self.alpha > 0 else float(self.rank)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Return the module-name suffixes the UNet LoRA targets."""
        return TARGET_PRESETS[self.target]

    def validate(self) -> None:
        """Check every field against its range and options.

        Raises:
            ValueError: naming the field, its value and what is allowed.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            lo, hi, options = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("options")
            if options is not None and value not in options:
                raise ValueError(f"TrainConfig.{f.name} = {value!r}: expected one of {list(options)}")
            if lo is not None and value < lo:
                raise ValueError(f"TrainConfig.{f.name} = {value!r}: must be at least {lo}")
            if hi is not None and value > hi:
                raise ValueError(f"TrainConfig.{f.name} = {value!r}: must be at most {hi}")

    def to_dict(self) -> dict:
        """Return the settings as a plain dict (for metadata and checkpoints)."""
        return asdict(self)


def help_text(name: str) -> str:
    """Return the help text of a ``TrainConfig`` field (used as a node tooltip)."""
    for f in fields(TrainConfig):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(name)
