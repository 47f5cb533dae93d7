# Sourced by the other scripts: which ComfyUI they set up and run, and in which venv.
# LORA_WORKBENCH_COMFYUI names the version (default: PINNED_VERSION of headless/comfy_env.py). Each version
# has its own venv, since ComfyUI's requirements pin its web frontend (0.3.75: comfyui-frontend-package
# 1.32.9, 0.33.0: 1.49.6) and the browser tests must meet the right one: .venv for the pinned version,
# .venv-comfyui-VERSION for any other. LORA_WORKBENCH_VENV overrides the folder.
PINNED_COMFYUI=$(sed -n 's/^PINNED_VERSION = "\(.*\)"$/\1/p' headless/comfy_env.py)
export LORA_WORKBENCH_COMFYUI=${LORA_WORKBENCH_COMFYUI:-$PINNED_COMFYUI}
if [ -n "${LORA_WORKBENCH_VENV:-}" ]; then
    VENV=$LORA_WORKBENCH_VENV
elif [ "$LORA_WORKBENCH_COMFYUI" = "$PINNED_COMFYUI" ]; then
    VENV=.venv
else
    VENV=.venv-comfyui-$LORA_WORKBENCH_COMFYUI
fi
VPY=$VENV/bin/python
