"""LoRA file metadata, written and read: kohya ``ss_*``, ``modelspec.*`` and our own ``lora_workbench.*`` keys.

All values are strings (safetensors stores only strings); structured values are JSON. Readers accept what
kohya's sd-scripts, the SAI model spec and this package write, so trigger words and training settings of files
from other trainers show up too. The keys that name the base family, and telling it, are :mod:`lora.families`'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import families
from .state import LoraState

OURS = "lora_workbench."

_KOHYA_SETTINGS = (
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_max_train_steps",
    "ss_num_epochs",
    "ss_epoch",
    "ss_optimizer",
    "ss_lr_scheduler",
    "ss_lr_warmup_steps",
    "ss_resolution",
    "ss_seed",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_module",
    "ss_network_args",
    "ss_mixed_precision",
    "ss_num_train_images",
    "ss_num_reg_images",
    "ss_batch_size_per_device",
    "ss_total_batch_size",
    "ss_gradient_accumulation_steps",
    "ss_noise_offset",
    "ss_clip_skip",
    "ss_prior_loss_weight",
    "ss_sd_model_name",
    "ss_training_comment",
    "ss_gradient_checkpointing",
    "ss_min_snr_gamma",
    "ss_steps",
)


def _fmt_num(x: float | int) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def build_metadata(
    state: LoraState | None = None,
    *,
    rank: int | None = _UNSET,
    alpha: float | None = _UNSET,
    base_family: str | None = _UNSET,
    output_name: str | None = None,
    title: str | None = None,
    trigger_words: Iterable[str] | None = None,
    training_comment: str | None = None,
    training_settings: Mapping[str, Any] | None = None,
    merge_recipe: Mapping[str, Any] | None = None,
    source_hashes: Mapping[str, str] | None = None,
    description: str | None = None,
    created: float | None = None,
    existing: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Return string metadata with kohya ``ss_*`` minimum keys, ``modelspec.*`` keys and ``lora_workbench.*`` keys.

    Args:
        state: when given, rank, alpha and base family default to what its modules and metadata say.
        rank: network dim; ``None`` when modules differ (written as kohya's ``"Dynamic"``).
        alpha: network alpha; ``None`` when modules differ (``"Dynamic"``); defaults to the rank without a state.
        base_family: ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sd3"``, ``"flux"``; None leaves the family keys out.
        output_name: kohya ``ss_output_name`` and the default title.
        title: ``modelspec.title`` (default: ``output_name``).
        trigger_words: words for ``modelspec.trigger_phrase`` (comma-joined) and ours (JSON list); None keeps
            those :func:`trigger_words` finds in ``existing``.
        training_comment: kohya ``ss_training_comment``.
        training_settings: JSON-able settings, stored as ``lora_workbench.training_settings``.
        merge_recipe: JSON-able merge description, stored as ``lora_workbench.merge_recipe``.
        source_hashes: file name -> sha256, stored as ``lora_workbench.source_hashes``.
        description: ``modelspec.description``.
        created: epoch seconds for ``modelspec.date`` (default: now).
        existing: metadata to start from; its keys are kept unless a value is given here.

    Returns:
        The metadata dict; every value is a ``str``.

    Raises:
        ValueError: for an unknown ``base_family`` or a rank below 1.
        TypeError: for ``existing`` values that are not strings.
    """
    meta: dict[str, str] = {}
    for k, v in (existing or {}).items():
        if not isinstance(v, str):
            raise TypeError(f"existing metadata value for '{k}' must be a str, got {type(v).__name__}")
        meta[str(k)] = v
    if state is not None:
        ranks = state.ranks
        alphas = {m.effective_alpha for m in state.modules.values()}
        if rank is _UNSET:
            rank = next(iter(ranks)) if len(ranks) == 1 else None
        if alpha is _UNSET:
            alpha = next(iter(alphas)) if len(alphas) == 1 else None
        if base_family is _UNSET:
            base_family = families.base_family(state, {**state.metadata, **meta})
    if rank is _UNSET:
        rank = None
    if alpha is _UNSET:
        alpha = float(rank) if rank is not None else None
    if base_family is _UNSET:
        base_family = families.family_from_metadata(meta)
    if base_family is not None and base_family not in families.FAMILIES:
        raise ValueError(f"unknown base family '{base_family}'; expected one of {sorted(families.FAMILIES)}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if trigger_words is None:
        # Only explicit trigger words carry over; kohya's tag counts are a guess, not something to write down.
        words = _find_trigger_words(meta, max_tags=0)
    else:
        words = dedupe_words(trigger_words)
    dim = "Dynamic" if rank is None else str(rank)
    alpha_s = "Dynamic" if alpha is None else _fmt_num(alpha)
    date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": dim,
            "ss_network_alpha": alpha_s,
            "modelspec.sai_model_spec": "1.0.0",
            OURS + "rank": dim,
            OURS + "alpha": alpha_s,
            OURS + "trigger_words": json.dumps(words),
        }
    )
    meta.setdefault("modelspec.date", date)
    if created is not None:
        meta["modelspec.date"] = date
    for key, value in (("ss_output_name", output_name), ("ss_training_comment", training_comment)):
        if value is not None or key not in meta:
            meta[key] = value or ""
    if title or output_name or "modelspec.title" not in meta:
        meta["modelspec.title"] = title or output_name or ""
    if words:
        meta["modelspec.trigger_phrase"] = ", ".join(words)
    else:
        meta.pop("modelspec.trigger_phrase", None)
    if description:
        meta["modelspec.description"] = description
    if base_family is not None:
        meta.update(families.family_metadata(base_family))
    if training_settings is not None:
        meta[OURS + "training_settings"] = json.dumps(dict(training_settings), sort_keys=True)
    if merge_recipe is not None:
        meta[OURS + "merge_recipe"] = json.dumps(dict(merge_recipe), sort_keys=True)
    if source_hashes is not None:
        meta[OURS + "source_hashes"] = json.dumps(dict(source_hashes), sort_keys=True)
    return meta


