#!/usr/bin/env bash
# The main job: set up (idempotent), then run the example workflows headless on the tiny model, on the
# ComfyUI that LORA_WORKBENCH_COMFYUI names (default the pinned 0.3.75; scripts/comfyui_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/comfyui_env.sh
bash scripts/setup.sh
exec "$VPY" -m lora_workbench.headless.examples "$@"
