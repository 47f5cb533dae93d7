#!/usr/bin/env bash
# The main job: set up (idempotent), then run the example workflows headless on the tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m lora_workbench.headless.examples "$@"
