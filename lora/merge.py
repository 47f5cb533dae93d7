"""Merging several LoRAs into one: ``concat`` (exact), ``svd`` (re-factored, error reported), ``linear`` (naive).

Strength semantics, stated once: merging with weights ``w_i`` targets exactly what stacking the LoRAs at
strengths ``w_i`` applies, the per-module delta ``T = sum_i w_i * (alpha_i / r_i) * up_i @ down_i``. (kohya's
``merge_lora.py`` multiplies both factors by the ratio, so a weight w acts as w squared; that does not happen
here.) Every method reports how far its result is from ``T``: per module ``||T - M||_F / ||T||_F`` and overall
``sqrt(sum ||T - M||^2) / sqrt(sum ||T||^2)``.

Everything is computed from the factors. With ``U = [w_i s_i up_i]`` (out x R) and ``D = [down_i]`` (R x in),
``T = U @ D``; QR of ``U`` and ``D^T`` reduces any question about ``T`` (its norm, its SVD) to the small R x R
core ``R_u @ R_d^T``. The full out x in matrix is never formed, which is what makes the SVD merge fast (the
approach follows the low-rank SVD of a product; kohya's ``svd_merge_lora.py`` instead forms the full matrix and
runs ``torch.linalg.svd`` on it: https://github.com/kohya-ss/sd-scripts/blob/main/networks/svd_merge_lora.py).
Conv modules are flattened to ``(out, r)`` and ``(r, in*kh*kw)``. Computation is float32; outputs take the
inputs' promoted floating dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import families, identity, keys, lycoris
from . import metadata as md
from .state import LoraModule, LoraState

METHODS = ("concat", "svd", "linear")


@dataclass
class MergeReport:
    """What a merge did and how exact it was.

    Attributes:
        method: ``"concat"``, ``"svd"`` or ``"linear"``.
        weights: the weight of each input.
        sources: each input's ``source`` (file name) or ``"#i"``.
        ranks: output rank per module.
        module_errors: per module ``||T - M||_F / ||T||_F`` (0 when ``T`` is 0).
        overall_error: ``sqrt(sum_m ||T_m - M_m||^2) / sqrt(sum_m ||T_m||^2)``.
        energy_kept: per module, for ``svd``: the kept fraction of ``||T||_F^2``.
    """

    method: str
    weights: list[float]
    sources: list[str]
    ranks: dict[str, int] = field(default_factory=dict)
    module_errors: dict[str, float] = field(default_factory=dict)
    overall_error: float = 0.0
    energy_kept: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return the report as JSON-able values."""
        return {
            "method": self.method,
            "weights": self.weights,
            "sources": self.sources,
            "ranks": self.ranks,
            "module_errors": self.module_errors,
            "overall_error": self.overall_error,
            "energy_kept": self.energy_kept,
        }


@dataclass
class MergeResult:
    """The merged ``state`` and its ``report``."""

    state: LoraState
    report: MergeReport


