"""What the Train node tells the page (nodes/progress.py): run state, resume, losses and checkpoint file."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def progress_module(comfy, monkeypatch):
    from lora_workbench.nodes import progress

    sent = []
    monkeypatch.setattr(progress, "_send", lambda event, data: sent.append((event, data)))
    progress.sent = sent
    return progress


def _checkpoint(folder, step, losses):
    from lora_workbench.trainer import checkpoint as ckpt

    return ckpt.save_checkpoint(folder, step, {"w": torch.zeros(2)}, {"losses": losses})


def test_a_failed_run_names_its_steps_message_and_checkpoint_file(progress_module, tmp_path):
    p = progress_module
    run_dir = tmp_path / "checkpoints" / "my" / "run"
    progress = p.TrainingProgress("7", 10, run_dir=run_dir, run_name="my/run")
    with pytest.raises(RuntimeError), progress.reporting_failures():
        for step, loss in ((1, 0.5), (2, 0.4), (3, 0.3)):
            progress.on_step(step, 10, loss)
        progress.on_checkpoint(_checkpoint(run_dir, 3, [0.5, 0.4, 0.3]))
        raise RuntimeError("boom")
    events = [e for e, _ in p.sent]
    assert events == [p.PROGRESS_EVENT] * 3 + [p.DONE_EVENT]
    assert [d["resumed_from"] for _, d in p.sent[:3]] == [0, 0, 0] and "history" not in p.sent[0][1]
    done = p.sent[-1][1]
    assert (done["node"], done["state"], done["steps"], done["message"]) == ("7", "failed", 3, "RuntimeError: boom")
    assert done["file"] == "my/run/step-000003.safetensors", "the tensor file, relative to the checkpoints folder"
    assert done["path"] == str(run_dir / "step-000003.safetensors")


def test_cancel_before_any_checkpoint_says_so(progress_module):
    import comfy.model_management as mm

    p = progress_module
    progress = p.TrainingProgress("7", 10)
    with pytest.raises(mm.InterruptProcessingException), progress.reporting_failures():
        progress.on_step(1, 10, 0.5)
        raise mm.InterruptProcessingException()
    done = p.sent[-1][1]
    assert (done["state"], done["steps"], done["file"], done["path"], done["message"]) == (
        "cancelled",
        1,
        None,
        None,
        "",
    )


def test_a_resumed_run_sends_where_it_resumed_with_the_checkpoint_history(progress_module, tmp_path):
    p = progress_module
    run_dir = tmp_path / "run"
    index = _checkpoint(run_dir, 3, [0.5, 0.4, 0.3])
    progress = p.TrainingProgress("7", 5, run_dir=run_dir, run_name="run")
    progress.on_step(4, 5, 0.25)
    progress.on_step(5, 5, 0.2)
    first, second = (d for _, d in p.sent)
    assert first["resumed_from"] == 3 and first["history"] == [[1, 0.5], [2, 0.4], [3, 0.3]]
    assert second["resumed_from"] == 3 and "history" not in second
    end = _checkpoint(run_dir, 5, [0.5, 0.4, 0.3, 0.25, 0.2])
    result = SimpleNamespace(
        stopped_reason="finished", steps_done=5, losses=[0.5, 0.4, 0.3, 0.25, 0.2], checkpoint_path=end, resumed_from=3
    )
    progress.done(result)
    done = p.sent[-1][1]
    assert (done["state"], done["steps"], done["resumed_from"], done["file"]) == (
        "finished",
        5,
        3,
        "run/step-000005.safetensors",
    )
    assert done["losses"] == [[1, 0.5], [2, 0.4], [3, 0.3], [4, 0.25], [5, 0.2]]
    assert index.name == "checkpoint.json" and "checkpoint.json" not in done["file"]


def test_already_finished_sends_the_checkpoint_losses_and_long_runs_are_thinned(progress_module, tmp_path):
    p = progress_module
    losses = [1.0 / (i + 1) for i in range(5000)]
    end = _checkpoint(tmp_path / "long", 5000, losses)
    progress = p.TrainingProgress("7", 4000, run_dir=tmp_path / "long", run_name="long")
    progress.done(
        SimpleNamespace(
            stopped_reason="already finished", steps_done=5000, losses=losses, checkpoint_path=end, resumed_from=5000
        )
    )
    done = p.sent[-1][1]
    assert done["state"] == "already finished" and done["resumed_from"] == 5000
    assert len(done["losses"]) <= p.MAX_LOSSES and done["losses"][-1] == [5000, losses[-1]]
    assert done["file"] == "long/step-005000.safetensors"
