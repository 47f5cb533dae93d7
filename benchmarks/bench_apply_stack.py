"""Apply LoRA Stack versus a chain of core LoraLoader nodes, side by side in one process.

On the tiny SD1.5-shaped model: time to patch (the node call itself, files cached after the first
call as both do) and time to sample 8 steps at 64x64 (alternating ours and core, so each sampling call loads its
model and computes the patched weights),
for 1, 4 and 8 stacked LoRAs of rank 8 and 32. Prints seconds and the ratio ours / core.

    .venv/bin/python benchmarks/bench_apply_stack.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from lora_workbench.headless import comfy_env, examples
    from lora_workbench.headless.example_loras import write_example_lora

    base = comfy_env.import_comfy_core(Path(tempfile.mkdtemp(prefix="bench_apply_")))
    examples.prepare_assets(base)
    runtime = comfy_env.import_comfyui(base)
    import comfy.sample
    import comfy.sd
    import torch

    nodes = runtime.nodes
    ckpt = nodes.CheckpointLoaderSimple().load_checkpoint("lora_workbench_tiny_sd15.safetensors")
    model, clip = ckpt[0], ckpt[1]
    apply_cls = runtime.node_classes["LoraWorkbenchApplyStack"]
    cond = [[clip.encode_from_tokens(clip.tokenize("a photo")), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)

    def sample(m):
        return comfy.sample.sample(m, noise, 8, 5.0, "euler", "normal", cond, cond, latent, seed=0, disable_pbar=True)

    print(
        f"{'LoRAs':>5} {'rank':>4} | {'patch ours':>10} {'patch core':>10} {'ratio':>6} | "
        f"{'sample ours':>11} {'sample core':>11} {'ratio':>6}"
    )
    for rank in (8, 32):
        names = []
        for i in range(8):
            path = write_example_lora(base / "models" / "loras" / f"bench_{rank}_{i}.safetensors", seed=i, rank=rank)
            names.append(path.name)
        for count in (1, 4, 8):
            stack = [(n, 0.7, 0.7) for n in names[:count]]
            loaders = [nodes.LoraLoader() for _ in range(count)]  # one per node, as in a graph

            def ours():
                return apply_cls.execute(model, clip, lora_stack=stack).result[0]

            def core():
                m, c = model, clip
                for loader, (name, sm, sc) in zip(loaders, stack):
                    m, c = loader.load_lora(m, c, name, sm, sc)
                return m

            ours(), core()  # warm the file caches of both
            patch_ours, patch_core = _best(ours, args.repeats), _best(core, args.repeats)
            m_ours, m_core = ours(), core()
            # Alternate, so every call loads its model and computes the patched weights anew.
            t_ours, t_core = [], []
            for _ in range(args.repeats):
                t_ours.append(_best(lambda: sample(m_ours), 1))
                t_core.append(_best(lambda: sample(m_core), 1))
            s_ours, s_core = statistics.median(t_ours), statistics.median(t_core)
            print(
                f"{count:>5} {rank:>4} | {patch_ours:>10.4f} {patch_core:>10.4f} {patch_ours / patch_core:>6.2f} | "
                f"{s_ours:>11.3f} {s_core:>11.3f} {s_ours / s_core:>6.2f}"
            )


if __name__ == "__main__":
    main()
