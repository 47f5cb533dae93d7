"""LoRA as data: formats, metadata, safe file I/O, merging and scaling.

Plain torch + safetensors; never imports ComfyUI, peft or diffusers.
"""
