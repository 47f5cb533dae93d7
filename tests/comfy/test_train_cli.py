"""``lora-workbench train``: the example workflow's Train LoRA job, headless, in one process and under torchrun and
``accelerate launch``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_workbench.headless import cli, ui_format
from lora_workbench.headless.examples import DATASET_INPUT_NAME, EXAMPLES_DIR, TRAIN_IMAGES
from lora_workbench.trainer import checkpoint

EXAMPLE = EXAMPLES_DIR / "train_then_stack.json"


def _kinds(prompt: dict, ids) -> list[str]:
    return sorted(prompt[k]["class_type"] for k in ids)


def test_train_job_keeps_the_train_node_its_inputs_and_the_nodes_saving_its_results(comfy):
    prompt = ui_format.load_workflow(EXAMPLE, comfy.node_classes)
    train, job = cli.train_job(prompt, comfy.node_classes)
    assert prompt[train]["class_type"] == cli.TRAIN_NODE
    # Loader, dataset, Train, and the Save Image of the loss curve and the Save LoRA of the adapter; not the
    # sampling branch (Stack, Apply, text encoders, KSampler, decode, its Save Image).
    assert _kinds(job, job) == sorted(
        ["CheckpointLoaderSimple", "LoraWorkbenchImageFolder", cli.TRAIN_NODE, "SaveImage", "LoraWorkbenchSave"]
    )
    assert job[train] == prompt[train], "the Train node's settings are the graph's"
    _, bare = cli.train_job(prompt, comfy.node_classes, writers=False)  # what ranks other than 0 run
    assert _kinds(bare, bare) == sorted(["CheckpointLoaderSimple", "LoraWorkbenchImageFolder", cli.TRAIN_NODE])


def test_train_job_asks_which_of_several_train_nodes(comfy):
    prompt = ui_format.load_workflow(EXAMPLE, comfy.node_classes)
    train = next(k for k, v in prompt.items() if v["class_type"] == cli.TRAIN_NODE)
    prompt["99"] = json.loads(json.dumps(prompt[train]))
    with pytest.raises(ValueError, match=rf"2 Train LoRA nodes \({train}, 99\): choose one with --node"):
        cli.train_job(prompt, comfy.node_classes)
    assert cli.train_job(prompt, comfy.node_classes, node_id="99")[0] == "99"
    del prompt["99"], prompt[train]
    with pytest.raises(ValueError, match="has no Train LoRA node"):
        cli.train_job(prompt, comfy.node_classes)


def _train(tmp_path: Path, launcher: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``lora-workbench train`` on the example for 2 steps (``--steps``) in a fresh ComfyUI base folder."""
    home = tmp_path / "home"
    shutil.copytree(TRAIN_IMAGES, home / "input" / DATASET_INPUT_NAME)
    args = ["train", str(EXAMPLE), "--output", str(tmp_path / "out"), "--base", str(home), "--steps", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*launcher, "-m", "lora_workbench.headless.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    return proc, home


def _check_files(proc: subprocess.CompletedProcess, home: Path, tmp_path: Path) -> dict:
    """Check the printed files: the LoRA where Save LoRA writes it, the loss curve, the checkpoint folder."""
    printed = [Path(line) for line in proc.stdout.splitlines() if line.strip()]
    lora = home / "models" / "loras" / "lora_workbench" / "example_sks.safetensors"
    folder = home / "output" / "lora_workbench" / "checkpoints" / "example_sks"
    curves = [p for p in printed if p.suffix == ".png"]
    assert sorted(printed) == sorted([lora, folder, *curves]) and len(curves) == 1, proc.stdout
    assert (tmp_path / "out") in curves[0].parents and curves[0].stat().st_size > 0
    with safe_open(lora, "pt") as f:
        assert f.metadata()["modelspec.trigger_phrase"] == "sks"
        assert f.keys() and all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    index = checkpoint.read_index(folder)
    assert index["step"] == 2 and len(index["losses"]) == 2, "--steps 2 replaces the node's 12 steps"
    return index


@pytest.mark.slow
def test_cli_train_runs_the_example_workflows_train_job(ckpt_name, tmp_path):
    # ckpt_name: the session fixture has built the tiny model into the cache, which the CLI links.
    proc, home = _train(tmp_path, [sys.executable])
    index = _check_files(proc, home, tmp_path)
    assert index["run"]["settings"]["batch_size"] == 2  # the node's batch, one process
    assert "KSampler" not in proc.stderr and "finished after 2/2 steps" in proc.stderr, proc.stderr[-2000:]


# The two launchers the README gives: torchrun, and accelerate's (which runs torchrun's launcher; on a machine
# without GPUs its --multi_gpu mode starts CPU processes, and our trainer takes gloo).
LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1"]
    + ["--mixed_precision=no", "--dynamo_backend=no"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_cli_train_under_a_launcher_trains_on_two_ranks_and_rank_0_writes(ckpt_name, tmp_path, launcher):
    proc, home = _train(tmp_path, [sys.executable, *LAUNCHERS[launcher]])
    index = _check_files(proc, home, tmp_path)  # printed once, by rank 0; the files exist once
    # The run record holds the global batch: the node's batch of 2 on each of 2 ranks.
    assert index["run"]["settings"]["batch_size"] == 4
