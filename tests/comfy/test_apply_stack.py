"""Apply LoRA Stack against chains of core LoraLoader nodes, through ComfyUI's executor."""

from __future__ import annotations

import pytest
import torch
from graphs import core_chain, our_stack, txt2img

from lora_workbench.headless.example_loras import write_example_lora

pytestmark = pytest.mark.slow

STRENGTHS = [(0.8, 0.6), (-0.5, 1.0), (0.0, 0.0), (1.2, 0.0), (0.3, -0.7), (0.0, 0.5), (0.6, 0.6), (-0.2, 0.1)]


@pytest.fixture(scope="module")
def lora_names(loras_dir):
    names = []
    for i in range(8):
        rank = 8 if i % 2 == 0 else 32
        path = write_example_lora(loras_dir / f"exact_{i}_r{rank}.safetensors", seed=i, rank=rank, trigger=f"tok{i}")
        names.append(path.name)
    return names


def _latent(run, prompt, node):
    return run(prompt).output(node)["samples"]


@pytest.mark.parametrize("count", [1, 3, 8])
def test_stack_equals_chain_of_core_lora_loaders(run, ckpt_name, lora_names, count):
    entries = [(lora_names[i], *STRENGTHS[i]) for i in range(count)]
    ours = _latent(run, *txt2img(ckpt_name, our_stack(entries)))
    core = _latent(run, *txt2img(ckpt_name, core_chain(entries)))
    base = _latent(run, *txt2img(ckpt_name))
    # Same patches, same order, same ComfyUI weight calculation: bit-for-bit equal.
    assert torch.equal(ours, core), f"max diff {(ours - core).abs().max()}"
    assert not torch.equal(ours, base), "the LoRAs changed nothing: the comparison would prove nothing"


def test_strength_zero_equals_no_lora(run, ckpt_name, lora_names):
    entries = [(name, 0.0, 0.0) for name in lora_names[:3]]
    assert torch.equal(_latent(run, *txt2img(ckpt_name, our_stack(entries))), _latent(run, *txt2img(ckpt_name)))


def test_disabled_rows_are_skipped(run, ckpt_name, lora_names):
    with_off = [(lora_names[0], 1.0, 1.0), (lora_names[1], 1.0, 1.0, False)]
    only_first = [(lora_names[0], 1.0, 1.0)]
    assert torch.equal(
        _latent(run, *txt2img(ckpt_name, our_stack(with_off))),
        _latent(run, *txt2img(ckpt_name, our_stack(only_first))),
    )


def test_global_scale_multiplies_strengths(run, ckpt_name, lora_names):
    scaled = our_stack([(lora_names[0], 1.0, 0.5)], scale=0.5)
    halved = our_stack([(lora_names[0], 0.5, 0.25)])
    assert torch.equal(_latent(run, *txt2img(ckpt_name, scaled)), _latent(run, *txt2img(ckpt_name, halved)))
