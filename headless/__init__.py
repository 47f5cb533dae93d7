"""Run ComfyUI as a library: find or install it, build the tiny model, execute workflows.

The only code outside ``nodes/`` that imports ComfyUI, and only inside functions.
"""
