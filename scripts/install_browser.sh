#!/usr/bin/env bash
# Make the browser tests runnable: Debian's chromium and the Python playwright package.
# Never `playwright install`: it downloads its own browser, which fails on these machines;
# the tests launch /usr/bin/chromium (or $LORA_WORKBENCH_CHROMIUM) instead.
# Idempotent: a second run only checks. Installs into the venv of LORA_WORKBENCH_COMFYUI (scripts/comfyui_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/comfyui_env.sh

CHROMIUM=${LORA_WORKBENCH_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

if ! "$VPY" -c "import playwright" 2>/dev/null; then
    "$VPY" -m pip install -q playwright
fi
