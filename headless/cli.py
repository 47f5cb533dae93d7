"""Command line: run a workflow headless through ComfyUI's own executor, on the CPU.

``lora-workbench run WORKFLOW.json [--output DIR] [--base DIR] [--set NODE_ID.INPUT=VALUE ...]``
imports ComfyUI (with this pack) as a library, converts a frontend-format workflow to an API
prompt if needed, executes it, copies what its output nodes wrote into ``--output`` and prints
each copied path on stdout; progress and errors go to stderr.
``lora-workbench train WORKFLOW.json [--output DIR] [--steps N] [--node ID]`` runs only the workflow's Train LoRA
node, its ancestors (model loaders, dataset, settings as the graph gives them) and the output nodes that save its
results (Save LoRA, Save Image of the loss curve); sampling and the rest are left out. It prints the files written
and the checkpoint folder; a LoRA or loss curve that no node of the graph saves is written to ``--output``. Under
``torchrun --nproc-per-node N`` it trains data-parallel on ``torch.distributed`` (see ``trainer.loop``): rank 0
writes, the other ranks only train.
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


TRAIN_NODE = "LoraWorkbenchTrain"


def _upstream(inputs: dict) -> list[str]:
    """Return the ids of the nodes an API node's inputs link to (``[node_id, output_index]`` values)."""
    return [str(v[0]) for v in inputs.values() if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)]


def ancestors(prompt: dict, node_id: str) -> set[str]:
    """Return the ids of every node ``node_id`` depends on in an API prompt (not itself)."""
    seen: set[str] = set()
    todo = _upstream(prompt[node_id].get("inputs", {}))
    while todo:
        current = todo.pop()
        if current in seen or current not in prompt:
            continue
        seen.add(current)
        todo += _upstream(prompt[current].get("inputs", {}))
    return seen


def train_job(prompt: dict, node_classes: dict, node_id: str | None = None, writers: bool = True) -> tuple[str, dict]:
    """Return the Train node's id and the prompt cut down to its job.

    Kept: the Train node, its ancestors and (with ``writers``) every output node that depends on the Train node and
    on nothing outside that set (a Save LoRA of its adapter, a Save Image of its loss curve). Left out: sampling
    with the trained model and any other branch.

    Raises:
        ValueError: the prompt has no Train node, or several and ``node_id`` does not name one of them.
    """
    trains = sorted((k for k, v in prompt.items() if v.get("class_type") == TRAIN_NODE), key=lambda k: (len(k), k))
    if node_id is not None:
        if str(node_id) not in trains:
            raise ValueError(f"--node {node_id}: not a Train LoRA node of this workflow (those: {', '.join(trains)})")
        trains = [str(node_id)]
    if not trains:
        raise ValueError(f"the workflow has no Train LoRA node ({TRAIN_NODE})")
    if len(trains) > 1:
        raise ValueError(
            f"the workflow has {len(trains)} Train LoRA nodes ({', '.join(trains)}): choose one with --node"
        )
    train = trains[0]
    keep = ancestors(prompt, train) | {train}
    if writers:
        for k, node in prompt.items():
            is_output = getattr(node_classes.get(node.get("class_type")), "OUTPUT_NODE", False)
            if k not in keep and is_output:
                needs = ancestors(prompt, k)
                if train in needs and needs <= keep:
                    keep.add(k)
    return train, {k: v for k, v in prompt.items() if k in keep}


def _consumed(prompt: dict, node_id: str, index: int) -> bool:
    """Return whether any node of ``prompt`` takes output ``index`` of ``node_id``."""
    link = [node_id, index]
    return any(v == link for n in prompt.values() for v in n.get("inputs", {}).values() if isinstance(v, list))


