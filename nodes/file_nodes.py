"""Load LoRA, LoRA Info, Save LoRA and Convert LoRA: files <-> in-graph adapters and reports."""

from __future__ import annotations

import json
import os

import folder_paths
from comfy_api.latest import io

from ..lora import keys as lora_keys
from ..lora import lycoris, safeio
from ..lora import merge as lora_merge
from ..lora import metadata as lora_metadata
from .adapter_dict import LoraTensors, metadata_of, source_of
from .files import display_name, lora_names, read_lora, resolve_lora_path
from .patching import key_map_for, load_patches
from .types import CATEGORY_FILES, LoraModel

FORMATS = ["kohya", "peft"]


def _lora_combo(name: str = "lora_name") -> io.Combo.Input:
    return io.Combo.Input(name, options=lora_names(), tooltip="A LoRA file from models/loras.")


def _match_summary(tensors: dict, model, clip) -> str:
    """Count the weights this LoRA patches on the given MODEL and CLIP, and the keys matching nothing."""
    patches, unmatched = load_patches(tensors, key_map_for(model, clip))
    model_keys = set(model.model_state_dict()) if model is not None else set()
    clip_keys = set(clip.cond_stage_model.state_dict()) if clip is not None else set()
    names = [k if isinstance(k, str) else k[0] for k in patches]
    on_model = sum(n in model_keys for n in names)
    on_clip = sum(n in clip_keys for n in names)
    lines = [f"matches {on_model} model weights and {on_clip} CLIP weights"]
    if unmatched:
        lines.append(f"{len(unmatched)} key(s) match nothing: " + ", ".join(unmatched[:5]))
    return "\n".join(lines)


def format_info(name: str, info: dict) -> str:
    """Return LoRA Info's text: one ``key: value`` line per described field."""
    lines = [f"file: {name}"]
    for key, value in info.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


class LoadLoraNode(io.ComfyNode):
    """A LoRA file -> an in-graph adapter (ComfyUI's LORA_MODEL, with the file's metadata)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchLoad",
            display_name="Load LoRA as Adapter (LoRA Workbench)",
            category=CATEGORY_FILES,
            description="Reads a LoRA file (safetensors) into the graph as a LORA_MODEL that Apply LoRA Stack, "
            "LoRA Merge, Save LoRA and core Load LoRA Model accept.",
            inputs=[_lora_combo()],
            outputs=[
                LoraModel.Output(
                    display_name="adapter",
                    tooltip="The LoRA as an in-graph adapter: to Apply LoRA Stack, LoRA Merge or Save LoRA.",
                )
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name) -> tuple:
        return safeio.cache_key(resolve_lora_path(lora_name))

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        _, tensors, metadata = read_lora(lora_name)
        return io.NodeOutput(LoraTensors(tensors, metadata, source=lora_name))


def _is_scalar_key(key: str) -> bool:
    """Return True for the keys whose values (not only shapes) describing or matching a LoRA reads."""
    return key.endswith((".alpha", ".reshape_weight"))


class LoraInfoNode(io.ComfyNode):
    """Rank, alpha, base family, trigger words, training settings, and what matches a MODEL/CLIP."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchInfo",
            display_name="LoRA Info (LoRA Workbench)",
            category=CATEGORY_FILES,
            description="Shows what a LoRA file holds: rank, alpha, base model family, trigger words and the "
            "training settings in its metadata, read from the file's header without loading its weights. With a "
            "MODEL or CLIP connected, also how many of their weights the LoRA patches and which keys match nothing.",
            inputs=[
                _lora_combo(),
                io.Model.Input(
                    "model", optional=True, tooltip="A model to check the LoRA against (which weights it patches)."
                ),
                io.Clip.Input("clip", optional=True, tooltip="A text encoder to check the LoRA against."),
            ],
            outputs=[
                io.String.Output(display_name="info", tooltip="The description, one 'key: value' line per field."),
                io.String.Output(
                    display_name="trigger_words", tooltip="The LoRA's trigger words, comma-separated (may be empty)."
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora_name, model=None, clip=None) -> io.NodeOutput:
        # Describing and matching need names, shapes, metadata and scalars only: the header, plus the alphas and
        # reshape targets ComfyUI reads as numbers while it builds patches; the weights stay on disk.
        tensors, metadata = safeio.read_header(
            resolve_lora_path(lora_name), display=display_name(lora_name), load=_is_scalar_key
        )
        text = format_info(lora_name, lora_metadata.describe(tensors, metadata, source=display_name(lora_name)))
        if model is not None or clip is not None:
            text += "\n" + _match_summary(tensors, model, clip)
        words = ", ".join(lora_metadata.trigger_words(metadata))
        return io.NodeOutput(text, words, ui={"text": [text]})


def _output_path(filename: str) -> str:
    """Return the absolute ``models/loras`` path for a user-given file name (no escaping the folder).

    Raises:
        ValueError: the name is empty or points outside the loras folder.
    """
    name = filename.strip()
    if not name:
        raise ValueError("Save LoRA: filename is empty")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    root = os.path.realpath(folder_paths.get_folder_paths("loras")[0])
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"Save LoRA: filename '{filename}' points outside the loras folder {root}")
    return path


