"""The ``lora-workbench`` command line: a workflow file in, PNG files out, ComfyUI's errors as messages."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_workbench.headless import cli, runner


def _frontend_workflow(ckpt_name: str) -> dict:
    """The frontend-format txt2img workflow of ``test_ui_format`` (64x64, 4 steps, one SaveImage)."""
    # Loaded by path: in importlib mode sibling test modules are not importable by name.
    spec = importlib.util.spec_from_file_location("_lw_test_ui_format", Path(__file__).with_name("test_ui_format.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.frontend_workflow(ckpt_name)


def _failing_prompt() -> dict:
    """An API prompt whose node "to_mask" raises at run time: an RGB image has no alpha channel."""
    from comfy_execution.graph_utils import GraphBuilder  # importable once the session has imported ComfyUI

    g = GraphBuilder()
    image = g.node("EmptyImage", id="image", width=8, height=8, batch_size=1, color=0)
    mask = g.node("ImageToMask", id="to_mask", image=image.out(0), channel="alpha")
    back = g.node("MaskToImage", id="back", mask=mask.out(0))
    g.node("SaveImage", id="save", images=back.out(0), filename_prefix="test_runner/never")
    return g.finalize()


@pytest.mark.slow
def test_cli_runs_a_frontend_workflow_and_prints_the_png(tmp_path, ckpt_name):
    # ckpt_name: the session fixture has built the tiny model into the cache, which the CLI links.
    workflow = tmp_path / "txt2img.json"
    workflow.write_text(json.dumps(_frontend_workflow(ckpt_name)))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_workbench.headless.cli",
            "run",
            str(workflow),
            "--output",
            str(out),
            "--base",
            str(tmp_path / "home"),
            "--set",
            "5.seed=11",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    printed = [Path(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(printed) == 1, f"stdout should hold only the written paths, got:\n{proc.stdout}"
    (png,) = printed
    assert png.is_file() and png.suffix == ".png" and out in png.parents, png
    pixels = np.asarray(Image.open(png))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    assert "[executing] node 5" in proc.stderr, "progress should go to stderr"


@pytest.mark.slow
def test_cli_failing_node_exits_1_with_node_id_and_class(comfy, tmp_path, capfd):
    # In process (ComfyUI is already imported by the session); the subprocess path is the test above.
    workflow = tmp_path / "fails.json"
    workflow.write_text(json.dumps(_failing_prompt()))
    code = cli.main(["run", str(workflow), "--output", str(tmp_path / "out"), "-q"])
    captured = capfd.readouterr()
    assert code == cli.EXIT_WORKFLOW_FAILED, captured.err
    (node_id,) = [k for k, v in json.loads(workflow.read_text()).items() if v["class_type"] == "ImageToMask"]
    assert f"node {node_id} (ImageToMask) failed: IndexError" in captured.err, captured.err
    assert "Traceback" not in captured.err, captured.err
    assert captured.out == "", "nothing was written, so nothing is printed"


@pytest.mark.slow
def test_cli_validation_error_exits_1_naming_the_node(comfy, tmp_path, capfd):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "no_such_model.safetensors"}}}
    prompt["2"] = {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "x"}}
    prompt["3"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt["4"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}}
    prompt["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}}
    workflow = tmp_path / "invalid.json"
    workflow.write_text(json.dumps(prompt))
    code = cli.main(["run", str(workflow), "--output", str(tmp_path / "out"), "-q"])
    err = capfd.readouterr().err
    assert code == cli.EXIT_WORKFLOW_FAILED, err
    assert "node 1 (CheckpointLoaderSimple)" in err and "no_such_model.safetensors" in err, err
    assert "Traceback" not in err, err


def test_cli_missing_file_exits_2(tmp_path, capsys):
    code = cli.main(["run", str(tmp_path / "nope.json")])
    assert code == cli.EXIT_USAGE
    assert f"workflow file not found: {tmp_path / 'nope.json'}" in capsys.readouterr().err


def test_cli_bad_set_exits_2(tmp_path, capsys):
    workflow = tmp_path / "w.json"
    workflow.write_text("{}")
    assert cli.main(["run", str(workflow), "--set", "seed=3"]) == cli.EXIT_USAGE
    assert "expected NODE_ID.INPUT=VALUE" in capsys.readouterr().err


def test_set_values_are_json_or_text():
    prompt = {"5": {"class_type": "KSampler", "inputs": {"seed": 1}}}
    cli.apply_sets(prompt, ["5.seed=42", "5.sampler_name=euler", "5.cfg=7.5", "5.rows=[1, 2]"])
    assert prompt["5"]["inputs"] == {"seed": 42, "sampler_name": "euler", "cfg": 7.5, "rows": {"__value__": [1, 2]}}
    with pytest.raises(ValueError, match="has no node 9"):
        cli.apply_sets(prompt, ["9.seed=1"])


@pytest.mark.slow
def test_run_prompt_reports_failing_node(run):
    prompt = _failing_prompt()
    (node_id,) = [k for k, v in prompt.items() if v["class_type"] == "ImageToMask"]
    with pytest.raises(runner.WorkflowError) as err:
        run(prompt)
    assert str(err.value).startswith(f"node {node_id} (ImageToMask) failed: IndexError: index 3 is out of bounds")
