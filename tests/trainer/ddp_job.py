"""One process of a data-parallel test job, launched by ``torchrun`` from ``test_distributed.py`` (not a test).

``python -m torch.distributed.run --standalone --nproc-per-node N ddp_job.py SPEC.json`` trains the runs listed in
the spec one after the other on the conftest's tiny diffusers parts (gloo, CPU), and writes per rank
``<out>/<name>.rank<r>.safetensors`` (the LoRA tensors) and ``.json`` (losses, what it wrote, what it encoded).
A run with ``fail_rank``/``fail_step`` raises on that rank after that step, ending the job.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lora_workbench.trainer import checkpoint, inject, loop, objective, tiny_models, validation
from lora_workbench.trainer.config import TrainConfig
from lora_workbench.trainer.dataset import DatasetOptions, load_image_folder
from lora_workbench.trainer.diffusers_backend import DiffusersModelApi


def _conftest():
    # The tiny parts are built exactly as the test session's fixture builds them (same words, merges, seeds).
    spec = importlib.util.spec_from_file_location("trainer_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RankFailure(RuntimeError):
    """The failure a test asks one rank to raise."""


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    conftest = _conftest()
    parts = tiny_models.tiny_parts(tiny_models.tiny_tokenizer(conftest.WORDS, conftest.MERGES), vae_scaling_factor=4.0)
    for m in (parts[0], parts[1], parts[3]):
        m.eval()
    api = DiffusersModelApi(*parts)
    dataset = load_image_folder(spec["folder"], DatasetOptions(trigger="sks", class_noun="toy", resolution=16))
    log = {"writes": [], "generated": 0, "encoded": 0}

    def counting(fn, key):
        def wrapped(*args, **kwargs):
            log[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    def recording(fn):
        def wrapped(path, *args, **kwargs):
            log["writes"].append(str(path))
            return fn(path, *args, **kwargs)

        return wrapped

    api.generate = counting(api.generate, "generated")
    api.encode_images = counting(api.encode_images, "encoded")
    loop.ckpt.save_checkpoint = recording(checkpoint.save_checkpoint)
    objective.atomic_write_bytes = recording(objective.atomic_write_bytes)
    out = Path(spec["out"])
    for run in spec["runs"]:
        log.update(writes=[], generated=0, encoded=0)
        if run.get("copy_from"):
            if rank == 0:  # a copy of an earlier run's checkpoint folder, to resume it here
                shutil.copytree(run["copy_from"], run["checkpoint_dir"])
            dist.barrier()

        def on_step(step, total, loss, run=run):
            if run.get("fail_rank") == rank and step == run.get("fail_step"):
                raise RankFailure(f"rank {rank} failed on purpose after step {step}")

        stop_at = run.get("stop_at")
        callbacks = loop.TrainCallbacks(on_step=on_step, should_stop=lambda: False)
        if stop_at:
            steps_seen = []
            callbacks.on_step = lambda s, n, loss, f=on_step: (steps_seen.append(s), f(s, n, loss))
            callbacks.should_stop = lambda: bool(steps_seen) and steps_seen[-1] >= stop_at
        result = loop.train(
            api,
            dataset,
            TrainConfig(**run["config"]),
            callbacks,
            checkpoint_dir=run.get("checkpoint_dir", ""),
            cache_dir=run.get("cache_dir"),
            keep_layers=True,
            validation=validation.ValidationConfig(**run["validation"]) if run.get("validation") else None,
        )
        tensors = {k: v.detach().clone().contiguous() for k, v in inject.named_lora_tensors(api.unet).items()}
        inject.remove_adapter(api.unet)
        inject.remove_adapter(api.text_encoder)
        save_file(tensors, out / f"{run['name']}.rank{rank}.safetensors")
        summary = {
            "losses": result.losses,
            "steps_done": result.steps_done,
            "resumed_from": result.resumed_from,
            "validation": result.validation,
        }
        (out / f"{run['name']}.rank{rank}.json").write_text(json.dumps({**summary, **log}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
