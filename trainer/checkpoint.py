"""Resumable checkpoints: LoRA weights, optimizer and scheduler state, step and RNG, without pickle.

A checkpoint is ``step-<N>.safetensors`` (every tensor) plus ``checkpoint.json`` (everything else and the
name of the tensor file). Both are written to temp files and renamed, the JSON last, so the JSON always
names a complete tensor file; older tensor files are removed after.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..lora.safeio import atomic_write_bytes

INDEX = "checkpoint.json"


def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write a checkpoint for ``step``; return the path of its JSON index.

    Args:
        folder: the run's checkpoint folder (created).
        step: steps completed.
        tensors: LoRA weights and flattened optimizer state (names are free-form).
        state: JSON-able values (config, scheduler, RNG, losses).

    Returns:
        The path of ``checkpoint.json``.

    Raises:
        OSError: the folder cannot be written (the previous checkpoint stays intact).
        TypeError: ``state`` holds a value JSON cannot represent.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}.safetensors"
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"step": str(step)})
    atomic_write_bytes(folder / name, data)
    index = folder / INDEX
    atomic_write_bytes(index, json.dumps({"step": step, "tensors": name, **state}).encode())
    for old in folder.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return index


def read_index(folder: str | Path) -> dict:
    """Return the JSON index of the checkpoint in ``folder`` (step, tensor file name, state).

    Raises:
        ValueError: the index is missing, not valid JSON, or lacks ``step`` and ``tensors``.
    """
    index = Path(folder) / INDEX
    try:
        state = json.loads(index.read_text())
        Path(state["tensors"])
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {index} is not a valid checkpoint index: {e!r}") from None
    if not isinstance(state, dict) or "/" in state["tensors"] or "\\" in state["tensors"]:
        raise ValueError(f"checkpoint {index} is not a valid checkpoint index")
    return state


def load_checkpoint(folder: str | Path) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """Return ``(step, tensors, state)`` of the checkpoint in ``folder``, or None when there is none.

    Raises:
        ValueError: the index is not valid JSON with ``step`` and ``tensors``, or names a tensor file that is
            missing or unreadable.
    """
    index = Path(folder) / INDEX
    if not index.is_file():
        return None
    state = read_index(folder)
    tensor_file = Path(folder) / state["tensors"]
    try:
        tensors = load_file(str(tensor_file))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"checkpoint {index} names {tensor_file.name}, which cannot be read: {e}") from None
    return int(state["step"]), tensors, state


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Return an optimizer's state as ``(tensors, json_part)`` (no pickle needed to store it).

    Tensor entries of each parameter's state (AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``) become
    ``optim.<param id>.<key>`` tensors; everything else (param groups, scalar entries) goes to the JSON part.
    """
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in sd["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], json_part: dict) -> None:
    """Load what ``flatten_optimizer`` stored back into ``optimizer``.

    Raises:
        ValueError: the stored state does not fit the optimizer (other parameter groups or sizes).
    """
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in json_part["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": json_part["param_groups"]})
