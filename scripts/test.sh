#!/usr/bin/env bash
# The test command of the README and of CI: for each tested ComfyUI version, set up (idempotent), then run
# the whole suite (pytest) against it; the exit status is non-zero when any run failed.
#
#   bash scripts/test.sh                            both tested versions, one after the other
#   bash scripts/test.sh --comfyui 0.33.0 [ARGS]    one version (or LORA_WORKBENCH_COMFYUI="0.33.0")
#   bash scripts/test.sh tests/unit -q              pytest ARGS pass through, for each version
#
# With COMFYUI_PATH set the suite runs once, against that tree, in .venv (its requirements are yours).
set -euo pipefail
cd "$(dirname "$0")/.."

# The pinned version (headless/comfy_env.py) and the newest, whose source is in ../shared/comfyui.
TESTED="0.3.75 0.33.0"
versions=${LORA_WORKBENCH_COMFYUI:-$TESTED}
if [ "${1:-}" = "--comfyui" ]; then
    versions=${2:?"--comfyui needs a version, e.g. --comfyui 0.33.0"}
    shift 2
fi
if [ -n "${COMFYUI_PATH:-}" ]; then
    versions=$(sed -n 's/^PINNED_VERSION = "\(.*\)"$/\1/p' headless/comfy_env.py)
fi

summary=()
status=0
for version in $versions; do
    label="ComfyUI $version"
    [ -n "${COMFYUI_PATH:-}" ] && label="ComfyUI at $COMFYUI_PATH"
    echo "=== LoRA Workbench tests: $label ==="
    export LORA_WORKBENCH_COMFYUI=$version
    if ! bash scripts/setup.sh; then
        summary+=("$label:" "setup failed (see above); no tests ran")
        status=1
        continue
    fi
    if [ "${LORA_WORKBENCH_SKIP_BROWSER:-0}" != "1" ] && [ -f scripts/install_browser.sh ]; then
        bash scripts/install_browser.sh
    fi
    log=.cache/test-logs/comfyui-$version.log
    mkdir -p "$(dirname "$log")"
    (source scripts/comfyui_env.sh && "$VPY" -m pytest "$@") 2>&1 | tee "$log" && rc=0 || rc=$?
    summary+=("$label (pytest exit status $rc):" "$(grep -v '^\s*$' "$log" | tail -n 1)")
    [ "$rc" = 0 ] || status=1
done
if [ "${#summary[@]}" -gt 2 ] || [ "$status" != 0 ]; then
    echo "=== LoRA Workbench tests, per ComfyUI version ==="
    printf '%s\n' "${summary[@]}"
fi
exit "$status"
