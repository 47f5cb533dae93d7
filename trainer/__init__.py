"""The DreamBooth-LoRA training engine: plain torch + peft + diffusers, no ComfyUI import."""