class SaveLoraNode(io.ComfyNode):
    """An in-graph adapter -> ``models/loras/<name>.safetensors`` (kohya keys, metadata, atomic write)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchSave",
            display_name="Save LoRA (LoRA Workbench)",
            category=CATEGORY_FILES,
            description="Writes the adapter in the kohya format ComfyUI, A1111 and diffusers load, with its "
            "metadata (trigger words, rank, alpha, base model, training settings). Never overwrites unless asked.",
            inputs=[
                LoraModel.Input("adapter", tooltip="The LoRA to save, e.g. Train LoRA's or LoRA Merge's adapter."),
                io.String.Input(
                    "filename",
                    default="lora_workbench/my_lora",
                    tooltip="Name in models/loras ('/' makes sub-folders; .safetensors is added).",
                ),
                io.String.Input(
                    "trigger_words",
                    display_name="trigger words",
                    default="",
                    tooltip="Comma-separated; added to the metadata.",
                ),
                io.Boolean.Input(
                    "overwrite", default=False, tooltip="Replace a file of that name; off: such a file is an error."
                ),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, adapter, filename, trigger_words="", overwrite=False) -> io.NodeOutput:
        path = _output_path(filename)
        metadata = metadata_of(adapter)
        words = [w.strip() for w in trigger_words.split(",") if w.strip()]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if lycoris.algorithm(adapter) is not None:
            # LoHa/LoKr/DoRA: written as read (keys, tensors, metadata), so nothing of the original is lost;
            # only trigger words typed here are added.
            if words:
                metadata["modelspec.trigger_phrase"] = ", ".join(words)
            safeio.write_safetensors(path, dict(adapter), metadata, overwrite=overwrite)
            return io.NodeOutput(path, ui=_saved_ui(path))
        state = lora_keys.state_from_dict(dict(adapter), metadata, source=source_of(adapter))
        state.metadata.update(lora_metadata.build_metadata(state, trigger_words=words or None, existing=metadata))
        safeio.write_safetensors(path, lora_keys.to_kohya_dict(state), state.metadata, overwrite=overwrite)
        return io.NodeOutput(path, ui=_saved_ui(path))


def _saved_ui(path: str) -> dict:
    """What the node shows: the full path, and the name the LoRA pickers list it under (the page refreshes them)."""
    root = os.path.realpath(folder_paths.get_folder_paths("loras")[0])
    return {"text": [path], "lora_name": [os.path.relpath(path, root).replace(os.sep, "/")]}


class ConvertLoraNode(io.ComfyNode):
    """A LoRA file -> a file in another key format (kohya or peft/diffusers), metadata kept."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraWorkbenchConvert",
            display_name="Convert LoRA (LoRA Workbench)",
            category=CATEGORY_FILES,
            description="Writes a LoRA file in another key format (kohya for ComfyUI/A1111, peft for diffusers) "
            "into models/loras, metadata kept; LyCORIS LoHa/LoKr files become plain LoRA, exactly or at a rank.",
            inputs=[
                _lora_combo(),
                io.Combo.Input(
                    "format",
                    options=FORMATS,
                    default="kohya",
                    tooltip="kohya: what ComfyUI, A1111 and diffusers all load. peft: diffusers/peft naming "
                    "(unet.<path>.lora_A, alphas in the header), for diffusers. Apply LoRA Stack applies a peft "
                    "file fully; core Load LoRA reads only its text-encoder part, at alpha = rank (it ignores the "
                    "header), and none of ComfyUI's .diff/.diff_b tensors.",
                ),
                io.String.Input(
                    "filename",
                    default="lora_workbench/converted",
                    tooltip="Name of the new file in models/loras ('/' makes sub-folders; .safetensors is added).",
                ),
                io.Boolean.Input(
                    "overwrite", default=False, tooltip="Replace a file of that name; off: such a file is an error."
                ),
                io.Int.Input(
                    "rank",
                    default=0,
                    min=0,
                    max=4096,
                    optional=True,
                    tooltip="LyCORIS LoHa/LoKr files only: the LoRA rank to re-factor each layer's exact change to "
                    "(the report gives the error made); 0 = exact (each layer's own rank, often large).",
                ),
            ],
            outputs=[
                io.String.Output(display_name="path", tooltip="Where the file was written."),
                io.String.Output(display_name="report", tooltip="The format, and the error made (0: exact)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora_name, format, filename, overwrite=False, rank=0) -> io.NodeOutput:
        path = _output_path(filename)
        _, tensors, metadata = read_lora(lora_name)
        state = lycoris.state_from_any(tensors, metadata, source=display_name(lora_name))
        report = f"{format} format, exact"
        if lycoris.algorithm(tensors) is not None:
            state, report = _lycoris_to_rank(state, rank)
        if format == "kohya":
            out, out_metadata = lora_keys.to_kohya_dict(state), state.metadata
        else:
            out, out_metadata = lora_keys.to_peft_dict(state)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        safeio.write_safetensors(path, out, out_metadata, overwrite=overwrite)
        return io.NodeOutput(path, report, ui={"text": [path, report]})


def _lycoris_to_rank(state, rank: int):
    """Return ``(state, report)``: a LyCORIS file's exact-delta state re-factored to ``rank`` (0: kept exact)."""
    algo = state.metadata.get("lora_workbench.lycoris_algorithm", "LyCORIS")
    exact = max(state.ranks)
    if not rank or rank >= exact:
        out, report = state, f"{algo} -> LoRA of each layer's exact rank (up to {exact}); relative error 0"
    else:
        result = lora_merge.merge([state], [1.0], "svd", rank=rank)
        out, error = result.state, result.report.overall_error
        report = f"{algo} -> LoRA rank {rank}; relative error (Frobenius, all layers) {error:.3e}"
    # The file's kohya keys (ss_network_module "lycoris.kohya", its algo args) would describe the wrong network.
    out.metadata = lora_metadata.build_metadata(out, existing=state.metadata)
    out.metadata.pop("ss_network_args", None)
    return out, report
