"""The in-graph adapter: ComfyUI's ``LORA_MODEL`` value with our metadata riding along."""

from __future__ import annotations


class LoraTensors(dict):
    """A ``dict[str, Tensor]`` (what core nodes expect of ``LORA_MODEL``) with a ``metadata`` dict.

    Core ``SaveLoRA`` and ``LoraModelLoader`` see a plain dict of tensors; our nodes also read
    ``metadata`` (trigger words, rank, alpha, training settings). Copies made by other code
    may drop the attribute, so readers use ``metadata_of``.
    """

    def __init__(self, tensors=(), metadata: dict[str, str] | None = None, source: str = ""):
        super().__init__(tensors)
        self.metadata: dict[str, str] = dict(metadata or {})
        # The file (or merge) it came from, so errors downstream can name it.
        self.source = source


def metadata_of(adapter) -> dict[str, str]:
    """Return the metadata of an in-graph adapter, or an empty dict for a plain tensor dict."""
    return dict(getattr(adapter, "metadata", {}) or {})


def source_of(adapter, default: str = "in-graph adapter") -> str:
    """Return the name of the file (or merge) an in-graph adapter came from, or ``default`` when unknown."""
    return str(getattr(adapter, "source", "") or default)
