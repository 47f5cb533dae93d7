"""LoRA key formats: detection, reading into :class:`LoraState`, and writing back out.

Every reader produces kohya module names (``lora_unet_<path>``, ``lora_te_<path>``, ``lora_te1_``/``lora_te2_``
for SDXL), where ``<path>`` is the module's dotted path with ``.`` replaced by ``_``. Formats read:

- kohya: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``, optional ``.lora_mid.weight``;
- peft / diffusers: ``[unet.|text_encoder.|text_encoder_2.|transformer.]<path>.lora_A[.default].weight`` and
  ``lora_B``; old diffusers ``.lora.down.weight``, ``.lora_linear_layer.down.weight`` and attention-processor
  keys (``attn1.processor.to_q_lora.down.weight``). These files carry no alpha tensors: alpha comes from the
  ``lora_adapter_metadata`` JSON diffusers writes (``r``, ``lora_alpha``, ``alpha_pattern``, per component as
  ``unet.lora_alpha``...), else alpha = rank;
- ComfyUI native (core ``TrainLoraNode``): ``diffusion_model.<path>.lora_down.weight``/``lora_up.weight``/
  ``alpha`` plus ``.diff``/``.diff_b`` full deltas for 1-D parameters, kept as ``LoraState.extras``.

LyCORIS LoCon files (``lycoris_<diffusers UNet path>.lora_down.weight``...) read as kohya ``lora_unet_`` names.
LoHa, LoKr and DoRA files are recognised and refused here with :class:`UnsupportedLoraError` (their factors are not
``up @ down``); :mod:`.lycoris` describes them and materialises LoHa/LoKr deltas.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import torch

from . import identity
from .state import LoraModule, LoraState


class KeyFormat(str, Enum):
    """Key layouts of LoRA state dicts."""

    KOHYA = "kohya"
    PEFT = "peft"
    DIFFUSERS = "diffusers"
    COMFY_NATIVE = "comfy_native"
    LYCORIS_LOHA = "lycoris_loha"
    LYCORIS_LOKR = "lycoris_lokr"
    DORA = "dora"
    UNKNOWN = "unknown"


class UnsupportedLoraError(ValueError):
    """A recognised adapter type (LoHa, LoKr, DoRA) whose factors this package cannot operate on."""


class NotALoraError(ValueError):
    """A state dict that holds no LoRA factors (a checkpoint, an embedding, an empty file...)."""


class DamagedLoraError(ValueError):
    """A LoRA whose factors are broken: a module missing a factor, or factors whose shapes do not chain."""


LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # the key diffusers' save_lora_weights uses
TE_NAMES_METADATA_KEY = "lora_workbench.text_encoder_names"

_KOHYA_NAME = re.compile(r"^(lora_unet|lora_te\d?)_(.+)$")

# (regex, role). Order matters only where patterns overlap (processor keys before the generic ``.lora.``).
_ROLE_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.down\.weight$"), "down"),
    (re.compile(r"^(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.up\.weight$"), "up"),
    (re.compile(r"^(?P<mod>.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(?P<mod>.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(?P<mod>.+)\.lora_mid\.weight$"), "mid"),
    (re.compile(r"^(?P<mod>.+)\.lora_A(?:\.[A-Za-z0-9_\-]+)?\.weight$"), "down"),
    (re.compile(r"^(?P<mod>.+)\.lora_B(?:\.[A-Za-z0-9_\-]+)?\.weight$"), "up"),
    (re.compile(r"^(?P<mod>.+)\.lora(?:_layer|_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"^(?P<mod>.+)\.lora(?:_layer|_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"^(?P<mod>.+)\.alpha$"), "alpha"),
    (re.compile(r"^(?P<mod>.+)\.(?P<extra>diff|diff_b|set_weight)$"), "extra"),
]

# Words of SD/SDXL/SD3/Flux/CLIP/T5 module paths that themselves contain "_". Used to split a kohya name back
# into a dotted path (``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``).
_PATH_WORDS = sorted(
    {
        # diffusers UNet
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "conv_in",
        "conv_out",
        "conv_shortcut",
        "time_emb_proj",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        "class_embedding",
        "conv_norm_out",
        "to_add_out",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "ff_context",
        "norm_out",
        "norm_q",
        "norm_k",
        "context_embedder",
        "x_embedder",
        "time_text_embed",
        "timestep_embedder",
        "text_embedder",
        "guidance_embedder",
        "proj_mlp",
        "single_transformer_blocks",
        "pos_embed",
        "norm1_context",
        "to_add_q",
        # ldm / ComfyUI UNet
        "input_blocks",
        "middle_block",
        "output_blocks",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
        # CLIP / T5
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "layer_norm1",
        "layer_norm2",
        "final_layer_norm",
        "token_embedding",
        "position_embedding",
        "text_projection",
        "relative_attention_bias",
        "wi_0",
        "wi_1",
        "DenseReluDense",
        "SelfAttention",
        "EncDecAttention",
        "layer_norm",
        # Flux / SD3 (kohya names)
        "double_blocks",
        "single_blocks",
        "img_attn",
        "txt_attn",
        "img_mlp",
        "txt_mlp",
        "img_mod",
        "txt_mod",
        "img_in",
        "txt_in",
        "time_in",
        "vector_in",
        "guidance_in",
        "in_layer",
        "out_layer",
        "final_layer",
        "adaLN_modulation",
        "joint_blocks",
        "x_block",
        "context_block",
        "t_embedder",
        "y_embedder",
    },
    key=lambda w: -w.count("_"),
)
_PATH_WORDS_BY_PARTS: dict[int, set[str]] = {}
for _w in _PATH_WORDS:
    _PATH_WORDS_BY_PARTS.setdefault(_w.count("_") + 1, set()).add(_w)
_MAX_PARTS = max(_PATH_WORDS_BY_PARTS)

# Kohya unet paths that are already in the model's own (ComfyUI/ldm) naming, so ``diffusion_model.<path>`` is a
# real model key without a conversion table.
_MODEL_NATIVE_ROOTS = (
    "input_blocks",
    "middle_block",
    "output_blocks",
    "double_blocks",
    "single_blocks",
    "joint_blocks",
    "time_embed",
    "label_emb",
    "out",
)


def split_module_path(underscored: str) -> str:
    """Return the dotted module path of an underscore-joined path, using known SD/CLIP module words.

    ``down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj`` ->
    ``down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj``. Words not in the table are split at
    every ``_``, which is right for plain words (``attn1``, ``proj``) and wrong for unknown compound names.

    Returns:
        The dotted path.
    """
    parts = underscored.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for n in range(min(_MAX_PARTS, len(parts) - i), 1, -1):
            cand = "_".join(parts[i : i + n])
            if cand in _PATH_WORDS_BY_PARTS.get(n, ()):
                out.append(cand)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def kohya_name(prefix: str, path: str) -> str:
    """Return the kohya module name ``<prefix>_<path with . replaced by _>``.

    Text-encoder paths (``lora_te*`` prefixes) are put into the kohya/A1111 form first (:func:`text_encoder_path`),
    so names follow the convention ``lora_te_text_model_encoder_layers_N_...``.

    Returns:
        The kohya name.
    """
    if prefix.startswith("lora_te"):
        path = text_encoder_path(path)
    return f"{prefix}_{path.replace('.', '_')}"


def text_encoder_path(path: str) -> str:
    """Return a CLIP text-encoder module path in the kohya/A1111 form ``text_model.encoder.layers.N...``.

    transformers 5 dropped ``text_model.`` from ``CLIPTextModel``'s module names, and ComfyUI and peft add their own
    prefixes (``clip_l.transformer.``, ``base_model.model.``); the convention starts at ``text_model.``. So a dotted
    path is cut to start at ``encoder.layers.`` and ``text_model.`` is put before it, and a path that starts at
    ``embeddings`` or ``final_layer_norm`` gets ``text_model.`` too. An underscore path (a kohya name's tail) that
    starts at ``encoder_layers_N``, ``embeddings`` or ``final_layer_norm`` gets ``text_model_``. Other paths (T5's
    ``encoder.block...``, paths already in the form) are returned as they are.
    """
    index = path.find("encoder.layers.")
    if index >= 0:
        return "text_model." + path[index:]
    if re.match(r"^(embeddings|final_layer_norm)(\.|$)", path):
        return "text_model." + path
    if re.match(r"^(encoder_layers_\d+|embeddings|final_layer_norm)(_|$)", path):
        return "text_model_" + path
    return path


def detect_format(sd: Mapping[str, Any]) -> KeyFormat:
    """Return the key format of a state dict (the dominant one if keys are mixed).

    Returns:
        A :class:`KeyFormat`; ``UNKNOWN`` when no key looks like a LoRA factor.
    """
    keys = list(sd)
    if any(".hada_w1_a" in k or ".hada_w2_a" in k for k in keys):
        return KeyFormat.LYCORIS_LOHA
    if any(".lokr_w1" in k or ".lokr_w2" in k for k in keys):
        return KeyFormat.LYCORIS_LOKR
    if any(k.endswith(".dora_scale") or ".lora_magnitude_vector" in k for k in keys):
        return KeyFormat.DORA
    factor_keys = [k for k in keys if _role(k) is not None and _role(k)[0] in ("down", "up")]
    if not factor_keys:
        return KeyFormat.UNKNOWN
    if any(_KOHYA_NAME.match(k) or k.startswith("lycoris_") for k in factor_keys):
        return KeyFormat.KOHYA
    if any(k.startswith(("diffusion_model.", "text_encoders.")) for k in factor_keys):
        return KeyFormat.COMFY_NATIVE
    if any(".lora_A." in k or ".lora_B." in k for k in factor_keys):
        if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.", "transformer.")) for k in factor_keys):
            return KeyFormat.DIFFUSERS
        return KeyFormat.PEFT
    return KeyFormat.DIFFUSERS


def _role(key: str) -> tuple[str, str, str | None] | None:
    """Return ``(role, module part, extra suffix)`` of a key, or None when it is not a LoRA key."""
    for pattern, role in _ROLE_PATTERNS:
        m = pattern.match(key)
        if m:
            mod = m.group("mod")
            groups = m.groupdict()
            if groups.get("proj"):
                mod = f"{mod}.{'to_out.0' if groups['proj'] == 'to_out' else groups['proj']}"
            return role, mod, groups.get("extra")
    return None


def module_part(key: str) -> str | None:
    """Return the module part of a LoRA tensor key as the file writes it, or None for a key that is no LoRA key.

    ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` ->
    ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``; ``lora_te_x.alpha`` -> ``lora_te_x``.
    """
    found = _role(key)
    return None if found is None else found[1]


def is_factor_key(key: str) -> bool:
    """Return True for a key holding a low-rank factor (down/up/mid), not an alpha or a full delta."""
    found = _role(key)
    return found is not None and found[0] in ("down", "up", "mid")


def alphas_in_header(sd: Mapping[str, Any], metadata: Mapping[str, str]) -> bool:
    """Return True when a file's alphas live in diffusers' ``lora_adapter_metadata`` header, not in tensors.

    ComfyUI ignores that header and applies such files at alpha = rank; readers here take the header's alphas.
    """
    return LORA_ADAPTER_METADATA_KEY in metadata and not any(k.endswith(".alpha") for k in sd)


def _component(mod: str, te_names: dict[str, str]) -> tuple[str, str]:
    """Return ``(kohya prefix, dotted path)`` of a module part of a key."""
    m = _KOHYA_NAME.match(mod)
    if m and "." not in mod:
        prefix, path = m.group(1), m.group(2)
        if prefix.startswith("lora_te"):
            path = text_encoder_path(path)
        return prefix, path
    if mod.startswith("lycoris_") and "." not in mod:
        # LyCORIS on a diffusers UNet; ComfyUI maps lycoris_<path> exactly like lora_unet_<path>.
        return "lora_unet", mod[len("lycoris_") :]
    for lead in ("base_model.model.",):
        if mod.startswith(lead):
            mod = mod[len(lead) :]
    table = (
        ("diffusion_model.", "lora_unet"),
        ("unet.", "lora_unet"),
        ("transformer.", "lora_unet"),
        ("text_encoders.clip_l.transformer.", te_names.get("text_encoder", "lora_te")),
        ("text_encoders.clip_g.transformer.", "lora_te2"),
        ("text_encoder_2.", "lora_te2"),
        ("text_encoder_3.", "lora_te3"),
        ("text_encoder.", te_names.get("text_encoder", "lora_te")),
    )
    for lead, prefix in table:
        if mod.startswith(lead):
            return prefix, mod[len(lead) :]
    # No component prefix: a bare peft model. CLIP paths are recognisable; everything else is the denoiser.
    if re.match(r"^(text_model\.|encoder\.layers\.\d+\.self_attn)", mod):
        return te_names.get("text_encoder", "lora_te"), mod
    return "lora_unet", mod


def _adapter_configs(metadata: Mapping[str, str], where: str) -> dict[str, dict[str, Any]]:
    """Return peft configs by component ("" for an unprefixed one) from diffusers' ``lora_adapter_metadata``.

    Every field used is type-checked, since the file (not our code) wrote it: ``r`` an int, ``lora_alpha`` a
    number, ``alpha_pattern``/``rank_pattern`` objects of numbers, ``use_rslora`` a bool.

    Raises:
        ValueError: for a value that is not JSON or has the wrong type, naming the file and the field.
    """
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: metadata '{LORA_ADAPTER_METADATA_KEY}' is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{where}: metadata '{LORA_ADAPTER_METADATA_KEY}' is a {type(data).__name__}, not an object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        comp, _, fld = str(key).rpartition(".")
        check = _CONFIG_FIELDS.get(fld)
        if check is None or value is None:
            continue
        if not check(value):
            raise ValueError(
                f"{where}: metadata '{LORA_ADAPTER_METADATA_KEY}' field '{key}' has an invalid value {value!r:.80}"
            )
        configs.setdefault(comp, {})[fld] = value
    return configs


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_number_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items())


_CONFIG_FIELDS: dict[str, Callable[[Any], bool]] = {
    "r": lambda v: _is_number(v) and float(v).is_integer() and v >= 1,
    "lora_alpha": _is_number,
    "alpha_pattern": _is_number_map,
    "rank_pattern": _is_number_map,
    "use_rslora": lambda v: isinstance(v, bool) or str(v).lower() in ("true", "false"),
}


def pattern_matches(pattern: str, path: str) -> bool:
    """Return True when an ``alpha_pattern``/``rank_pattern`` key names the module ``path``.

    peft matches these keys as regular expressions against a suffix of the path (``(.*\\.)?(key)$``). A file's
    keys are not compiled here: a crafted pattern could make the server spin for hours (catastrophic
    backtracking). They are compared literally instead, as the module path or a dotted suffix of it, which is
    what diffusers and peft write (``down_blocks.0.attentions.0...to_q``, ``attn2.to_k``); a pattern that relies
    on regex syntax matches nothing and its modules keep the component's ``lora_alpha``.
    """
    return path == pattern or path.endswith("." + pattern)


_COMPONENT_OF_PREFIX = {
    "lora_unet": ("unet", "transformer", ""),
    "lora_te": ("text_encoder", ""),
    "lora_te1": ("text_encoder", ""),
    "lora_te2": ("text_encoder_2",),
    "lora_te3": ("text_encoder_3",),
}


def _alpha_from_config(configs: dict[str, dict[str, Any]], prefix: str, path: str, rank: int) -> float | None:
    for comp in _COMPONENT_OF_PREFIX.get(prefix, ("",)):
        cfg = configs.get(comp)
        if not cfg:
            continue
        alpha = None
        patterns = cfg.get("alpha_pattern") or {}
        if path in patterns:
            alpha = patterns[path]
        else:
            alpha = next((val for pat, val in patterns.items() if pattern_matches(pat, path)), None)
        if alpha is None:
            alpha = cfg.get("lora_alpha")
        if alpha is None:
            continue
        alpha = float(alpha)
        if str(cfg.get("use_rslora", "false")).lower() == "true":
            # rsLoRA scales by alpha / sqrt(r); store the alpha that gives the same scale under alpha / r.
            alpha = alpha * math.sqrt(rank)
        return alpha
    return None


def state_from_dict(
    sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    source: str = "",
    canonical: bool = True,
) -> LoraState:
    """Convert a LoRA state dict of any supported format into a :class:`LoraState` with kohya names.

    Args:
        sd: tensors keyed in kohya, peft, diffusers or ComfyUI-native form (formats may mix).
        metadata: the file's string metadata (kept on the state; diffusers' ``lora_adapter_metadata`` is used
            for alphas and then dropped, since writers regenerate it).
        source: a file name for error messages, kept as ``state.source``.
        canonical: rename modules to one name per layer (:func:`identity.canonicalize`); False keeps the names
            the file's keys give.

    Returns:
        The state; 1-D full deltas (``.diff``/``.diff_b``) are in ``state.extras``.

    Raises:
        UnsupportedLoraError: for LoHa, LoKr or DoRA files.
        NotALoraError: when no key is a LoRA factor (a checkpoint, an embedding, an empty dict).
        ValueError: for keys that are neither factors nor known extras, a module missing its up or down
            factor, or factors whose shapes do not chain (naming the module and both shapes), wrongly typed
            metadata, and two modules naming one layer.
    """
    where = f"'{source}'" if source else "the adapter"
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    fmt = detect_format(sd)
    if fmt in (KeyFormat.LYCORIS_LOHA, KeyFormat.LYCORIS_LOKR, KeyFormat.DORA):
        label = {
            KeyFormat.LYCORIS_LOHA: "LyCORIS LoHa",
            KeyFormat.LYCORIS_LOKR: "LyCORIS LoKr",
            KeyFormat.DORA: "DoRA",
        }[fmt]
        marker = {KeyFormat.LYCORIS_LOHA: ".hada_", KeyFormat.LYCORIS_LOKR: ".lokr_", KeyFormat.DORA: "dora_scale"}[
            fmt
        ]
        example = next((k for k in sd if marker in k), next(iter(sd)))
        raise UnsupportedLoraError(
            f"{where} is a {label} adapter (e.g. key '{example}'). ComfyUI can still apply this file directly "
            f"(use it in a LoRA stack); its factors are not LoRA up/down factors, so merge and format conversion "
            f"go through lora.lycoris (LoHa and LoKr as exact per-layer deltas; DoRA needs the model's weights)."
        )
    if fmt is KeyFormat.UNKNOWN:
        keys = sorted(sd)
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
            hint = "it looks like a full model checkpoint; load it with a checkpoint loader"
        elif not keys:
            hint = "it holds no tensors"
        else:
            hint = "none of its keys are LoRA factors (lora_down/lora_up, lora_A/lora_B)"
        raise NotALoraError(f"not a LoRA file: {where}: {hint} (first keys: {keys[:3]})")

    te_names: dict[str, str] = {}
    has_te2 = any(k.startswith(("text_encoder_2.", "text_encoders.clip_g.")) for k in sd)
    if has_te2:
        te_names["text_encoder"] = "lora_te1"
    if TE_NAMES_METADATA_KEY in meta:
        te_names.update(_te_names(meta.pop(TE_NAMES_METADATA_KEY), where))

    parts: dict[str, dict[str, Any]] = {}
    extras: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        found = _role(key)
        if found is None:
            unknown.append(key)
            continue
        role, mod, extra = found
        prefix, path = _component(mod, te_names)
        name = kohya_name(prefix, path)
        if role == "extra":
            extras[f"{name}.{extra}"] = tensor
            continue
        entry = parts.setdefault(name, {"prefix": prefix, "path": path})
        if role in entry:
            raise DamagedLoraError(f"{where}: module '{name}' has two {role} tensors (second key '{key}')")
        entry[role] = tensor
    if unknown:
        raise ValueError(
            f"{where}: {len(unknown)} keys are neither LoRA factors nor known extras, e.g. {sorted(unknown)[:5]}"
        )

    configs = _adapter_configs(meta, where)
    meta.pop(LORA_ADAPTER_METADATA_KEY, None)
    modules: dict[str, LoraModule] = {}
    for name in sorted(parts):
        entry = parts[name]
        if "down" not in entry or "up" not in entry:
            have = sorted(r for r in ("down", "up", "mid", "alpha") if r in entry)
            raise DamagedLoraError(f"{where}: module '{name}' is incomplete: has {have}, needs both down and up")
        down, up, mid = entry["down"], entry["up"], entry.get("mid")
        _check_shapes(name, down, up, mid, where)
        if "alpha" in entry:
            alpha: float | None = float(entry["alpha"].float().item())
        else:
            alpha = _alpha_from_config(configs, entry["prefix"], entry["path"], int(down.shape[0]))
        modules[name] = LoraModule(down=down, up=up, alpha=alpha, mid=mid)
    state = LoraState(modules=modules, metadata=meta, extras=extras, source=source)
    return identity.canonicalize(state) if canonical else state


def _te_names(raw: str, where: str) -> dict[str, str]:
    """Return the text-encoder prefixes recorded by :func:`to_peft_dict`, type-checked.

    Raises:
        ValueError: unless the value is a JSON object of ``text_encoder[_N]`` -> ``lora_te[N]``.
    """
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str)
        and isinstance(v, str)
        and re.fullmatch(r"text_encoder(_\d)?", k)
        and re.fullmatch(r"lora_te\d?", v)
        for k, v in value.items()
    ):
        raise ValueError(
            f"{where}: metadata '{TE_NAMES_METADATA_KEY}' must map text_encoder[_N] to lora_te[N], got {raw!r:.80}"
        )
    return value


def _check_shapes(name: str, down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None, where: str) -> None:
    shapes = f"down {tuple(down.shape)}, up {tuple(up.shape)}"
    if mid is not None:
        shapes += f", mid {tuple(mid.shape)}"
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise DamagedLoraError(f"{where}: module '{name}' has factors of unexpected dimensions: {shapes}")
    if mid is not None:
        if mid.dim() != 4 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]:
            raise DamagedLoraError(f"{where}: module '{name}' has mismatched Tucker factors: {shapes}")
        return
    if up.shape[1] != down.shape[0]:
        raise DamagedLoraError(
            f"{where}: module '{name}' has mismatched shapes: {shapes} (up has {up.shape[1]} columns, "
            f"down has {down.shape[0]} rows)"
        )
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise DamagedLoraError(f"{where}: module '{name}' has a conv up factor that is not 1x1: {shapes}")


def _alpha_tensor(module: LoraModule) -> torch.Tensor:
    return torch.tensor(module.effective_alpha, dtype=torch.float32)


def to_kohya_dict(state: LoraState) -> dict[str, torch.Tensor]:
    """Return the kohya state dict of a state: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

    ``.alpha`` is always written, from the module's alpha (the rank only when alpha is absent, which is the
    same scale), plus ``.lora_mid.weight`` for Tucker modules and the state's extras as they are.

    Returns:
        The dict (tensors shared with the state, not copied).

    Raises:
        ValueError: for a module name that is not a kohya name.
    """
    out: dict[str, torch.Tensor] = {}
    for name, m in state.modules.items():
        if not _KOHYA_NAME.match(name):
            raise ValueError(f"module name '{name}' is not a kohya name (lora_unet_..., lora_te_...)")
        out[f"{name}.lora_down.weight"] = m.down
        out[f"{name}.lora_up.weight"] = m.up
        out[f"{name}.alpha"] = _alpha_tensor(m)
        if m.mid is not None:
            out[f"{name}.lora_mid.weight"] = m.mid
    out.update(state.extras)
    return out


def _split_kohya(name: str) -> tuple[str, str]:
    m = _KOHYA_NAME.match(name)
    if not m:
        raise ValueError(f"module name '{name}' is not a kohya name (lora_unet_..., lora_te_...)")
    return m.group(1), split_module_path(m.group(2))


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def to_peft_dict(
    state: LoraState, prefix_style: str = "diffusers", *, unet_prefix: str = "unet"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return a peft/diffusers state dict and the metadata that carries its alphas.

    Keys are ``<component>.<dotted path>.lora_A.weight`` / ``lora_B.weight`` (``prefix_style="diffusers"``,
    components ``unet`` (or ``unet_prefix``), ``text_encoder``, ``text_encoder_2``) or bare
    ``<dotted path>.lora_A.weight`` (``"peft"``, one model only). Alphas go into ``lora_adapter_metadata`` as
    diffusers writes it (``<component>.r``, ``.lora_alpha``, and ``.alpha_pattern``/``.rank_pattern`` keyed by
    full module paths for modules that differ), so :func:`state_from_dict` reads them back exactly.

    Returns:
        ``(state_dict, metadata)``; metadata is the state's metadata plus ``lora_adapter_metadata``.

    Raises:
        ValueError: for an unknown ``prefix_style``, Tucker (``mid``) modules (peft has no such layer), a
            ``"peft"`` style request on a state with several components, or non-kohya module names.
    """
    if prefix_style not in ("diffusers", "peft"):
        raise ValueError(f"prefix_style must be 'diffusers' or 'peft', got '{prefix_style}'")
    comp_of = {
        "lora_unet": unet_prefix,
        "lora_te": "text_encoder",
        "lora_te1": "text_encoder",
        "lora_te2": "text_encoder_2",
        "lora_te3": "text_encoder_3",
    }
    by_comp: dict[str, list[tuple[str, str, LoraModule]]] = {}
    for name, m in state.modules.items():
        if m.mid is not None:
            raise ValueError(f"module '{name}' has a Tucker core (lora_mid); the peft format cannot hold it")
        prefix, path = _split_kohya(name)
        by_comp.setdefault(comp_of[prefix], []).append((prefix, path, m))
    if prefix_style == "peft" and len(by_comp) > 1:
        raise ValueError(
            f"prefix_style='peft' holds one model, but the state has modules for {sorted(by_comp)}; "
            f"use prefix_style='diffusers'"
        )
    sd: dict[str, torch.Tensor] = {}
    adapter_meta: dict[str, Any] = {}
    te_prefixes = {p for mods in by_comp.values() for p, _, _ in mods if p in ("lora_te", "lora_te1")}
    for comp, mods in by_comp.items():
        lead = f"{comp}." if prefix_style == "diffusers" else ""
        key_lead = f"{comp}." if prefix_style == "diffusers" else ""
        ranks = [m.rank for _, _, m in mods]
        alphas = [m.effective_alpha for _, _, m in mods]
        r = max(set(ranks), key=ranks.count)
        a = max(set(alphas), key=alphas.count)
        alpha_pattern = {path: _num(al) for (_, path, _), al in zip(mods, alphas) if al != a}
        rank_pattern = {path: rk for (_, path, _), rk in zip(mods, ranks) if rk != r}
        for _, path, m in mods:
            sd[f"{lead}{path}.lora_A.weight"] = m.down
            sd[f"{lead}{path}.lora_B.weight"] = m.up
        adapter_meta.update(
            {
                f"{key_lead}r": r,
                f"{key_lead}lora_alpha": _num(a),
                f"{key_lead}alpha_pattern": alpha_pattern,
                f"{key_lead}rank_pattern": rank_pattern,
            }
        )
    for name, t in state.extras.items():
        mod_name, _, suffix = name.rpartition(".")
        prefix, path = _split_kohya(mod_name)
        lead = f"{comp_of[prefix]}." if prefix_style == "diffusers" else ""
        sd[f"{lead}{path}.{suffix}"] = t
    meta = dict(state.metadata)
    meta[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_meta, sort_keys=True)
    # "text_encoder" alone reads back as lora_te; record an SDXL-style lora_te1 without lora_te2 explicitly.
    if "lora_te1" in te_prefixes and "text_encoder_2" not in by_comp:
        meta[TE_NAMES_METADATA_KEY] = json.dumps({"text_encoder": "lora_te1"})
    return sd, meta


def _default_model_path(name: str) -> str:
    prefix, path = _split_kohya(name)
    if prefix == "lora_unet":
        if path.split(".")[0] not in _MODEL_NATIVE_ROOTS:
            raise ValueError(
                f"module '{name}' uses diffusers naming; the ComfyUI-native form needs the model's own key for "
                f"it: pass kohya_to_model_path (e.g. built from comfy.lora.model_lora_keys_unet)"
            )
        return f"diffusion_model.{path}"
    if prefix in ("lora_te", "lora_te1"):
        return f"text_encoders.clip_l.transformer.{path}"
    if prefix == "lora_te2":
        return f"text_encoders.clip_g.transformer.{path}"
    raise ValueError(f"module '{name}': no ComfyUI-native text encoder path for prefix '{prefix}'")


def to_comfy_native_dict(
    state: LoraState,
    kohya_to_model_path: Mapping[str, str] | Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Return the ComfyUI-native dict (as core ``TrainLoraNode`` emits): ``<model path>.lora_up.weight`` etc.

    Args:
        state: the adapter.
        kohya_to_model_path: kohya name -> model key (``diffusion_model.input_blocks.1.1....to_q``, a trailing
            ``.weight`` is dropped), as a mapping or callable. ComfyUI's ``comfy.lora.model_lora_keys_unet``
            gives exactly such a mapping. Without it, ldm-named unet modules map to ``diffusion_model.<path>`` and
            text-encoder modules to ``text_encoders.clip_l|clip_g.transformer.<path>``.

    Returns:
        The dict, with ``.alpha`` tensors and extras (``.diff``/``.diff_b``) under model paths.

    Raises:
        ValueError: for a module the mapping does not cover (naming it).
    """

    def model_path(name: str) -> str:
        if kohya_to_model_path is None:
            p = _default_model_path(name)
        elif callable(kohya_to_model_path):
            p = kohya_to_model_path(name)
        else:
            if name not in kohya_to_model_path:
                raise ValueError(f"module '{name}' is not in the kohya -> model key mapping")
            p = kohya_to_model_path[name]
        return p[: -len(".weight")] if p.endswith(".weight") else p

    out: dict[str, torch.Tensor] = {}
    for name, m in state.modules.items():
        p = model_path(name)
        out[f"{p}.lora_up.weight"] = m.up
        out[f"{p}.lora_down.weight"] = m.down
        out[f"{p}.alpha"] = _alpha_tensor(m)
        if m.mid is not None:
            out[f"{p}.lora_mid.weight"] = m.mid
    for name, t in state.extras.items():
        mod_name, _, suffix = name.rpartition(".")
        out[f"{model_path(mod_name)}.{suffix}"] = t
    return out