def dedupe_words(words: Iterable[str]) -> list[str]:
    """Return trigger words stripped, empty ones dropped, deduplicated case-insensitively (first spelling and order
    kept): the one rule for trigger words, within a file and across the LoRAs of a stack."""
    seen: set[str] = set()
    out: list[str] = []
    for word in words:
        w = word.strip()
        k = w.casefold()
        if w and k not in seen:
            seen.add(k)
            out.append(w)
    return out


def _json_or_none(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def trigger_words(metadata: Mapping[str, str], *, max_tags: int = 5) -> list[str]:
    """Return trigger words: ours, then ``modelspec.trigger_phrase``, then kohya's most frequent tags.

    Args:
        metadata: file metadata.
        max_tags: how many of the most frequent ``ss_tag_frequency`` tags to add (summed over datasets).

    Returns:
        Words deduplicated case-insensitively, first spelling and order kept.
    """
    words: list[str] = []
    ours = _json_or_none(metadata.get(OURS + "trigger_words"))
    if isinstance(ours, list):
        words += [str(w) for w in ours]
    elif metadata.get(OURS + "trigger_words"):
        words += metadata[OURS + "trigger_words"].split(",")
    words += (metadata.get("modelspec.trigger_phrase") or "").split(",")
    freq = _json_or_none(metadata.get("ss_tag_frequency"))
    if isinstance(freq, dict) and max_tags > 0:
        counts: dict[str, int] = {}
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    t = str(tag).strip()
                    if t:
                        counts[t] = counts.get(t, 0) + int(n)
        # sorted() is stable, so equal counts keep their first-seen order.
        words += sorted(counts, key=lambda t: -counts[t])[:max_tags]
    return dedupe_words(words)


def training_settings(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Return training settings: ours (parsed JSON) plus kohya ``ss_*`` settings under their names without ``ss_``.

    Kohya values that are numbers are returned as numbers; ours win when both name a setting.

    Returns:
        A flat dict (empty when the file records nothing).
    """
    out: dict[str, Any] = {}
    for key in _KOHYA_SETTINGS:
        raw = metadata.get(key)
        if raw is None or raw == "" or raw == "None":
            continue
        value: Any = raw
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                pass
        out[key[len("ss_") :]] = value
    ours = _json_or_none(metadata.get(OURS + "training_settings"))
    if isinstance(ours, dict):
        out.update(ours)
    return out


def describe(
    state_or_sd: LoraState | Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, source: str = ""
) -> dict:
    """Return a summary for a LoRA Info display.

    Args:
        state_or_sd: a state, or a raw state dict (converted with :func:`keys.state_from_dict`).
        metadata: file metadata (default: the state's).
        source: the file's name, for error messages.

    Returns:
        A dict with ``format``, ``modules``, ``unet_modules``, ``te_modules``, ``conv_modules``, ``ranks``,
        ``alphas`` (sorted distinct values; an absent alpha counts as the rank), ``family``, ``trigger_words``,
        ``training_settings``, ``extras`` (names of kept non-factor tensors), ``title`` and ``merge_recipe``; for a
        LyCORIS LoHa/LoKr/DoRA dict, :func:`lycoris.describe`'s summary (the same keys plus ``algorithm``).

    Raises:
        NotALoraError, ValueError: as :func:`keys.state_from_dict` or :func:`lycoris.read_modules` for a raw dict.
    """
    from . import keys, lycoris

    if isinstance(state_or_sd, LoraState):
        state, fmt = state_or_sd, "state"
        meta = dict(metadata if metadata is not None else state.metadata)
    else:
        meta = dict(metadata or {})
        if lycoris.algorithm(state_or_sd) is not None:
            return lycoris.describe(state_or_sd, meta, source=source)
        fmt = keys.detect_format(state_or_sd).value
        state = keys.state_from_dict(state_or_sd, meta, source=source)
    mods = state.modules
    return {
        "format": fmt,
        "modules": len(mods),
        "unet_modules": sum(1 for n in mods if n.startswith("lora_unet_")),
        "te_modules": sum(1 for n in mods if n.startswith("lora_te")),
        "conv_modules": sum(1 for m in mods.values() if m.is_conv),
        "ranks": sorted(state.ranks),
        "alphas": sorted({m.effective_alpha for m in mods.values()}),
        "family": families.base_family(state, meta),
        "trigger_words": trigger_words(meta),
        "training_settings": training_settings(meta),
        "extras": sorted(state.extras),
        "title": meta.get("modelspec.title") or meta.get("ss_output_name") or "",
        "merge_recipe": _json_or_none(meta.get(OURS + "merge_recipe")),
    }


# build_metadata's keyword argument shadows this function's name inside it.
_find_trigger_words = trigger_words
