"""Training progress to ComfyUI: its progress bar, our frontend's live loss curve, and Cancel."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import comfy.model_management
import comfy.utils

from ..trainer import checkpoint as ckpt

PROGRESS_EVENT = "lora_workbench.train_progress"
DONE_EVENT = "lora_workbench.train_done"
VALIDATION_EVENT = "lora_workbench.train_validation"
# At most this many losses travel in one event (the view keeps 4000 points; longer runs are thinned).
MAX_LOSSES = 2000


def _send(event: str, data: dict) -> None:
    # Headless runs have no PromptServer instance; the progress bar still works there.
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, getattr(server, "client_id", None))


def _thinned(losses) -> list[list[float]]:
    """Return ``[[step, loss], ...]`` for steps 1.. (every k-th step when there are more than MAX_LOSSES)."""
    losses = [float(x) for x in losses or []]
    stride = max(1, -(-len(losses) // MAX_LOSSES))
    picked = list(range(stride - 1, len(losses), stride))
    if losses and picked[-1] != len(losses) - 1:
        picked.append(len(losses) - 1)
    return [[i + 1, losses[i]] for i in picked]


class TrainingProgress:
    """Callbacks for ``trainer.loop``: progress bar per step, loss events, Cancel checks.

    Events (``node`` is the Train node's id in each): ``train_progress`` per step with step, total, loss,
    elapsed, eta and ``resumed_from`` (0 for a fresh run; the first event of a resumed run also carries the
    checkpoint's ``history`` of ``[step, loss]``); ``train_done`` once with ``state`` (finished, cancelled,
    already finished, failed), ``steps``, ``resumed_from``, ``message`` (failed), the losses, and the last
    checkpoint as ``file`` (its tensor file, relative to the checkpoints folder) and ``path`` (absolute), and the
    run's ``validation`` losses as ``[step, loss]``; ``train_validation`` per evaluation (Training Previews
    connected) with step, ``loss`` (the validation loss) and ``images``: ``{filename, subfolder, type, label}`` of
    the preview images in ComfyUI's temp folder (served by ``/view``).
    """

    def __init__(self, node_id: str | None, total_steps: int, run_dir=None, run_name: str | None = None):
        self.node_id = node_id
        self.total = total_steps
        self.run_dir = Path(run_dir) if run_dir else None
        self.run_name = run_name
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.started = time.monotonic()
        self.first_step: tuple[int, float] | None = None
        self.resumed_from = 0
        self.checkpoint: tuple[Path, int] | None = None  # (checkpoint.json, step) of the last checkpoint
        self.class_bar = None
        self.step = 0
        self.last_loss: float | None = None

    def on_step(self, step: int, total: int, loss: float) -> None:
        """Move ComfyUI's progress bar and send step, loss, elapsed and remaining seconds to the UI."""
        self.step = step
        self.last_loss = loss
        self.bar.update_absolute(step, total)
        now = time.monotonic()
        elapsed = now - self.started
        data = {"node": self.node_id, "step": step, "total": total, "loss": loss, "elapsed": elapsed}
        # The rate is measured from the first reported step on: set-up before it (copying the model,
        # encoding the images, class images) would otherwise inflate the estimate.
        if self.first_step is None:
            self.first_step = (step, now)
            # The loop reports every step from the one after its start: a first step above 1 is a resume.
            self.resumed_from = step - 1
            if self.resumed_from and self.checkpoint is None and self.run_dir is not None:
                self.checkpoint = (self.run_dir / ckpt.INDEX, self.resumed_from)  # the one it resumed from
            if self.resumed_from and self.checkpoint is not None:
                data["history"] = _thinned(self._checkpoint_losses()[: self.resumed_from])
        first, first_time = self.first_step
        rate = (now - first_time) / (step - first) if step > first else elapsed / max(step - self.resumed_from, 1)
        data["eta"] = rate * (total - step)
        data["resumed_from"] = self.resumed_from
        _send(PROGRESS_EVENT, data)

    def on_validation(self, step: int, loss: float, images: list[dict] | None = None) -> None:
        """Send a validation loss (and the preview images sampled with it) to the UI."""
        _send(VALIDATION_EVENT, {"node": self.node_id, "step": step, "loss": loss, "images": images or []})

    def should_stop(self) -> bool:
        """Raise ComfyUI's interrupt exception when the user pressed Cancel (the loop saves first)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        return False

    def on_checkpoint(self, path) -> None:
        """Remember the last checkpoint written (the UI names it when the run ends, however it ends)."""
        # Checkpoints are written at the last step reported (on_step records it before anything can raise).
        self.checkpoint = (Path(path), self.step)

    def _checkpoint_losses(self) -> list[float]:
        try:
            return list(ckpt.read_index(self.checkpoint[0].parent).get("losses") or [])
        except (ValueError, OSError, TypeError):
            return []

    def _checkpoint_fields(self) -> dict:
        """The last checkpoint as the UI names it: tensor file relative to the checkpoints folder, absolute path."""
        if self.checkpoint is None:
            return {"file": None, "path": None, "run": self.run_name}
        folder = self.checkpoint[0].parent
        try:
            tensors = ckpt.read_index(folder)["tensors"]
        except ValueError:
            tensors = self.checkpoint[0].name
        run = self.run_name or folder.name
        return {"file": f"{run}/{tensors}", "path": str(folder / tensors), "run": run}

    def on_class_images(self, done: int, total: int) -> None:
        """Move a progress bar while class images are generated (and let Cancel stop it there)."""
        if self.class_bar is None:
            self.class_bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        self.class_bar.update_absolute(done, total)

    def _done(
        self,
        state: str,
        steps: int,
        losses=None,
        message: str = "",
        resumed_from: int | None = None,
        validation=None,
    ) -> None:
        _send(
            DONE_EVENT,
            {
                "node": self.node_id,
                "state": state,
                "steps": steps,
                "total": self.total,
                "resumed_from": self.resumed_from if resumed_from is None else resumed_from,
                "elapsed": time.monotonic() - self.started,
                "message": message,
                "losses": _thinned(losses) if losses is not None else None,
                "validation": [[int(s), float(v)] for s, v in validation or []],
                **self._checkpoint_fields(),
            },
        )

    @contextlib.contextmanager
    def reporting_failures(self):
        """Tell the UI how a run that raises ended (cancelled or failed, with its last checkpoint), then re-raise."""
        try:
            yield
        except BaseException as error:
            cancelled = isinstance(error, comfy.model_management.InterruptProcessingException)
            # The steps completed (the loop checkpoints the last of them before the error propagates).
            self._done(
                "cancelled" if cancelled else "failed",
                self.step,
                message="" if cancelled else f"{type(error).__name__}: {error}",
            )
            raise

    def done(self, result) -> None:
        """Tell the UI the run ended: its state ("finished", "cancelled", "already finished"), losses, checkpoint."""
        if result.checkpoint_path and (self.checkpoint is None or Path(result.checkpoint_path) != self.checkpoint[0]):
            self.checkpoint = (Path(result.checkpoint_path), result.steps_done)
        self._done(
            result.stopped_reason,
            result.steps_done,
            result.losses,
            resumed_from=result.resumed_from,
            validation=getattr(result, "validation", None),
        )
