"""Execute a workflow through ComfyUI's own ``PromptExecutor``, headless, in this process."""

from __future__ import annotations

import copy
import logging
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

from .comfy_compat import EXECUTOR_CACHE_ARGS, cached_output
from .comfy_env import ComfyRuntime, run_sync
from .progress_hook import install_progress_hook

log = logging.getLogger(__name__)


class HeadlessServer:
    """The few attributes ``PromptExecutor`` reads from ComfyUI's server, with progress to stderr."""

    def __init__(self, stream=None, echo: bool = True):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        # Read by newer ComfyUI (comfy_compat): no websocket clients here, so none with feature flags.
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []
        self.stream = stream or sys.stderr
        self.echo = echo

    def send_sync(self, event, data, sid=None):
        """Record an event; print node starts and progress (ComfyUI's web UI would show them)."""
        self.messages.append((event, data))
        if not self.echo or not isinstance(data, dict):
            return
        if event == "executing" and data.get("node") is not None:
            print(f"[executing] node {data['node']}", file=self.stream)
        elif event == "progress":
            print(f"[progress] node {data.get('node')}: {data.get('value')}/{data.get('max')}", file=self.stream)

    def queue_updated(self):
        """Called by newer ComfyUI's prompt queue (comfy_compat); headless runs have no queue to show."""


class WorkflowError(RuntimeError):
    """A workflow failed validation or a node raised; the message is ComfyUI's, with node id and class."""


@dataclass
class RunResult:
    """The outcome of one executed prompt."""

    prompt_id: str
    ui_outputs: dict = field(default_factory=dict)
    executor: Any = None
    server: HeadlessServer | None = None

    def output(self, node_id: str | int, index: int = 0):
        """Return output ``index`` of ``node_id`` from the executor's cache (its first list item).

        Raises:
            KeyError: the node did not run or its outputs were not kept.
        """
        entry = cached_output(self.executor.caches, str(node_id))
        if entry is None:
            raise KeyError(f"node {node_id} has no cached outputs")
        outputs = entry.outputs if hasattr(entry, "outputs") else entry
        return outputs[index][0]


_executor = None


def _get_executor(server: HeadlessServer):
    global _executor
    import execution

    if _executor is None:
        _executor = execution.PromptExecutor(server, cache_args=dict(EXECUTOR_CACHE_ARGS))
    _executor.server = server
    return _executor


def validation_message(error: dict, node_errors: dict, prompt: dict) -> str:
    """Return ComfyUI's validation errors as one readable message with node ids and classes."""
    lines = [f"{error.get('message', 'invalid prompt')}: {error.get('details', '')}".rstrip(": ")]
    for node_id, info in (node_errors or {}).items():
        class_type = info.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
        for err in info.get("errors", []):
            lines.append(f"  node {node_id} ({class_type}): {err.get('message')}: {err.get('details', '')}")
    return "\n".join(lines)


def run_prompt(
    runtime: ComfyRuntime,
    prompt: dict,
    *,
    echo: bool = True,
    fresh_cache: bool = False,
    extra_data: dict | None = None,
    strict: bool = True,
) -> RunResult:
    """Validate and execute an API-format prompt; return its outputs.

    Args:
        runtime: the imported ComfyUI.
        prompt: API format, ``{node_id: {"class_type": ..., "inputs": {...}}}``.
        echo: print progress to stderr.
        fresh_cache: drop cached node outputs of earlier runs first.
        extra_data: passed to the executor (e.g. ``client_id``; without one the executor sends no
            ``executing`` events, so ``echo`` prints only what other events carry).
        strict: fail when any output is invalid (the default, for headless runs); ComfyUI itself
            (like its server) runs the valid outputs and only logs the invalid ones.

    Raises:
        WorkflowError: validation failed or a node raised; the message names node id, class
            and ComfyUI's exception message.
    """
    import execution

    # A copy, as the server parses fresh JSON per request: the executor writes its "is_changed" results into the
    # prompt's node dicts, and a reused dict would keep the first run's fingerprints.
    prompt = {str(k): copy.deepcopy(v) for k, v in prompt.items()}
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = run_sync(execution.validate_prompt(prompt_id, prompt, None))
    if not valid or (strict and node_errors):
        raise WorkflowError(validation_message(error or {"message": "invalid outputs"}, node_errors, prompt))
    server = HeadlessServer(echo=echo)
    install_progress_hook(server)
    executor = _get_executor(server)
    if fresh_cache:
        executor.reset()
    extra_data = dict(extra_data or {})
    if echo:
        # Without a client id the executor sends no "executing" events to report.
        extra_data.setdefault("client_id", "lora-workbench-headless")
    # execute_async, not execute: execute calls asyncio.run, which fails inside a running event loop.
    run_sync(executor.execute_async(prompt, prompt_id, extra_data, outputs))
    if not executor.success:
        raise WorkflowError(_execution_error_message(executor.status_messages))
    return RunResult(prompt_id, executor.history_result.get("outputs", {}), executor, server)


def _execution_error_message(messages) -> str:
    for event, data in messages:
        if event == "execution_error":
            return (
                f"node {data['node_id']} ({data['node_type']}) failed: "
                f"{data['exception_type']}: {data['exception_message'].strip()}"
            )
        if event == "execution_interrupted":
            return f"interrupted at node {data['node_id']} ({data['node_type']})"
    return "execution failed (no error message from ComfyUI)"
