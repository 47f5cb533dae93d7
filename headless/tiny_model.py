"""A tiny SD1.5-shaped checkpoint, made locally from a fixed seed (no weights are downloaded).

ComfyUI detects it as SD1.5 (``model_channels=320``, ``context_dim=768`` decide that), with a
full-size CLIP-L text encoder (ComfyUI builds CLIP-L from its own config, so a smaller one would
leave uninitialised weights) and a TAESD VAE. The modules are built with ComfyUI's own classes,
so the key names are exactly what its loader expects, then every parameter is initialised
explicitly: ComfyUI's ops skip initialisation, and leftovers of ``torch.empty`` give NaN images.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

from .comfy_env import CACHE_DIR

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "lora_workbench_tiny_sd15.safetensors"
# Changing anything below changes the file: the version goes into the name of the cache entry.
TINY_MODEL_VERSION = "2"
SEED = 20261128
UNET_CONFIG = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[1, 1],
    channel_mult=(1, 2),
    num_heads=8,
    transformer_depth=[1, 1],
    transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1],
    context_dim=768,
    use_linear_in_transformer=False,
    use_spatial_transformer=True,
    legacy=False,
)


def _initialise(module) -> None:
    """Give every parameter a proper value: torch's default init, norms to (1, 0).

    Norms that are not torch classes (Flux's RMSNorm ``scale``, T5's ``T5LayerNorm``: any module whose
    class name ends in ``Norm``) get the same identity values.
    """
    import torch

    bases = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding)
    if hasattr(torch.nn, "RMSNorm"):  # torch >= 2.4; ComfyUI 0.33's ops subclass it
        bases += (torch.nn.RMSNorm,)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
        for m in module.modules():
            for base in bases:
                if isinstance(m, base):
                    # Call the torch class's own reset: ComfyUI's ops override it with a no-op.
                    base.reset_parameters(m)
                    break
            else:
                if type(m).__name__.endswith("Norm"):
                    for name, p in m.named_parameters(recurse=False):
                        p.fill_(0.0 if name == "bias" else 1.0)
        for name, p in module.named_parameters():
            if name.endswith("vae_scale"):
                p.fill_(1.0)
            elif name.endswith("vae_shift"):
                p.fill_(0.0)
            elif name.endswith("logit_scale"):
                p.fill_(4.6052)
            elif name.endswith("text_projection.weight"):
                torch.nn.init.eye_(p)
        bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise RuntimeError(f"tiny model: parameters left uninitialised: {bad[:5]}")


def build_state_dict() -> dict:
    """Return the tiny checkpoint's tensors (fp16), keyed as an SD1.5 ``.safetensors`` checkpoint.

    Requires ComfyUI to be imported first (``comfy_env.import_comfy_core``).
    """
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    import torch

    torch.manual_seed(SEED)
    unet = openaimodel.UNetModel(
        **UNET_CONFIG, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init
    )
    _initialise(unet)
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _initialise(clip)
    taesd = comfy.taesd.taesd.TAESD()
    _initialise(taesd)

    sd = {}
    for k, v in unet.state_dict().items():
        sd[f"model.diffusion_model.{k}"] = v
    for k, v in clip.state_dict().items():
        if k.startswith("transformer."):
            sd[f"cond_stage_model.{k}"] = v
    for k, v in taesd.state_dict().items():
        if k.startswith(("taesd_", "vae_")):
            sd[f"first_stage_model.{k}"] = v
    return {k: v.to(torch.float16).contiguous() for k, v in sd.items() if v.is_floating_point()}


def ensure_tiny_model(folder: Path | None = None) -> Path:
    """Write the tiny checkpoint into ``folder`` (default: the cache) unless present; return its path.

    The file is built in a temp file and renamed, so an interrupted build leaves nothing half-written.
    """
    from safetensors.torch import save_file

    folder = Path(folder or CACHE_DIR / "models")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TINY_MODEL_NAME
    version_file = path.with_suffix(".version")
    if path.is_file() and version_file.is_file() and version_file.read_text() == TINY_MODEL_VERSION:
        return path
    sd = build_state_dict()
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"lora_workbench.tiny_model": TINY_MODEL_VERSION})
    tmp.replace(path)
    version_file.write_text(TINY_MODEL_VERSION)
    log.info("wrote tiny SD1.5-shaped model %s (%.0f MB)", path, path.stat().st_size / 1e6)
    return path


def file_digest(path: Path) -> str:
    """Return the sha256 of a file (hex), for reporting which tiny model a run used."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    """Command line: ``python -m lora_workbench.headless.tiny_model`` prints the model path."""
    from .comfy_env import import_comfy_core

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import_comfy_core()
    print(ensure_tiny_model())
    return 0


if __name__ == "__main__":
    sys.exit(main())
