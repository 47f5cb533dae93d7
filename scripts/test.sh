#!/usr/bin/env bash
# The test command of the README and of CI: set up (idempotent), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${LORA_WORKBENCH_SKIP_BROWSER:-0}" != "1" ] && [ -f scripts/install_browser.sh ]; then
    bash scripts/install_browser.sh
fi
exec .venv/bin/python -m pytest "$@"
