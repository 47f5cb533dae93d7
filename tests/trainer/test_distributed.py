"""Data-parallel training on torch.distributed: 2 CPU processes (gloo, launched by torchrun) against 1 process.

One torchrun job of two ranks (``ddp_job.py``) trains four runs in 30-60 s on two busy cores, most of it the
ranks importing diffusers; the single-process comparisons run here, on the session's tiny parts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_workbench.trainer import checkpoint, inject, loop
from lora_workbench.trainer.config import TrainConfig
from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder

pytestmark = pytest.mark.slow
JOB = Path(__file__).with_name("ddp_job.py")
PER_RANK_BATCH, WORLD = 2, 2
VALIDATION = dict(every=3, hold_out=0)  # hold_out 0: the run trains as "full" does


def _settings(batch_size: int, **kw) -> dict:
    # Six images, global batch 4: each epoch's second batch has 2 images, one per rank (an uneven-size check too).
    base = dict(
        steps=6,
        rank=4,
        learning_rate=3e-3,
        batch_size=batch_size,
        seed=0,
        prior_preservation=True,
        class_prompt="a photo of toy",
        num_class_images=4,
        checkpoint_every=3,
    )
    return {**base, **kw}


def _launch(tmp: Path, name: str, runs: list[dict]) -> subprocess.CompletedProcess:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"folder": str(tmp / "subject"), "out": str(tmp), "runs": runs}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", str(JOB)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, str(spec)], capture_output=True, text=True, timeout=600, env=env)


def _ranks(tmp: Path, name: str) -> list[tuple[dict[str, torch.Tensor], dict]]:
    return [
        (load_file(tmp / f"{name}.rank{r}.safetensors"), json.loads((tmp / f"{name}.rank{r}.json").read_text()))
        for r in range(WORLD)
    ]


def _train_one(api, tmp: Path, **kw) -> tuple[loop.TrainResult, dict[str, torch.Tensor]]:
    """One process with the global batch (2 x 2), the layers removed afterwards."""
    dataset = load_image_folder(tmp / "subject", DatasetOptions(trigger="sks", class_noun="toy", resolution=16))
    try:
        result = loop.train(api, dataset, TrainConfig(**_settings(PER_RANK_BATCH * WORLD)), keep_layers=True, **kw)
        return result, {k: v.detach().clone() for k, v in inject.named_lora_tensors(api.unet).items()}
    finally:
        inject.remove_adapter(api.unet)
        inject.remove_adapter(api.text_encoder)


def _assert_close(got: dict, want: dict, what: str) -> None:
    # The ranks sum their examples' losses and the reduced gradients in another order than one process does
    # (float32 rounding, ~1e-7 relative per op); six Adam steps keep that near 1e-6. A different batch or noise
    # would differ by about the learning rate (3e-3) per step.
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < 1e-5, f"{what}: largest difference {worst:g}"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One torchrun job of 2 ranks: a full run, a run stopped at step 3, that run resumed (from a copy), and a run
    whose rank 1 fails after step 5 (which ends the job). Returns ``(folder, finished process)``."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "subject").mkdir()
    spec = importlib.util.spec_from_file_location("ddp_job", JOB)  # the conftest's drawing, through the job file
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for i in range(6):
        module._conftest().draw_subject(i).save(tmp / "subject" / f"img_{i}.png")
    common = dict(config=_settings(PER_RANK_BATCH), cache_dir=str(tmp))
    runs = [
        dict(name="full", checkpoint_dir=str(tmp / "full"), **common),
        dict(name="stopped", checkpoint_dir=str(tmp / "stopped"), stop_at=3, **common),
        dict(name="resumed", checkpoint_dir=str(tmp / "resumed"), copy_from=str(tmp / "stopped"), **common),
        dict(name="validated", validation=VALIDATION, **common),
        dict(
            name="failing",
            checkpoint_dir=str(tmp / "failing"),
            fail_rank=1,
            fail_step=5,
            **{**common, "config": _settings(PER_RANK_BATCH, checkpoint_every=2)},
        ),
    ]
    return tmp, _launch(tmp, "job", runs)


def test_two_ranks_train_as_one_process_with_twice_the_batch(job, model_api):
    tmp, _ = job
    (rank0, log0), (rank1, log1) = _ranks(tmp, "full")
    # Every rank applies the same reduced gradients: the copies stay bit-identical, and so do the losses.
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert log0["losses"] == log1["losses"] and len(log0["losses"]) == 6
    single, tensors = _train_one(model_api, tmp, cache_dir=tmp)  # the same (8-bit cached) class images
    _assert_close(rank0, tensors, "2 ranks x batch 2 vs 1 process x batch 4")
    # The loss reported is the global batch's (the mean over the ranks' equal shares).
    assert log0["losses"] == pytest.approx(single.losses, rel=1e-5)


def test_rank_0_evaluates_and_every_rank_gets_its_validation_losses(job, model_api):
    from lora_workbench.trainer import validation

    tmp, _ = job
    (rank0, log0), (rank1, log1) = _ranks(tmp, "validated")
    (full, _), _ = _ranks(tmp, "full")
    assert all(torch.equal(rank0[k], full[k]) for k in full), "validation leaves training as it was"
    assert log0["validation"] == log1["validation"] and [s for s, _ in log0["validation"]] == [0, 3, 6]
    single, _ = _train_one(model_api, tmp, cache_dir=tmp, validation=validation.ValidationConfig(**VALIDATION))
    # The same model up to the reduction order of the gradients (see _assert_close): equal to 1e-5.
    assert [v for _, v in log0["validation"]] == pytest.approx([v for _, v in single.validation], rel=1e-5)


def test_only_rank_0_writes_and_class_images_and_latents_are_made_once(job):
    tmp, _ = job
    (_, log0), (_, log1) = _ranks(tmp, "full")
    assert log1["writes"] == [] and log1["generated"] == 0 and log1["encoded"] == 0, log1
    assert any("class_images" in w for w in log0["writes"]) and log0["generated"] > 0
    assert sum("full" in w for w in log0["writes"]) == 2  # the checkpoints of steps 3 and 6
    assert checkpoint.read_index(tmp / "full")["step"] == 6


def test_a_two_rank_checkpoint_resumes_on_two_and_on_one(job, model_api):
    tmp, _ = job
    (full, _), _ = _ranks(tmp, "full")
    (_, stopped_log), _ = _ranks(tmp, "stopped")
    assert stopped_log["steps_done"] == 3
    (resumed0, log0), (resumed1, _) = _ranks(tmp, "resumed")
    assert log0["resumed_from"] == 3 and log0["steps_done"] == 6
    _assert_close(resumed0, full, "resumed on 2 ranks")
    assert all(torch.equal(resumed0[k], resumed1[k]) for k in full)

    # On one process with the global batch (2 x 2): the run record holds the global batch, so it is the same run.
    assert checkpoint.read_index(tmp / "stopped")["step"] == 3
    resumed, tensors = _train_one(model_api, tmp, checkpoint_dir=tmp / "stopped", cache_dir=tmp)
    assert resumed.resumed_from == 3 and resumed.steps_done == 6 and not resumed.notes
    _assert_close(tensors, full, "resumed on 1 process")


def test_a_failing_rank_ends_the_job_with_its_message_and_the_checkpoint_kept(job):
    tmp, done = job
    # Rank 1 raised after step 5: torchrun stops rank 0 and the job fails with rank 1's message.
    assert done.returncode != 0
    assert "rank 1 failed on purpose after step 5" in done.stderr, done.stderr[-4000:]
    step, saved, _ = checkpoint.load_checkpoint(tmp / "failing")
    # Step 4 is the last periodic checkpoint; rank 0 writes step 5 (complete on both ranks) too when the broken
    # connection reaches it before torchrun's stop signal does. Either is a whole step, never a half-done one.
    assert step in (4, 5) and saved
