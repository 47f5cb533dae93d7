#!/usr/bin/env bash
# Make a fresh machine ready: a venv in .venv with the pack (editable), its test tools,
# and the pinned ComfyUI 0.3.75 in .cache/comfyui (skipped when COMFYUI_PATH is set).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python

stamp=.venv/.lora-workbench-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VPY" -m pip install -q --upgrade pip
    # ComfyUI imports torchvision at start-up; these two versions install together from
    # this machine's disk (a CUDA build that runs on the CPU).
    if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
        "$VPY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    fi
    "$VPY" -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi

# The pinned ComfyUI (its requirements, without torch: that is ours above).
"$VPY" -m lora_workbench.headless.comfy_env install >&2
