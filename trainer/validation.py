"""Held-out validation loss: the training objective on images the run does not train on, with fixed draws.

The validation set is ``hold_out`` images of the dataset, chosen by their names alone (the first by the SHA-256 of
the name), so the same folder always holds out the same files whatever the seed, and the run trains on the rest.
``hold_out`` 0 evaluates on training images instead (up to ``TRAINING_IMAGES_EVALUATED`` of them, chosen the same
way: a smoothed training loss, for a 10-image subject set where every image counts); training is then exactly what
it is without validation.

Each image gets ``draws`` (timestep, noise) pairs drawn once from a generator seeded by (seed, image name), so
every evaluation sees the same draws and two evaluations differ only by the LoRA. The loss is the training
objective (``objective.per_example_loss``: epsilon, v or flow matching, min-SNR weights and noise offset as the
run trains), on the image's centre crop at its trained size with its caption, without caption dropout, flips or
prior preservation, averaged over images and draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from . import conds, objective
from .dataset import Example, ImageDataset

DEFAULT_DRAWS = 4
# With hold_out 0, this many training images are evaluated: an evaluation costs about draws x images / 3 training
# steps of batch 1 (forward only), so it stays a few steps' worth whatever the dataset's size.
TRAINING_IMAGES_EVALUATED = 4


@dataclass(frozen=True)
class ValidationConfig:
    """When and on what the validation loss is computed.

    Attributes:
        every: evaluate every this many steps (and before the first step and after the last).
        hold_out: images held out of training to evaluate on; 0 evaluates on the training images.
        draws: fixed (timestep, noise) pairs per image; more lowers the spread of the estimate.
        seed: the seed of those draws.
    """

    every: int = 50
    hold_out: int = 1
    draws: int = DEFAULT_DRAWS
    seed: int = 0

    def validate(self, n_images: int) -> ValidationConfig:
        """Return self when the settings fit a dataset of ``n_images`` images.

        Raises:
            ValueError: a setting out of range, or a hold-out that leaves no image to train on.
        """
        for name, low in (("every", 1), ("hold_out", 0), ("draws", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"ValidationConfig.{name} = {getattr(self, name)}: must be at least {low}")
        if self.hold_out >= n_images:
            raise ValueError(
                f"ValidationConfig.hold_out = {self.hold_out}: the dataset has {n_images} image(s), so no image would "
                "be left to train on (hold out fewer, or 0 to evaluate on the training images)"
            )
        return self


def split(dataset: ImageDataset, hold_out: int) -> tuple[ImageDataset, list[Example]]:
    """Return ``(training set, held-out examples)``: the ``hold_out`` examples whose names hash lowest are held out.

    The training set is ``dataset`` without them (same options, report and identity of what remains); with
    ``hold_out`` 0 it is ``dataset`` itself and the held-out list is empty.
    """
    if hold_out <= 0:
        return dataset, []
    held = {id(e) for e in chosen(dataset.examples, hold_out)}
    kept = [e for e in dataset.examples if id(e) not in held]
    return replace(dataset, examples=kept), [e for e in dataset.examples if id(e) in held]


def chosen(examples: list[Example], n: int) -> list[Example]:
    """Return the ``n`` examples whose names hash lowest (SHA-256), in that order: a choice by file name alone."""
    return sorted(examples, key=lambda e: hashlib.sha256(e.name.encode()).digest())[:n]


def evaluation_set(dataset: ImageDataset, held_out: list[Example]) -> list[Example]:
    """Return the images to evaluate on: the held-out ones, or (none held out) ``TRAINING_IMAGES_EVALUATED``
    training images chosen by name."""
    return held_out or chosen(dataset.examples, TRAINING_IMAGES_EVALUATED)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:validation:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass
class _Item:
    latents: torch.Tensor  # (draws, C, h, w)
    caption: str
    timesteps: torch.Tensor  # (draws,)
    noise: torch.Tensor  # (draws, C, h, w)


class Validator:
    """The fixed validation set of one run, encoded once; ``loss()`` evaluates the model as it is now.

    Args:
        model_api: the model (``trainer.model_api``); images are encoded now, prompts now when ``frozen_text``.
        examples: the images to evaluate on (held out, or the training images).
        settings: the draws and their seed.
        noise_offset, min_snr_gamma, timestep_sampling: the run's objective settings (``TrainConfig``).
        frozen_text: the text encoder does not train, so each caption is encoded once.
    """

    def __init__(
        self,
        model_api,
        examples: list[Example],
        settings: ValidationConfig,
        *,
        noise_offset: float = 0.0,
        min_snr_gamma: float = 0.0,
        timestep_sampling: str = "auto",
        frozen_text: bool = True,
    ):
        self.api = model_api
        self.names = [e.name for e in examples]
        self.min_snr_gamma = min_snr_gamma
        self.frozen: dict[str, conds.Cond] = {}
        self.items: list[_Item] = []
        with torch.no_grad():
            for e in examples:
                x0 = model_api.encode_images(e.pixels[None]).detach()
                latents = x0.expand(settings.draws, *x0.shape[1:])
                gen = _generator(settings.seed, e.name)
                t = objective.sample_timesteps(model_api.schedule, settings.draws, gen, timestep_sampling)
                noise = objective.sample_noise(latents.shape, gen, noise_offset, latents.device)
                self.items.append(_Item(latents, e.caption, t, noise))
                if frozen_text and e.caption not in self.frozen:
                    self.frozen[e.caption] = conds.detached(model_api.encode_prompts([e.caption]))

    def __len__(self) -> int:
        return len(self.items)

    def per_image(self) -> torch.Tensor:
        """Return each image's loss ``(N,)`` (mean over its draws), float32 on the CPU, without gradients."""
        out = []
        with torch.no_grad():
            for item in self.items:
                cond = self.frozen.get(item.caption)
                if cond is None:
                    cond = self.api.encode_prompts([item.caption])  # through a training text encoder's LoRA
                n = item.latents.shape[0]
                per_example = objective.per_example_loss(
                    self.api,
                    item.latents,
                    conds.repeat(cond, n),
                    None,
                    min_snr_gamma=self.min_snr_gamma,
                    timesteps=item.timesteps,
                    noise=item.noise,
                )
                out.append(per_example.float().mean().cpu())
        return torch.stack(out)

    def loss(self) -> float:
        """Return the validation loss: the mean over images and their fixed draws."""
        return float(self.per_image().mean())
