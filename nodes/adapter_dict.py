"""The in-graph adapter: ComfyUI's ``LORA_MODEL`` value with our metadata riding along."""

from __future__ import annotations


class LoraTensors(dict):
    """A ``dict[str, Tensor]`` (what core nodes expect of ``LORA_MODEL``) with a ``metadata`` dict.

    Core ``SaveLoRA`` and ``LoraModelLoader`` see a plain dict of tensors; our nodes also read
    ``metadata`` (trigger words, rank, alpha, training settings). Copies made by other code
    may drop the attribute, so readers use ``metadata_of``.
    """

    def __init__(self, tensors=(), metadata: dict[str, str] | None = None):
        super().__init__(tensors)
        self.metadata: dict[str, str] = dict(metadata or {})


def metadata_of(adapter) -> dict[str, str]:
    """Return the metadata of an in-graph adapter, or an empty dict for a plain tensor dict."""
    return dict(getattr(adapter, "metadata", {}) or {})
