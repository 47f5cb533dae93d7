"""LyCORIS adapters (LoHa, LoKr, and DoRA on top of them or of LoRA): read, describe, and materialise per layer.

A LyCORIS module is not ``up @ down``, so :mod:`.keys` does not read it into a :class:`LoraState` directly. Here
each module's exact weight change is materialised (float64) from its factors, with the scale rules LyCORIS and
ComfyUI share (``rank`` below is the file's ``lora_dim``, told by the factor shapes):

- LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``, ``rank = w1_b.shape[0]``; with Tucker cores
  (``hada_t1``/``hada_t2``) each half is ``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)``.
- LoKr: ``kron(w1, w2) * alpha / rank``, where ``w1`` is ``lokr_w1`` or ``w1_a @ w1_b``, ``w2`` is ``lokr_w2``,
  ``w2_a @ w2_b`` or the Tucker form with ``lokr_t2``; ``rank`` is that of the factored half (``w2_b.shape[0]``,
  else ``w1_b.shape[0]``); with both halves full the scale is 1 (LyCORIS sets alpha = lora_dim then).
- full (``.diff``): the delta as stored.

An absent alpha means alpha = rank (scale 1), the rule stated in :mod:`.state`.

:func:`state_from_any` turns such a file into a :class:`LoraState` whose modules are exact low-rank factors of
those deltas, built from the LyCORIS factors (LoHa's Hadamard product is a Khatri-Rao product of rank ``rank**2``,
LoKr's Kronecker product one of rank ``rank(w1) * rank(w2)``), so merge and conversion work on them unchanged;
:mod:`.merge`'s ``svd`` method then re-factors to a chosen rank and reports the error it made against these exact
deltas.

DoRA (``dora_scale``) is described but not materialised: its change rescales ``W + delta`` by the column norms of
that sum, so it depends on the base model's weights, which a file-level merge or conversion does not have.

Conv layers: LyCORIS stores non-Tucker conv factors flattened, ``(rank, in * kh * kw)``; the kernel size is not in
the file, so such modules become LoRA factors of the same flattened shape (ComfyUI reshapes a delta to the weight
it patches, so it loads them; tools that build conv layers from the factor shapes do not).

Names: LyCORIS on a diffusers UNet writes ``lycoris_<diffusers path with _>``; ComfyUI maps that prefix for the
UNet exactly like ``lora_unet_``, so it is read as ``lora_unet_``. kohya-style names are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from . import keys
from .state import LoraModule, LoraState, effective_alpha

LYCORIS_PREFIX = "lycoris_"
# Key suffix -> algorithm it belongs to ("" for suffixes shared by every algorithm).
_SUFFIX_ALGO = {
    "hada_w1_a": "loha",
    "hada_w1_b": "loha",
    "hada_w2_a": "loha",
    "hada_w2_b": "loha",
    "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr",
    "lokr_w1_a": "lokr",
    "lokr_w1_b": "lokr",
    "lokr_w2": "lokr",
    "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr",
    "lokr_t2": "lokr",
    "lora_down.weight": "lora",
    "lora_up.weight": "lora",
    "lora_mid.weight": "lora",
    "diff": "full",
    "diff_b": "full",
    "alpha": "",
    "dora_scale": "",
}
# The relative singular value below which a materialised delta's SVD is cut: float64 round-off of the product is
# ~1e-16 of the largest singular value, so 1e-12 drops only noise and keeps every true direction.
NUMERICAL_RANK_RTOL = 1e-12


@dataclass
class LycorisModule:
    """One module of a LyCORIS file: ``algorithm`` (``loha``, ``lokr``, ``lora``, ``full``), its tensors by key
    suffix, ``alpha`` (None when the file has none) and ``dora`` (the magnitude vector, or None)."""

    algorithm: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None
    dora: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        """Return the file's ``lora_dim`` for this module as the shapes tell it, or None (full LoKr, ``diff``)."""
        t = self.tensors
        if self.algorithm == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.algorithm == "lokr":
            for half in ("lokr_w2_b", "lokr_w1_b"):
                if half in t:
                    return int(t[half].shape[0])
            return None
        if self.algorithm == "lora":
            return int(t["lora_down.weight"].shape[0])
        return None

    @property
    def effective_alpha(self) -> float | None:
        """Return the alpha in force: ``alpha``, or the rank when absent; None for a module without a rank."""
        rank = self.rank
        return None if rank is None else effective_alpha(self.alpha, rank)

    @property
    def scale(self) -> float:
        """Return ``alpha / rank``; 1.0 when alpha is absent (alpha = rank) or the module has no rank."""
        rank = self.rank
        return 1.0 if rank is None else self.effective_alpha / rank

    @property
    def shape(self) -> tuple[int, ...]:
        """Return the delta's shape as the factors give it (conv kernels flattened where the file flattens them)."""
        t = self.tensors
        if self.algorithm == "loha":
            if "hada_t1" in t:
                return (int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1]), *t["hada_t1"].shape[2:])
            return (int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"].shape[1]))
        if self.algorithm == "lokr":
            (a, b), w2 = _lokr_half(t, "1", shape_only=True), _lokr_half(t, "2", shape_only=True)
            return (a * w2[0], b * w2[1], *w2[2:])
        if self.algorithm == "lora":
            down, up = t["lora_down.weight"], t["lora_up.weight"]
            kernel = tuple(t["lora_mid.weight"].shape[2:]) if "lora_mid.weight" in t else tuple(down.shape[2:])
            return (int(up.shape[0]), int(down.shape[1]), *kernel)
        return tuple(t["diff"].shape)

    def delta(self) -> torch.Tensor:
        """Return the module's exact weight change in float64, shaped as :attr:`shape`.

        Raises:
            ValueError: for a DoRA module (its change depends on the base weight; see the module docstring).
        """
        if self.dora is not None:
            raise ValueError("a DoRA module's change depends on the base weight it rescales")
        t = {k: v.double() for k, v in self.tensors.items()}
        if self.algorithm == "loha":
            return _loha_half(t, "1") * _loha_half(t, "2") * self.scale
        if self.algorithm == "lokr":
            w1, w2 = _lokr_half(t, "1"), _lokr_half(t, "2")
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
            return torch.kron(w1, w2) * self.scale
        if self.algorithm == "lora":
            m = LoraModule(t["lora_down.weight"], t["lora_up.weight"], self.alpha, t.get("lora_mid.weight"))
            return _lora_delta64(m)
        return t["diff"]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return exact float64 factors ``(up (out, R), down (R, in * kernel))`` of :meth:`delta`, scale included.

        Built from the factors, never from the materialised delta (an SVD of every full delta took 15 s for a
        113-module SD1-sized file on two cores): LoHa's Hadamard product of two rank-r halves is the row-wise
        Khatri-Rao product of their factors (rank r**2), LoKr's Kronecker product is ``kron(A1, A2) @ kron(B1, B2)``
        for halves ``w_i = A_i @ B_i`` (a full half is split by its own small SVD).

        Raises:
            ValueError: for a DoRA module, as :meth:`delta`.
        """
        if self.dora is not None:
            raise ValueError("a DoRA module's change depends on the base weight it rescales")
        t = {k: v.double() for k, v in self.tensors.items()}
        if self.algorithm == "loha":
            (a1, b1), (a2, b2) = _half_factors(t, "hada_w1", "hada_t1"), _half_factors(t, "hada_w2", "hada_t2")
            up = (a1[:, :, None] * a2[:, None, :]).flatten(1)
            down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)
        elif self.algorithm == "lokr":
            (a1, b1), (a2, b2) = _half_factors(t, "lokr_w1", "lokr_t1"), _half_factors(t, "lokr_w2", "lokr_t2")
            up, down = torch.kron(a1.contiguous(), a2.contiguous()), torch.kron(b1.contiguous(), b2.contiguous())
        elif self.algorithm == "lora":
            down = t["lora_down.weight"]
            if "lora_mid.weight" in t:
                down = torch.einsum("i j k l, j c -> i c k l", t["lora_mid.weight"], down.flatten(1))
            up, down = t["lora_up.weight"].flatten(1), down.flatten(1)
        else:
            up, down = _split_full(t["diff"].flatten(1))
        return up * self.scale, down


def _half_factors(t: dict[str, torch.Tensor], stem: str, core: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(A (out, r), B (r, in * kernel))`` with ``A @ B`` = one half of a LoHa/LoKr module, flattened."""
    if stem in t:
        return _split_full(t[stem].flatten(1))
    a, b = t[f"{stem}_a"], t[f"{stem}_b"]
    if core in t:
        # einsum("i j k l, j r, i p -> p r k l", t, b, a): A = a^T, B[i] = t[i] contracted with b.
        return a.T, torch.einsum("i j k l, j c -> i c k l", t[core], b).flatten(1)
    return a, b.flatten(1)


def _split_full(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(U * s, Vh)`` of a matrix's SVD, cut at its numerical rank (at least 1)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = _numerical_rank(s)
    return u[:, :k] * s[:k], vh[:k]


def _numerical_rank(s: torch.Tensor) -> int:
    if not s.numel() or s[0] <= 0:
        return 1
    return max(1, int((s > s[0] * NUMERICAL_RANK_RTOL).sum()))


def _loha_half(t: dict[str, torch.Tensor], i: str) -> torch.Tensor:
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    if f"hada_t{i}" in t:
        return torch.einsum("i j k l, j r, i p -> p r k l", t[f"hada_t{i}"], b, a)
    return a @ b


def _lokr_half(t: dict[str, torch.Tensor], i: str, *, shape_only: bool = False):
    """Return LoKr's half ``w{i}`` (or its shape): the full matrix, ``w_a @ w_b``, or the Tucker form."""
    if f"lokr_w{i}" in t:
        full = t[f"lokr_w{i}"]
        return tuple(full.shape) if shape_only else full
    a, b = t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]
    core = t.get(f"lokr_t{i}")
    if core is not None:
        if shape_only:
            return (int(a.shape[1]), int(b.shape[1]), *core.shape[2:])
        return torch.einsum("i j k l, j r, i p -> p r k l", core, b, a)
    return (int(a.shape[0]), int(b.shape[1])) if shape_only else a @ b


def _lora_delta64(m: LoraModule) -> torch.Tensor:
    up, down = m.up.flatten(1), m.down
    if m.mid is not None:
        out = torch.einsum("i j k l, j c, p i -> p c k l", m.mid, down.flatten(1), up)
    else:
        out = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return out * m.scale


def algorithm(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Return ``"loha"``, ``"lokr"`` or ``"dora"`` when a state dict needs this module, else None.

    DoRA wins when present (whatever it decomposes); a file mixing LoHa and LoKr modules is ``"loha"`` here and
    :func:`read_modules` tells each module's own algorithm.
    """
    if any(k.endswith(".dora_scale") or ".lora_magnitude_vector" in k for k in sd):
        return "dora"
    fmt = keys.detect_format(sd)
    return {
        keys.KeyFormat.DORA: "dora",
        keys.KeyFormat.LYCORIS_LOHA: "loha",
        keys.KeyFormat.LYCORIS_LOKR: "lokr",
    }.get(fmt)


def kohya_module_name(name: str) -> str:
    """Return the kohya name of a LyCORIS module name: ``lycoris_<path>`` -> ``lora_unet_<path>``, others kept."""
    return "lora_unet_" + name[len(LYCORIS_PREFIX) :] if name.startswith(LYCORIS_PREFIX) else name


def read_modules(sd: Mapping[str, torch.Tensor], *, source: str = "") -> dict[str, LycorisModule]:
    """Return the modules of a LyCORIS state dict by kohya module name (see :func:`kohya_module_name`).

    Raises:
        ValueError: for a key whose suffix is no LyCORIS tensor, or a module mixing two algorithms.
        keys.DamagedLoraError: for a module missing a factor (naming the file, the module and what it has).
    """
    where = f"'{source}'" if source else "the adapter"
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        name, _, suffix = key.partition(".")
        if suffix not in _SUFFIX_ALGO:
            raise ValueError(f"{where}: key '{key}' is no LyCORIS tensor (unknown suffix '{suffix}')")
        parts.setdefault(name, {})[suffix] = tensor
    modules = {}
    for name, group in sorted(parts.items()):
        algos = {_SUFFIX_ALGO[s] for s in group} - {""}
        if len(algos) != 1:
            raise keys.DamagedLoraError(
                f"{where}: module '{name}' has tensors of {sorted(algos) or 'no'} algorithm(s): {sorted(group)}"
            )
        algo = algos.pop()
        _check_complete(algo, name, group, where)
        alpha = group.pop("alpha", None)
        dora = group.pop("dora_scale", None)
        modules[kohya_module_name(name)] = LycorisModule(
            algo, group, None if alpha is None or alpha.device.type == "meta" else float(alpha), dora
        )
    return modules


_REQUIRED = {
    "loha": (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),),
    "lora": (("lora_down.weight", "lora_up.weight"),),
    "full": (("diff",),),
}


def _check_complete(algo: str, name: str, group: Mapping[str, torch.Tensor], where: str) -> None:
    if algo == "lokr":
        halves = [f"lokr_w{i}" in group or {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(group) for i in "12"]
        missing = [] if all(halves) else ["lokr_w1 or lokr_w1_a/_b" if not halves[0] else "lokr_w2 or lokr_w2_a/_b"]
    else:
        missing = [s for s in _REQUIRED[algo][0] if s not in group]
    if missing:
        raise keys.DamagedLoraError(
            f"{where}: {algo} module '{name}' is incomplete: has {sorted(group)}, misses {missing}"
        )


def describe(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, source: str = "") -> dict:
    """Return LoRA Info's summary of a LyCORIS file, from shapes and alphas only (a header read is enough).

    Returns:
        The keys :func:`metadata.describe` returns, with ``format`` ``lycoris`` and ``algorithm`` (e.g.
        ``"loha"``, ``"lokr"``, ``"loha+dora"``); ``ranks`` are the files' ``lora_dim`` values (modules without a
        rank, full LoKr or ``diff``, are left out) and ``alphas`` the alphas (absent: the rank).

    Raises:
        ValueError, keys.DamagedLoraError: as :func:`read_modules`.
    """
    from . import families, identity
    from . import metadata as md

    mods = read_modules(sd, source=source)
    algos = sorted({m.algorithm for m in mods.values()})
    if any(m.dora is not None for m in mods.values()):
        algos.append("dora")
    ranks = sorted({m.rank for m in mods.values() if m.rank is not None})
    alphas = sorted({m.effective_alpha for m in mods.values() if m.rank is not None})
    family = identity.family_from_shapes(_shape_stand_ins(mods)) or families.family_from_metadata(metadata)
    return {
        "format": "lycoris",
        "algorithm": "+".join(algos),
        "modules": len(mods),
        "unet_modules": sum(1 for n in mods if n.startswith("lora_unet_")),
        "te_modules": sum(1 for n in mods if n.startswith("lora_te")),
        "conv_modules": sum(1 for m in mods.values() if len(m.shape) == 4),
        "ranks": ranks,
        "alphas": alphas,
        "family": family,
        "trigger_words": md.trigger_words(metadata),
        "training_settings": md.training_settings(metadata),
        "extras": [],
        "title": metadata.get("modelspec.title") or metadata.get("ss_output_name") or "",
        "merge_recipe": None,
    }


def _shape_stand_ins(mods: Mapping[str, LycorisModule]) -> dict[str, LoraModule]:
    """Shape-only LoRA modules (``meta`` tensors) with each module's in and out widths, for family detection."""
    out = {}
    for name, m in mods.items():
        shape = m.shape
        out[name] = LoraModule(torch.empty(1, *shape[1:], device="meta"), torch.empty(shape[0], 1, device="meta"))
    return out


def exact_lora_module(
    up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> LoraModule:
    """Return LoRA factors (alpha = rank) whose product is exactly ``up @ down``.

    The factors are kept as given when their inner size R is at most ``min(out, in * kernel)`` (LoHa's r**2 and
    LoKr's rank(w1) * rank(w2) are the true ranks of random factors). A larger R (a small layer) is cut to the
    product's numerical rank by an SVD of the product, which is small then. No QR per module: on these CPUs
    ``torch.linalg.qr`` took 18 ms a call in ComfyUI's process, 16 s for two SD1-sized files.

    Args:
        up: ``(out, R)`` float64.
        down: ``(R, in * kernel)`` float64.
        shape: the delta's shape; 4-D gives conv factors ``up (out, k, 1, 1)``, ``down (k, in, kh, kw)``.
        dtype: the factors' dtype.
    """
    if up.shape[1] > min(up.shape[0], down.shape[1]):
        up, down = _split_full(up @ down)
    k = up.shape[1]
    if len(shape) == 4:
        up, down = up.reshape(*up.shape, 1, 1), down.reshape(k, *shape[1:])
    return LoraModule(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), alpha=None)


def state_from_any(
    sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, source: str = ""
) -> LoraState:
    """Return a :class:`LoraState` of any file :mod:`.keys` reads, and of LoHa/LoKr files as exact deltas.

    LoRA files go through :func:`keys.state_from_dict` unchanged. A LyCORIS file's modules become
    :func:`exact_lora_module` factors of their exact deltas (named canonically, metadata kept, with
    ``lora_workbench.lycoris_algorithm`` recording where they came from); to bring them to a chosen rank, merge
    the state with :func:`merge.merge` ``method="svd"``, which reports its error against these exact deltas.

    Raises:
        keys.UnsupportedLoraError: for DoRA files: the change depends on the base model's weights.
        keys.DamagedLoraError, keys.NotALoraError, ValueError: as :func:`read_modules` and
            :func:`keys.state_from_dict`.
    """
    from . import identity

    algo = algorithm(sd)
    if algo is None:
        return keys.state_from_dict(sd, metadata, source=source)
    where = f"'{source}'" if source else "the adapter"
    if algo == "dora":
        example = next(k for k in sd if k.endswith(".dora_scale") or ".lora_magnitude_vector" in k)
        raise keys.UnsupportedLoraError(
            f"{where} is a DoRA adapter (e.g. key '{example}'): its change rescales the base weight plus the low-rank "
            f"part by the column norms of that sum, so it depends on the model's weights and has no delta of its "
            f"own to merge or convert. ComfyUI applies it directly: use it in a LoRA stack."
        )
    mods = read_modules(sd, source=source)
    dtype = next((t.dtype for m in mods.values() for t in m.tensors.values() if t.is_floating_point()), torch.float32)
    dtype = torch.promote_types(dtype, torch.float32)
    modules = {name: exact_lora_module(*m.factors(), m.shape, dtype) for name, m in mods.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["lora_workbench.lycoris_algorithm"] = "+".join(sorted({m.algorithm for m in mods.values()}))
    return identity.canonicalize(LoraState(modules=modules, metadata=meta, source=source))
