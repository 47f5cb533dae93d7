"""Command line: run a workflow headless through ComfyUI's own executor, on the CPU.

``lora-workbench run WORKFLOW.json [--output DIR] [--base DIR] [--set NODE_ID.INPUT=VALUE ...]``
imports ComfyUI (with this pack) as a library, converts a frontend-format workflow to an API
prompt if needed, executes it, copies what its output nodes wrote into ``--output`` and prints
each copied path on stdout; progress and errors go to stderr.
``lora-workbench tiny-model`` builds (once) and prints the tiny SD1.5-shaped checkpoint.

Exit codes: 0 success; 1 the workflow failed (validation, a node raised, an unknown node type);
2 usage errors (missing or unreadable file, a bad ``--set``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from .comfy_env import CACHE_DIR

EXIT_OK = 0
EXIT_WORKFLOW_FAILED = 1
EXIT_USAGE = 2


class _NoTracebacks(logging.Filter):
    """Drop the tracebacks ComfyUI's executor logs for a failing node; its message is reported instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Traceback (most recent call last)")


@contextlib.contextmanager
def _logging_to_stderr(verbose: bool):
    """Route log records to stderr for one command, then put the caller's logging setup back."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not verbose:
        handler.addFilter(_NoTracebacks())
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def parse_set(assignment: str) -> tuple[str, str, Any]:
    """Parse ``NODE_ID.INPUT=VALUE``; the value is read as JSON when it parses (numbers, true, lists), else text.

    Returns:
        ``(node_id, input_name, value)``.

    Raises:
        ValueError: the assignment is not of that form.
    """
    target, sep, raw = assignment.partition("=")
    node_id, dot, name = target.rpartition(".")
    if not sep or not dot or not node_id or not name:
        raise ValueError(f"--set {assignment!r}: expected NODE_ID.INPUT=VALUE, e.g. 3.seed=42")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node_id, name, value


def apply_sets(prompt: dict, assignments: list[str]) -> dict:
    """Set inputs of an API prompt from ``NODE_ID.INPUT=VALUE`` assignments (in place); return the prompt.

    A list value is wrapped as ``{"__value__": [...]}`` so the executor does not read it as a link.

    Raises:
        ValueError: an assignment is malformed or names a node the prompt does not have.
    """
    for assignment in assignments:
        node_id, name, value = parse_set(assignment)
        if node_id not in prompt:
            known = ", ".join(sorted(prompt, key=lambda k: (len(k), k)))
            raise ValueError(f"--set {assignment!r}: the workflow has no node {node_id} (its nodes: {known})")
        prompt[node_id].setdefault("inputs", {})[name] = {"__value__": value} if isinstance(value, list) else value
    return prompt


def collect_outputs(ui_outputs: dict, output_root: Path, dest: Path) -> list[Path]:
    """Copy the files the output nodes reported into ``dest``, keeping their subfolders.

    Args:
        ui_outputs: ``RunResult.ui_outputs``: ``{node_id: {"images": [{filename, subfolder, type}], ...}}``.
        output_root: ComfyUI's output directory.
        dest: where to copy them.

    Returns:
        The copied paths, in the order the nodes reported them. Items of type ``temp`` (previews)
        are not copied.

    Raises:
        FileNotFoundError: a reported output file does not exist.
        ValueError: a reported subfolder or filename points outside ComfyUI's output folder or ``dest``.
    """
    written = []
    for node_output in ui_outputs.values():
        for items in node_output.values():
            for item in items if isinstance(items, list) else ():
                if not (isinstance(item, dict) and item.get("type") == "output" and item.get("filename")):
                    continue
                relative = Path(item.get("subfolder") or "") / item["filename"]
                # A node reports subfolder and filename as it likes: never read outside ComfyUI's output folder
                # nor write outside dest ("../../x", an absolute path).
                src, target = _inside(output_root, relative), _inside(dest, relative)
                if not src.is_file():
                    raise FileNotFoundError(f"an output node reported {src}, which does not exist")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
                written.append(target)
    return written


def _inside(root: Path, relative: Path) -> Path:
    """Return ``root / relative`` resolved, if it stays inside ``root``.

    Raises:
        ValueError: naming the path, when it does not (``..`` parts, an absolute path, a symlink out).
    """
    base = Path(root).resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"an output node reported '{relative}', which is outside '{root}'; not copied")
    return path


def _ensure_checkpoint(base: Path) -> Path:
    from .tiny_model import ensure_tiny_model

    model = ensure_tiny_model()
    link = base / "models" / "checkpoints" / model.name
    if not link.exists():
        if link.is_symlink():
            link.unlink()  # A dangling link to an older cache.
        os.symlink(model, link)
    return link


def _run(args: argparse.Namespace) -> int:
    workflow_path = Path(args.workflow)
    if not workflow_path.is_file():
        print(f"lora-workbench: workflow file not found: {workflow_path}", file=sys.stderr)
        return EXIT_USAGE
    try:
        json.loads(workflow_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"lora-workbench: cannot read {workflow_path} as JSON: {e}", file=sys.stderr)
        return EXIT_USAGE
    for assignment in args.set:
        try:
            parse_set(assignment)
        except ValueError as e:
            print(f"lora-workbench: {e}", file=sys.stderr)
            return EXIT_USAGE

    from . import comfy_env, runner, ui_format

    # ComfyUI and packs print to stdout here and there; stdout is kept for the written paths.
    with contextlib.redirect_stdout(sys.stderr):
        print(f"importing ComfyUI from {comfy_env.comfyui_path()}", file=sys.stderr)
        try:
            base = comfy_env.import_comfy_core(args.base)
            _ensure_checkpoint(base)
            runtime = comfy_env.import_comfyui(base)
        except (FileNotFoundError, RuntimeError) as e:
            print(f"lora-workbench: {e}", file=sys.stderr)
            return EXIT_WORKFLOW_FAILED
        try:
            prompt = ui_format.load_workflow(workflow_path, runtime.node_classes)
        except ui_format.WorkflowFormatError as e:
            print(f"lora-workbench: {workflow_path}: {e}", file=sys.stderr)
            return EXIT_WORKFLOW_FAILED
        try:
            apply_sets(prompt, args.set)
        except ValueError as e:
            print(f"lora-workbench: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"running {workflow_path} ({len(prompt)} nodes)", file=sys.stderr)
        try:
            # A client id makes the executor send its "executing" events, which echo prints; strict:
            # a workflow with an invalid output fails instead of running only its valid outputs.
            extra_data = {"client_id": "lora-workbench-cli"}
            result = runner.run_prompt(runtime, prompt, echo=not args.quiet, extra_data=extra_data, strict=True)
        except runner.WorkflowError as e:
            print(f"lora-workbench: {workflow_path} failed: {e}", file=sys.stderr)
            return EXIT_WORKFLOW_FAILED
        output_root = Path(runtime.folder_paths.get_output_directory())
        written = collect_outputs(result.ui_outputs, output_root, Path(args.output))
    for path in written:
        print(path)
    if not written:
        print("lora-workbench: the workflow ran but its output nodes wrote no files", file=sys.stderr)
    return EXIT_OK


def _tiny_model(args: argparse.Namespace) -> int:
    from . import comfy_env
    from .tiny_model import ensure_tiny_model

    with contextlib.redirect_stdout(sys.stderr):
        comfy_env.import_comfy_core(args.base)  # The model is built from ComfyUI's own module classes.
        path = ensure_tiny_model()
    print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``lora-workbench`` command."""
    parser = argparse.ArgumentParser(prog="lora-workbench", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log ComfyUI's info messages and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a workflow (API or frontend format) headless")
    run.add_argument("workflow", help="workflow JSON, as saved by the ComfyUI frontend or exported as API")
    run.add_argument(
        "--output", type=Path, default=Path("output"), help="where to copy the results (default ./output)"
    )
    run.add_argument(
        "--base", type=Path, default=CACHE_DIR / "comfy_home", help="ComfyUI base directory (models, input, output)"
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE_ID.INPUT=VALUE",
        help="override an input after conversion, e.g. 3.seed=42 (value read as JSON if it parses); repeatable",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no per-node progress on stderr")
    run.set_defaults(handler=_run)
    tiny = sub.add_parser("tiny-model", help="build the tiny SD1.5-shaped checkpoint (once) and print its path")
    tiny.add_argument("--base", type=Path, default=CACHE_DIR / "comfy_home", help="ComfyUI base directory")
    tiny.set_defaults(handler=_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``lora-workbench`` command line.

    Returns:
        The exit code: 0 success, 1 the workflow failed, 2 usage error (argparse's own errors too).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on errors and 0 on --help.
        return int(e.code or 0)
    with _logging_to_stderr(args.verbose):
        return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
