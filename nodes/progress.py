"""Training progress to ComfyUI: its progress bar, our frontend's live loss curve, and Cancel."""

from __future__ import annotations

import contextlib
import os
import time

import comfy.model_management
import comfy.utils

PROGRESS_EVENT = "lora_workbench.train_progress"
DONE_EVENT = "lora_workbench.train_done"


def _send(event: str, data: dict) -> None:
    # Headless runs have no PromptServer instance; the progress bar still works there.
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, getattr(server, "client_id", None))


class TrainingProgress:
    """Callbacks for ``trainer.loop``: progress bar per step, loss events, Cancel checks."""

    def __init__(self, node_id: str | None, total_steps: int):
        self.node_id = node_id
        self.total = total_steps
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.started = time.monotonic()
        self.first_step: tuple[int, float] | None = None
        self.checkpoint: tuple[str, int] | None = None  # (run folder name, step) of the last checkpoint
        self.class_bar = None
        self.step = 0

    def on_step(self, step: int, total: int, loss: float) -> None:
        """Move ComfyUI's progress bar and send step, loss, elapsed and remaining seconds to the UI."""
        self.step = step
        self.bar.update_absolute(step, total)
        now = time.monotonic()
        elapsed = now - self.started
        # The rate is measured from the first reported step on: set-up before it (copying the model,
        # encoding the images, class images) would otherwise inflate the estimate.
        if self.first_step is None:
            self.first_step = (step, now)
        first, first_time = self.first_step
        rate = (now - first_time) / (step - first) if step > first else elapsed / max(step, 1)
        eta = rate * (total - step)
        _send(
            PROGRESS_EVENT,
            {"node": self.node_id, "step": step, "total": total, "loss": loss, "elapsed": elapsed, "eta": eta},
        )

    def should_stop(self) -> bool:
        """Raise ComfyUI's interrupt exception when the user pressed Cancel (the loop saves first)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        return False

    def on_checkpoint(self, path) -> None:
        """Remember the last checkpoint written (the UI names it when the run ends, however it ends)."""
        # Checkpoints are written at the last step reported (on_step records it before anything can raise).
        self.checkpoint = (os.path.basename(os.path.dirname(path)), self.step)

    def on_class_images(self, done: int, total: int) -> None:
        """Move a progress bar while class images are generated (and let Cancel stop it there)."""
        if self.class_bar is None:
            self.class_bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        self.class_bar.update_absolute(done, total)

    @contextlib.contextmanager
    def reporting_failures(self):
        """Tell the UI how a run that raises ended (cancelled or failed, with its last checkpoint), then re-raise."""
        try:
            yield
        except BaseException as error:
            cancelled = isinstance(error, comfy.model_management.InterruptProcessingException)
            run, step = self.checkpoint or (None, 0)
            _send(
                DONE_EVENT,
                {
                    "node": self.node_id,
                    "state": "cancelled" if cancelled else "failed",
                    "steps": step,
                    "file": run,
                    "message": "" if cancelled else f"{type(error).__name__}: {error}",
                },
            )
            raise

    def done(self, result) -> None:
        """Tell the UI the run ended: its state ("finished", "cancelled", "already finished") and run folder."""
        run = self.checkpoint[0] if self.checkpoint else None
        _send(
            DONE_EVENT, {"node": self.node_id, "state": result.stopped_reason, "steps": result.steps_done, "file": run}
        )