def _flat(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(up (out, r), down (r, in*kh*kw))`` in float32, folding a Tucker core into down."""
    up = m.up.float().flatten(1)
    down = m.down.float()
    if m.mid is not None:
        # delta[p, c, k, l] = sum_ij mid[i, j, k, l] down[j, c] up[p, i]  ->  down_eff[i, c, k, l]
        down = torch.einsum("i j k l, j c -> i c k l", m.mid.float(), down.flatten(1))
    return up, down.flatten(1)


def _out_shapes(m: LoraModule) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return the (up, down) shapes without the rank: up ``(out, [1, 1])``, down ``(in, [kh, kw])``."""
    up_tail = (int(m.up.shape[0]),) + ((1, 1) if m.up.dim() == 4 else ())
    if m.mid is not None:
        down_tail = (int(m.down.shape[1]),) + tuple(int(s) for s in m.mid.shape[2:])
    else:
        down_tail = tuple(int(s) for s in m.down.shape[1:])
    return up_tail, down_tail


def _shape_like(up: torch.Tensor, down: torch.Tensor, up_tail, down_tail, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    r = up.shape[1]
    up_s = up.reshape(up_tail[0], r, *up_tail[1:]) if len(up_tail) > 1 else up
    down_s = down.reshape(r, *down_tail)
    return up_s.to(dtype).contiguous(), down_s.to(dtype).contiguous()


def lowrank_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """Return ``||up @ down||_F`` from the factors (QR of both), without forming the product.

    Args:
        up: ``(out, R)``.
        down: ``(R, in)``.

    Returns:
        The Frobenius norm as a float.
    """
    if up.shape[1] == 0:
        return 0.0
    ru = _qr(up.double(), want_q=False)[1]
    rd = _qr(down.double().T, want_q=False)[1]
    return float(torch.linalg.matrix_norm(ru @ rd.T))


def _qr(a: torch.Tensor, *, want_q: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Return the reduced QR of ``a`` (m, n): ``q`` (m, k) or None, ``r`` (k, n), k = min(m, n).

    Built from ``geqrf`` + ``householder_product`` rather than ``torch.linalg.qr``: on CPU builds with MKL, the
    latter took 8 ms instead of 0.03 ms for a 768 x 12 matrix with 2 threads on a loaded machine (measured here,
    torch 2.14), while these two primitives stayed fast.
    """
    k = min(a.shape)
    packed, tau = torch.geqrf(a)
    r = packed[:k].triu()
    if not want_q:
        return None, r
    return torch.linalg.householder_product(packed[:, :k], tau[:k]), r


def _core_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Return ``(s, factors)``: the singular values of ``up @ down`` and a callable giving its top-k factors.

    ``up`` (out, R), ``down`` (R, in). QR of ``up`` and ``down^T`` reduces the problem to the SVD of the
    small core ``R_u @ R_d^T``; ``factors(k)`` returns ``left (out, k)`` and ``right (k, in)`` with
    ``up @ down ~= left @ diag(s[:k]) @ right``. Q is never formed: ``ormqr`` applies it to the k kept columns
    only, which is what keeps the cost at a few small QRs per module.
    """
    pu, tu = torch.geqrf(up)
    pd, td = torch.geqrf(down.T.contiguous())
    ku, kd = min(up.shape), min(down.shape)
    p, s, vh = torch.linalg.svd(pu[:ku].triu() @ pd[:kd].triu().T, full_matrices=False)

    def factors(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        left = up.new_zeros(up.shape[0], k)
        left[:ku] = p[:, :k]
        right_t = down.new_zeros(down.shape[1], k)
        right_t[:kd] = vh[:k].T
        return torch.ormqr(pu, tu, left), torch.ormqr(pd, td, right_t).T

    return s, factors


def _check_family(states: Sequence[LoraState], sources: Sequence[str]) -> str | None:
    seen: dict[str, str] = {}
    for st, src in zip(states, sources):
        fam = families.base_family(st, st.metadata)
        if fam is None:
            continue
        for other, other_src in seen.items():
            if other != fam:
                raise ValueError(
                    f"cannot merge LoRAs of different base model families: {other_src} is {other}, {src} is {fam}"
                )
        seen.setdefault(fam, src)
    return next(iter(seen), None)


def _as_state(item: LoraState | Mapping[str, torch.Tensor], i: int) -> LoraState:
    if isinstance(item, LoraState):
        return item
    try:
        return lycoris.state_from_any(item, source=f"input #{i}")
    except keys.UnsupportedLoraError as exc:
        raise keys.UnsupportedLoraError(
            f"merge input #{i}: {exc} To combine it with other LoRAs, apply them together in a LoRA stack instead "
            f"of merging."
        ) from exc


def _check_arguments(n_states: int, n_weights: int, method: str, rank: int | None, energy: float | None) -> None:
    """Refuse an unknown method, no inputs, a weight count that differs from the input count, rank or energy."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method '{method}'; expected one of {METHODS}")
    if not n_states:
        raise ValueError("merge needs at least one LoRA")
    if n_weights != n_states:
        raise ValueError(f"got {n_weights} weights for {n_states} LoRAs; give one weight per LoRA")
    if rank is not None and rank < 1:
        raise ValueError(f"target rank must be >= 1, got {rank}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1], got {energy}")


def _prepare_inputs(
    states: Sequence[LoraState | Mapping[str, torch.Tensor]],
) -> tuple[list[LoraState], list[str], str | None]:
    """Return the inputs as states with one name per layer, their sources (or ``"#i"``) and their common family.

    Raises:
        ValueError: for inputs of different base families.
        keys.UnsupportedLoraError: for a raw dict that cannot merge (DoRA).
    """
    sts = [_as_state(s, i) for i, s in enumerate(states)]
    sources = [s.source or f"#{i}" for i, s in enumerate(sts)]
    family = _check_family(sts, sources)
    # One name per layer across inputs: an input that cannot tell its family alone (a text-encoder-only file
    # with lora_te1_ names) takes the others'. ComfyUI would load only one of two names for a layer.
    return [identity.canonicalize(s, family) for s in sts], sources, family


def _contributions(states: Sequence[LoraState]) -> dict[str, list[tuple[int, LoraModule]]]:
    """Return, per module name (sorted), the ``(input index, module)`` of each input that has it, in input order."""
    names = sorted({n for s in states for n in s.modules})
    per_module: dict[str, list[tuple[int, LoraModule]]] = {n: [] for n in names}
    for i, s in enumerate(states):
        for n, m in s.modules.items():
            per_module[n].append((i, m))
    return per_module


def _svd_rank(
    per_module: Mapping[str, Sequence[tuple[int, LoraModule]]],
    states: Sequence[LoraState],
    rank: int | None,
    energy: float | None,
) -> int | None:
    """Return the svd target rank: ``rank`` checked against the ranks available, or the largest input rank when
    neither rank nor energy is given (None: energy alone decides).

    Raises:
        ValueError: for a rank above the sum of the input ranks of every module.
    """
    if rank is not None:
        avail = {n: sum(m.rank for _, m in ms) for n, ms in per_module.items()}
        top = max(avail, key=lambda n: avail[n]) if avail else None
        if top is not None and rank > avail[top]:
            raise ValueError(
                f"target rank {rank} is above the sum of the input ranks of every module (largest: {avail[top]} "
                f"for module '{top}'); the exact merge is already rank {avail[top]}: use concat or a rank <= "
                f"{avail[top]}"
            )
        return rank
    if energy is None:
        return max(max(s.ranks) for s in states if s.modules)
    return None


def _common_shape(
    name: str, contributions: Sequence[tuple[int, LoraModule]], sources: Sequence[str]
) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
    """Return the module's (up, down) shapes without the rank and the inputs' promoted dtype.

    Raises:
        ValueError: when two inputs give the module different shapes.
    """
    first_i, ref = contributions[0]
    up_tail, down_tail = _out_shapes(ref)
    dtype = ref.up.dtype
    for i, m in contributions[1:]:
        if _out_shapes(m) != (up_tail, down_tail):
            raise ValueError(
                f"module '{name}' has different shapes in {sources[first_i]} (up {tuple(ref.up.shape)}, down "
                f"{tuple(ref.down.shape)}) and {sources[i]} (up {tuple(m.up.shape)}, down {tuple(m.down.shape)})"
            )
        dtype = torch.promote_types(dtype, m.up.dtype)
    return up_tail, down_tail, dtype


@dataclass
class _Stacked:
    """One module's weighted inputs side by side: the exact target is ``T = up @ down``.

    Attributes:
        up: ``(out, R)``, each input's flat up times its ``c_i = w_i * alpha_i / r_i``, concatenated.
        down: ``(R, in*k)``, the flat downs stacked.
        coeffs: ``c_i`` per contributing input.
        raw_ups: the unscaled flat ups.
        downs: the flat downs.
    """

    up: torch.Tensor
    down: torch.Tensor
    coeffs: list[float]
    raw_ups: list[torch.Tensor]
    downs: list[torch.Tensor]


def _stack(contributions: Sequence[tuple[int, LoraModule]], weights: Sequence[float]) -> _Stacked:
    """Return the contributions' flat float32 factors, scaled by weight and alpha / rank, side by side."""
    ups, downs, coeffs, raw_ups = [], [], [], []
    for i, m in contributions:
        up, down = _flat(m)
        c = weights[i] * m.scale
        ups.append(up * c)
        downs.append(down)
        coeffs.append(c)
        raw_ups.append(up)
    return _Stacked(torch.cat(ups, dim=1), torch.cat(downs, dim=0), coeffs, raw_ups, downs)


@dataclass
class _Merged:
    """One module merged: flat ``up`` (out, k) and ``down`` (k, in*k), ``error = ||T - up @ down||_F``,
    ``target_norm = ||T||_F`` and, for svd, the kept fraction of ``||T||_F^2``."""

    up: torch.Tensor
    down: torch.Tensor
    error: float
    target_norm: float
    energy_kept: float | None = None


def _merge_concat(st: _Stacked) -> _Merged:
    """The exact merge: the stacked factors themselves (rank = sum of the input ranks)."""
    # Exact by construction; the norm of T is only needed for relative errors, which are all 0 here.
    return _Merged(st.up, st.down, 0.0, 0.0)


def _merge_svd(st: _Stacked, rank: int | None, energy: float | None) -> _Merged:
    """The exact sum re-factored to ``rank`` and/or the smallest rank keeping ``energy``, capped at its exact rank."""
    s, factors = _core_svd(st.up, st.down)
    s2 = s.double() ** 2
    t_norm = float(s2.sum().sqrt())
    cap = min(st.up.shape[1], st.up.shape[0], st.down.shape[1])
    k = cap if rank is None else min(rank, cap)
    if energy is not None and float(s2.sum()) > 0:
        frac = torch.cumsum(s2, 0) / s2.sum()
        # Smallest k whose kept energy reaches the threshold; the 1e-12 absorbs float rounding at 1.0.
        k_e = int(torch.searchsorted(frac, torch.tensor(energy - 1e-12, dtype=frac.dtype))) + 1
        k = min(k, k_e)
    k = max(k, 1)
    root = s[:k].sqrt()
    left, right = factors(k)
    # Split the singular values evenly between the factors so neither grows large (kinder to fp16 files).
    up = left * root
    down = root[:, None] * right
    err = float(s2[k:].sum().sqrt())
    kept = float(s2[:k].sum() / s2.sum()) if float(s2.sum()) > 0 else 1.0
    return _Merged(up, down, err, t_norm, kept)


def _merge_linear(
    name: str, contributions: Sequence[tuple[int, LoraModule]], st: _Stacked, sources: Sequence[str]
) -> _Merged:
    """The naive same-rank factor average, with its true error against the exact sum.

    Raises:
        ValueError: when the contributing inputs have different ranks.
    """
    r_set = {m.rank for _, m in contributions}
    if len(r_set) > 1:
        detail = ", ".join(f"{m.rank} ({sources[i]})" for i, m in contributions)
        raise ValueError(
            f"linear merge needs equal ranks, but module '{name}' has ranks {detail}; use concat (exact) or "
            f"svd (re-factor to a chosen rank) instead"
        )
    t_norm = lowrank_norm(st.up, st.down)
    up = sum(math.sqrt(abs(c)) * u for c, u in zip(st.coeffs, st.raw_ups))
    down = sum(math.copysign(math.sqrt(abs(c)), c) * d for c, d in zip(st.coeffs, st.downs))
    # True error of the naive product against the exact sum, from factors: T - M = [U, -up] @ [D; down].
    err = lowrank_norm(torch.cat([st.up, -up], dim=1), torch.cat([st.down, down], dim=0))
    return _Merged(up, down, err, t_norm)


def _merge_module(
    name: str,
    contributions: Sequence[tuple[int, LoraModule]],
    weights: Sequence[float],
    sources: Sequence[str],
    method: str,
    rank: int | None,
    energy: float | None,
) -> tuple[LoraModule, _Merged]:
    """Return one module merged by ``method``, shaped and typed like its inputs, and the merge's measurements."""
    up_tail, down_tail, dtype = _common_shape(name, contributions, sources)
    st = _stack(contributions, weights)
    if method == "concat":
        merged = _merge_concat(st)
    elif method == "svd":
        merged = _merge_svd(st, rank, energy)
    else:
        merged = _merge_linear(name, contributions, st, sources)
    up_s, down_s = _shape_like(merged.up, merged.down, up_tail, down_tail, dtype)
    return LoraModule(down=down_s, up=up_s, alpha=float(up_s.shape[1])), merged


def _merge_extras(states: Sequence[LoraState], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Return the weighted sum of the inputs' extras (full 1-D deltas, linear in strength, so this is exact)."""
    extras: dict[str, torch.Tensor] = {}
    for i, s in enumerate(states):
        for k, t in s.extras.items():
            extras[k] = extras[k] + weights[i] * t.float() if k in extras else weights[i] * t.float()
    return extras


def _merged_metadata(
    report: MergeReport, states: Sequence[LoraState], family: str | None, rank: int | None, energy: float | None
) -> dict[str, str]:
    """Return the merged file's metadata: its rank and alpha, family, the recipe and the inputs' trigger words."""
    ranks_out = set(report.ranks.values())
    recipe = {
        "method": report.method,
        "weights": report.weights,
        "sources": report.sources,
        "rank": rank,
        "energy": energy,
        "overall_error": report.overall_error,
    }
    return md.build_metadata(
        rank=next(iter(ranks_out)) if len(ranks_out) == 1 else None,
        alpha=None if len(ranks_out) != 1 else float(next(iter(ranks_out))),
        base_family=family,
        merge_recipe=recipe,
        training_comment=f"merged ({report.method}) from {len(states)} LoRAs",
        trigger_words=[w for s in states for w in md.trigger_words(s.metadata)],
    )


def merge(
    states: Sequence[LoraState | Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    method: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
) -> MergeResult:
    """Merge LoRAs so the result applies ``sum_i weights[i] * delta_i`` (exactly, or as near as the method can).

    Args:
        states: the inputs (states, or raw state dicts which are converted first). Modules present in only some
            inputs are merged from those (the others contribute zero).
        weights: one weight per input; weight w reproduces stacking that LoRA at strength w.
        method: ``"concat"``: exact, ranks add, alpha = new rank. ``"svd"``: the exact sum re-factored to
            ``rank`` and/or the smallest rank keeping ``energy`` of its squared Frobenius norm; a module keeps at
            most its exact rank (sum of its input ranks, and min(out, in)); without rank or energy, rank = the
            largest input rank. ``"linear"``: same-rank factor average, the naive method: with
            ``c_i = w_i * alpha_i / r_i``, ``up = sum_i sqrt(|c_i|) up_i`` and ``down = sum_i sign(c_i) sqrt(|c_i|)
            down_i`` (kohya's merge_lora.py variant without its ratio-squared effect); exact for one input, and
            cross terms make it inexact for several, which the report states truthfully.
        rank: svd target rank.
        energy: svd energy threshold in (0, 1].

    Returns:
        A :class:`MergeResult`; its state's metadata records the recipe (``lora_workbench.merge_recipe``).

    Raises:
        ValueError: for an unknown method, weights/states length mismatch, no inputs, rank < 1, a rank above
            the largest sum of input ranks of any module, energy outside (0, 1], inputs of different base
            families, modules whose shapes disagree between inputs, and linear merge of differing ranks.
        keys.UnsupportedLoraError: for DoRA inputs given as raw dicts (LoHa/LoKr ones merge as exact deltas).
    """
    _check_arguments(len(states), len(weights), method, rank, energy)
    sts, sources, family = _prepare_inputs(states)
    weights = [float(w) for w in weights]
    per_module = _contributions(sts)
    if method == "svd":
        rank = _svd_rank(per_module, sts, rank, energy)

    report = MergeReport(method=method, weights=weights, sources=sources)
    out_modules: dict[str, LoraModule] = {}
    err_sq = 0.0
    total_sq = 0.0
    for n, contributions in per_module.items():
        out_modules[n], merged = _merge_module(n, contributions, weights, sources, method, rank, energy)
        if merged.energy_kept is not None:
            report.energy_kept[n] = merged.energy_kept
        err_sq += merged.error**2
        total_sq += merged.target_norm**2
        report.module_errors[n] = merged.error / merged.target_norm if merged.target_norm > 0 else 0.0
        report.ranks[n] = out_modules[n].rank
    report.overall_error = math.sqrt(err_sq) / math.sqrt(total_sq) if total_sq > 0 else 0.0

    extras = _merge_extras(sts, weights)
    meta = _merged_metadata(report, sts, family, rank, energy)
    return MergeResult(state=LoraState(modules=out_modules, metadata=meta, extras=extras), report=report)
