"""Shared test configuration.

The pack is importable as ``lora_workbench`` through the editable install that
``scripts/setup.sh`` makes (the repo root mapped onto that package name), so the root never
goes on ``sys.path``, where our ``nodes/`` would shadow ComfyUI's own ``nodes`` module.
"""
