#!/usr/bin/env bash
# Make a fresh machine ready for one ComfyUI version (LORA_WORKBENCH_COMFYUI, default the pinned 0.3.75):
# its venv (scripts/comfyui_env.sh) with the pack (editable) and its test tools, and that ComfyUI in
# .cache/comfyui/VERSION with its requirements (only checked when COMFYUI_PATH is set).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/comfyui_env.sh

PY=${PYTHON:-python3}
if [ ! -x "$VPY" ]; then
    "$PY" -m venv "$VENV"
fi

stamp=$VENV/.lora-workbench-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VPY" -m pip install -q --upgrade pip
    # ComfyUI imports torchvision at start-up; these two versions install together from
    # this machine's disk (a CUDA build that runs on the CPU).
    if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
        "$VPY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    fi
    # ComfyUI lists torchaudio (0.33 imports it at start-up). 2.11.1 imports with torch 2.14.1;
    # --no-deps, since its own torch pin would replace the torch above.
    if ! "$VPY" -c "import torchaudio" 2>/dev/null; then
        "$VPY" -m pip install -q --no-deps "torchaudio==2.11.1"
    fi
    "$VPY" -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi

# The ComfyUI version's tree and its requirements (without torch's family: that is ours above).
"$VPY" -m lora_workbench.headless.comfy_env install >&2
