"""What differs between the ComfyUI versions the pack runs on, in one place.

Tested: 0.3.75 (the pinned one) and 0.33.0 (the tree of 2026-08-22). Each difference is met by a
feature check on the imported ComfyUI or by giving every version what the newest one reads, never by
comparing version numbers:

- ``PromptExecutor(cache_args=...)``: 0.33 reads ``"ram_inactive"`` (KeyError without it); 0.3.75
  reads only ``"ram"``. Both get all keys (``EXECUTOR_CACHE_ARGS``).
- Cached node outputs: 0.33's ``caches.outputs.get`` is a coroutine and ``get_local`` the synchronous
  read; 0.3.75 has only the synchronous ``get`` (``cached_output``).
- The server object the executor drives: 0.33 also reads ``sockets_metadata`` (which clients take
  preview metadata) and calls ``queue_updated()``; ``runner.HeadlessServer`` has both.
- Core nodes gained required inputs in 0.33: ``LoraModelLoader`` has ``bypass``; ``TrainLoraNode`` has
  ``quantized_backward``, ``checkpoint_depth``, ``offloading``, ``bucket_mode`` and ``bypass_mode``. Code
  that builds their inputs for both versions passes them where the node declares them (``input_names``,
  ``input_defaults``). ``TrainLoraNode`` also no longer returns a MODEL first: its ``LORA_MODEL`` output is
  found by type (``RETURN_TYPES``).
- 0.33 registers its node replacements (old node ids -> new ones, applied by the web server to the
  prompts it receives) on the server object, so a headless import logs "IMPORT FAILED:
  nodes_replacements.py" with a hint to reinstall requirements. Nothing is missing: that file defines no
  nodes, and headless runs receive no prompts through the server. Left as ComfyUI logs it.
- Flux: 0.33's ``FluxParams`` has a required field ``txt_ids_dims`` (its detection gives Flux.1 ``[]``);
  0.3.75's rejects it. A Flux config built in code gets it where the class declares it
  (``flux_unet_config``).
- The loader's model patcher: 0.33 wraps checkpoints in ``CoreModelPatcher`` (today an alias of
  ``ModelPatcher``); 0.3.75 has only ``ModelPatcher`` (``checkpoint_model_patcher_class``).
- Advanced inputs: 0.33's V3 inputs take ``advanced=True`` (its frontend 1.49 hides them behind "Show
  advanced" in both renderings); 0.3.75's take no such argument. ``mark_advanced`` sets the field where the
  input has it, and otherwise puts the same key into the input's ``extra_dict``, so ``object_info`` carries
  ``"advanced": true`` on both; frontend 1.32 has the litegraph half of the feature (``widget.advanced``,
  the node menu's "Show Advanced") but does not copy the flag onto widgets, which ``js/labels.js`` does.
- 0.33 imports torchaudio at start-up (``scripts/setup.sh`` installs it), and its requirements pin
  a newer web frontend (``comfyui-frontend-package`` 1.49.6 instead of 1.32.9), hence one venv per
  version (``scripts/comfyui_env.sh``).
"""

from __future__ import annotations

from typing import Any

# "ram": the headroom of the RAM-pressure cache, which the classic cache (the executor's default, used
# here) ignores on both versions; "ram_inactive": the same for inactive entries (0.33). 0 as in
# ComfyUI's own main.py when that cache is off.
EXECUTOR_CACHE_ARGS = {"ram": 4.0, "ram_inactive": 0.0, "lru": 0}


def cached_output(caches: Any, node_id: str):
    """Return the executor's cached entry for ``node_id`` (or None), read synchronously on every version."""
    outputs = caches.outputs
    read = getattr(outputs, "get_local", None) or outputs.get
    return read(node_id)


def mark_advanced(node_input: Any) -> Any:
    """Return a V3 input marked as advanced (shown behind the node's "Show advanced"), on every version.

    Sets ``advanced`` where this ComfyUI's inputs declare it (0.33); older ones (0.3.75) have no such
    argument, so the key goes into the input's ``extra_dict``, which reaches ``object_info`` the same way.
    """
    if hasattr(node_input, "advanced"):
        node_input.advanced = True
    else:
        node_input.extra_dict["advanced"] = True
    return node_input


def input_names(node_class: Any) -> set[str]:
    """Return the names of a node class's inputs (required, optional and hidden), V1 or V3 alike."""
    declared = node_class.INPUT_TYPES()
    return {name for section in declared.values() if isinstance(section, dict) for name in section}


def input_defaults(node_class: Any) -> dict[str, Any]:
    """Return the declared default of each required or optional input that has one, V1 or V3 alike."""
    declared = node_class.INPUT_TYPES()
    defaults = {}
    for section in ("required", "optional"):
        for name, spec in (declared.get(section) or {}).items():
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                defaults[name] = spec[1]["default"]
    return defaults


# Keys of Flux.1's transformer config that newer ComfyUI versions require, with the values their detection
# gives a Flux.1 checkpoint.
_FLUX1_NEWER_KEYS = {"txt_ids_dims": []}


def flux_unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return a Flux.1 transformer config plus the keys this ComfyUI's ``FluxParams`` declares beyond it."""
    import dataclasses

    import comfy.ldm.flux.model

    declared = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {**config, **{k: v for k, v in _FLUX1_NEWER_KEYS.items() if k in declared and k not in config}}


def checkpoint_model_patcher_class():
    """Return the class ComfyUI's checkpoint loader wraps a diffusion model in."""
    import comfy.model_patcher

    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