def _distributed(device: str) -> tuple[int, int]:
    """Join the ``torchrun`` job this process belongs to, if any; return ``(rank, world_size)``.

    ``torchrun`` (and ``accelerate launch``) set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; the process group uses NCCL on GPUs (each process on GPU ``LOCAL_RANK``) and gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before ComfyUI picks its device
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), world


def _train(args: argparse.Namespace) -> int:
    workflow_path = Path(args.workflow)
    if not workflow_path.is_file():
        print(f"lora-workbench: workflow file not found: {workflow_path}", file=sys.stderr)
        return EXIT_USAGE
    if args.steps is not None and args.steps < 1:
        print(f"lora-workbench: --steps {args.steps}: must be 1 or more", file=sys.stderr)
        return EXIT_USAGE
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world = _distributed(device)
    code = _train_rank(args, workflow_path, device, rank, world)
    if world > 1 and code == EXIT_OK:
        # A failing rank leaves without it: torchrun then stops the others, which may wait in a collective.
        import torch.distributed as dist

        dist.destroy_process_group()
    return code


def _train_rank(args: argparse.Namespace, workflow_path: Path, device: str, rank: int, world: int) -> int:
    from . import comfy_env, runner, ui_format

    who = f"lora-workbench (rank {rank} of {world})" if world > 1 else "lora-workbench"
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if world > 1 and rank > 0:
                import torch.distributed as dist

                dist.barrier()  # rank 0 prepares the shared base directory first
            base = comfy_env.import_comfy_core(args.base, cpu=device == "cpu")
            if rank == 0:
                _ensure_checkpoint(base)
            if world > 1 and rank == 0:
                import torch.distributed as dist

                dist.barrier()
            runtime = comfy_env.import_comfyui(base, cpu=device == "cpu")
            prompt = ui_format.load_workflow(workflow_path, runtime.node_classes)
            train, job = train_job(prompt, runtime.node_classes, args.node, writers=rank == 0)
        except (FileNotFoundError, RuntimeError, ValueError, ui_format.WorkflowFormatError) as e:
            print(f"{who}: {workflow_path}: {e}", file=sys.stderr)
            return EXIT_WORKFLOW_FAILED
        if args.steps is not None:
            job[train]["inputs"]["steps"] = args.steps
        run_name = job[train]["inputs"].get("run_name")
        run_name = run_name if isinstance(run_name, str) and run_name else "lora"
        if rank == 0:
            left = len(prompt) - len(job)
            print(f"training node {train} of {workflow_path} ({len(job)} nodes; {left} left out)", file=sys.stderr)
        try:
            extra_data = {"client_id": "lora-workbench-cli"}
            echo = not args.quiet and rank == 0
            result = runner.run_prompt(runtime, job, echo=echo, extra_data=extra_data, strict=True)
        except runner.WorkflowError as e:
            print(f"{who}: {workflow_path} failed: {e}", file=sys.stderr)
            return EXIT_WORKFLOW_FAILED
        if rank > 0:
            return EXIT_OK
        for text in result.ui_outputs.get(train, {}).get("text", []):
            print(text, file=sys.stderr)
        output_root = Path(runtime.folder_paths.get_output_directory())
        dest = Path(args.output)
        written = collect_outputs(result.ui_outputs, output_root, dest)
        # Save LoRA reports the file it wrote (in models/loras) as text: printed where it is, not copied.
        for node_id, shown in result.ui_outputs.items():
            texts = shown.get("text", []) if node_id != train else []
            written += [Path(t) for t in texts if isinstance(t, str) and "\n" not in t and Path(t).is_file()]
        written += _save_unsaved(job, train, result, dest, run_name)
        checkpoints = output_root / "lora_workbench" / "checkpoints" / run_name
    for path in written:
        print(path)
    if checkpoints.is_dir():
        print(checkpoints)
    return EXIT_OK


def _save_unsaved(job: dict, train: str, result, dest: Path, run_name: str) -> list[Path]:
    """Write the Train node's adapter and loss curve to ``dest`` where no node of the graph saves them."""
    written = []
    if not _consumed(job, train, 2):
        from ..lora.safeio import write_safetensors

        adapter = result.output(train, 2)
        path = _inside(dest, Path(f"{run_name}.safetensors"))
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(write_safetensors(path, dict(adapter), getattr(adapter, "metadata", None), overwrite=True))
    if not _consumed(job, train, 3):
        import numpy as np
        from PIL import Image

        curve = result.output(train, 3)  # (1, H, W, 3) in [0, 1]
        path = _inside(dest, Path(f"{run_name}_loss.png"))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((curve[0].cpu().numpy() * 255).round().astype(np.uint8)).save(path)
        written.append(path)
    return written


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
    train = sub.add_parser(
        "train",
        help="run the workflow's Train LoRA node headless (data-parallel under torchrun --nproc-per-node N)",
    )
    train.add_argument("workflow", help="workflow JSON with one Train LoRA node (frontend or API format)")
    train.add_argument(
        "--output",
        type=Path,
        default=Path("output"),
        help="where to copy what the graph's save nodes wrote, and to write a LoRA or loss curve no node saves",
    )
    train.add_argument(
        "--base", type=Path, default=CACHE_DIR / "comfy_home", help="ComfyUI base directory (models, input, output)"
    )
    train.add_argument("--steps", type=int, help="train this many steps instead of the node's setting")
    train.add_argument("--node", help="the Train LoRA node's id, when the workflow has several")
    train.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where ComfyUI runs the model: auto is cuda when a GPU is visible (default), else cpu",
    )
    train.add_argument("-q", "--quiet", action="store_true", help="no per-node progress on stderr")
    train.set_defaults(handler=_train)
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
