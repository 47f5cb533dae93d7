"""ComfyUI node classes: thin translators between ComfyUI types and ``lora``/``trainer``."""
