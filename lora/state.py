"""The one in-memory form of a LoRA adapter.

A ``LoraState`` maps module names in kohya form (``lora_unet_down_blocks_0_attentions_0_
transformer_blocks_0_attn1_to_q``, ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``)
to ``LoraModule`` factors, plus string metadata. Kohya names are what ComfyUI, A1111 and
diffusers all read, so every reader converts into them and every writer starts from them.

Alpha semantics, stated once for the whole package: the delta a module adds to its base
weight is ``(alpha / rank) * up @ down``; an absent alpha means ``alpha = rank`` (scale 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def effective_alpha(alpha: float | None, rank: int) -> float:
    """Return the alpha in force for a module of ``rank``: ``alpha``, or ``rank`` when absent (scale 1).

    The one place the package applies that rule; every reader, writer and summary calls it.
    """
    return float(rank) if alpha is None else float(alpha)


@dataclass
class LoraModule:
    """Low-rank factors of one target module.

    Attributes:
        down: ``(r, in)`` for a linear layer, ``(r, in, kh, kw)`` for a conv layer.
        up: ``(out, r)`` for a linear layer, ``(out, r, 1, 1)`` for a conv layer.
        alpha: the scale numerator; ``None`` means ``alpha = rank``.
        mid: optional LoCon/Tucker core ``(r, r, kh, kw)``; then ``down`` is ``(r, in, 1, 1)``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """Return the rank r (rows of ``down``)."""
        return int(self.down.shape[0])

    @property
    def effective_alpha(self) -> float:
        """Return the alpha in force: ``alpha``, or the rank when absent (see :func:`effective_alpha`)."""
        return effective_alpha(self.alpha, self.rank)

    @property
    def scale(self) -> float:
        """Return ``alpha / rank`` (1.0 when alpha is absent)."""
        return self.effective_alpha / self.rank

    @property
    def is_conv(self) -> bool:
        """Return True when the factors belong to a conv layer (4-D tensors)."""
        return self.down.dim() == 4

    def delta(self) -> torch.Tensor:
        """Return the weight delta ``scale * up @ down`` in float32, shaped like the base weight.

        Raises:
            ValueError: if the factor shapes do not chain (``up`` columns != ``down`` rows).
        """
        down = self.down.float()
        up = self.up.float()
        if up.shape[1] != down.shape[0]:
            raise ValueError(
                f"up {tuple(up.shape)} and down {tuple(down.shape)} do not chain: "
                f"up has {up.shape[1]} columns, down has {down.shape[0]} rows"
            )
        if self.mid is not None:
            # Tucker: contract the core with the 1x1 down and up projections.
            out = torch.einsum("i j k l, j c, p i -> p c k l", self.mid.float(), down.flatten(1), up.flatten(1))
            return out * self.scale
        if not self.is_conv:
            return (up.flatten(1) @ down) * self.scale
        kernel = down.shape[2:]
        flat = up.flatten(1) @ down.flatten(1)
        return flat.reshape(up.shape[0], down.shape[1], *kernel) * self.scale


@dataclass
class LoraState:
    """A whole adapter: ``modules`` keyed by kohya module name, and string ``metadata``.

    ``extras`` holds raw tensors that are not low-rank factors but belong to the adapter, keyed
    ``<kohya module name>.<suffix>`` (ComfyUI's ``.diff``/``.diff_b`` full deltas for 1-D parameters such as
    norms and biases), so they are kept and reported rather than silently dropped. ``source`` names where the
    state came from (a file path) for error messages; it is not written to files.
    """

    modules: dict[str, LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def ranks(self) -> set[int]:
        """Return the set of ranks used by the modules."""
        return {m.rank for m in self.modules.values()}

    def scaled(self, unet: float, text_encoder: float) -> LoraState:
        """Return a copy whose deltas are multiplied by ``unet`` (``lora_unet_*``) or ``text_encoder`` (others).

        Only ``up`` is scaled, so ranks and alphas stay as they are; the delta is linear in ``up``.
        ``extras`` (full deltas) are scaled by the same rule.
        """

        def factor(name: str) -> float:
            return unet if name.startswith("lora_unet_") else text_encoder

        modules = {n: LoraModule(m.down, m.up * factor(n), m.alpha, m.mid) for n, m in self.modules.items()}
        extras = {n: t * factor(n) for n, t in self.extras.items()}
        return LoraState(modules, dict(self.metadata), extras, self.source)
