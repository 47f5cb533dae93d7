"""What defines a training run, so a checkpoint is resumed only by the run it belongs to.

A checkpoint stores a record of its run: the dataset's content (a digest per image of the pixels trained on,
its caption and repeats), the base model's identity (UNet, text encoder, VAE) and every setting that changes
the result. Settings that only say how long to train, how often to save or where the base weights live
(``steps``, ``checkpoint_every``, ``checkpoint_dir``, ``offload``) may change between sessions of one run.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

# Settings a resumed run may change: how far to train, how often to save and where the weights live, not what
# is learned.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "checkpoint_dir", "offload")
_SAMPLE = 4096  # elements per tensor that enter a weights digest


def weights_digest(module: torch.nn.Module) -> str:
    """Return a short digest of a module's parameters and buffers: names, shapes, dtypes and sampled sums.

    Each tensor contributes the float64 sum of an evenly strided sample of at most 4096 elements, so the cost
    stays small for billions of weights while any fine-tune, merge or baked-in LoRA (which changes every
    element of the layers it touches) changes the digest.
    """
    digest = hashlib.sha256()
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, t in tensors:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLE)]
        total = float(sample.float().sum(dtype=torch.float64)) if sample.numel() else 0.0
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{total:.6e};".encode())
    return digest.hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    """Return a short digest of a tensor's shape and values rounded to 6 significant digits."""
    values = t.detach().float().cpu().reshape(-1)
    sample = values[:: max(1, values.numel() // _SAMPLE)]
    text = ",".join(f"{v:.6e}" for v in sample.tolist())
    return hashlib.sha256(f"{tuple(t.shape)}|{text}".encode()).hexdigest()[:16]


def combined(identity: dict[str, str]) -> str:
    """Return one short string for a model identity ``{part: digest}`` (keys the class-image cache)."""
    return hashlib.sha256(repr(sorted(identity.items())).encode()).hexdigest()[:16]


def make_record(settings: dict, dataset_identity: dict[str, str], model_identity: dict[str, str]) -> dict:
    """Return the JSON record of a run from its settings (``TrainConfig.to_dict()``) and identities."""
    return {
        "settings": {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES},
        "dataset": dataset_identity,
        "model": model_identity,
    }


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def differences(saved: dict | None, wanted: dict) -> list[str]:
    """Return what differs between a checkpoint's run record and this run's, in words (empty: the same run)."""
    if not saved:
        return ["the checkpoint holds no run record (it was written by an older version)"]
    out = []
    old, new = saved.get("settings", {}), wanted["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key} was {old.get(key)!r}, now {new.get(key)!r}")
    old, new = saved.get("dataset", {}), wanted["dataset"]
    if old.get("<options>") != new.get("<options>"):
        out.append("the dataset's crop, flip, repeats, caption dropout, buckets or resolution changed")
    images_old = {k: v for k, v in old.items() if k != "<options>"}
    images_new = {k: v for k, v in new.items() if k != "<options>"}
    added = sorted(set(images_new) - set(images_old))
    removed = sorted(set(images_old) - set(images_new))
    changed = sorted(k for k in set(images_old) & set(images_new) if images_old[k] != images_new[k])
    for what, names in (("added", added), ("removed", removed), ("changed (pixels or caption)", changed)):
        if names:
            out.append(f"dataset: {len(names)} image(s) {what}: {_names(names)}")
    old, new = saved.get("model", {}), wanted["model"]
    for part in sorted(set(old) | set(new)):
        if old.get(part) != new.get(part):
            out.append(f"the base model's {part.replace('_', ' ')} differs")
    return out


def set_aside(folder: str | Path, step: int) -> Path:
    """Rename a run's checkpoint folder to ``<name>.previous-<step>-<time>`` beside it; return the new path.

    Nothing is deleted: a fresh run then starts in an empty folder of the old name.
    """
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.previous-step{step}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.previous-step{step}-{stamp}-{n}")
    os.replace(folder, target)
    return target
