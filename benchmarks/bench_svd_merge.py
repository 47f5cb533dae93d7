"""Benchmark: factor-based SVD merge (lora.merge) versus the full-matrix SVD that kohya's svd_merge_lora.py does.

Eight rank-32 LoRAs over every attention projection of an SD1.5-shaped UNet (to_q/to_k/to_v/to_out.0 of attn1
and attn2 in each transformer block of down_blocks 0-2, mid_block and up_blocks 1-3; widths 320/640/1280;
cross-attention to_k/to_v read the 768-wide text embedding), random factors from a fixed seed, merged to rank 32.
The full-matrix path forms each weighted delta (out x in), runs ``torch.linalg.svd`` and truncates, as
https://github.com/kohya-ss/sd-scripts/blob/main/networks/svd_merge_lora.py does (with ``full_matrices=False``
here, which only helps it). Both run in this process, on the CPU unless ``--device`` says otherwise.

    python benchmarks/bench_svd_merge.py [--loras 8] [--rank 32] [--target-rank 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from lora_workbench.lora import merge
from lora_workbench.lora.state import LoraModule, LoraState


def sd15_attention_modules() -> list[tuple[str, int, int]]:
    """Return ``(kohya name, out, in)`` for every attention projection of SD1.5's UNet (128 modules)."""
    blocks = []
    for i, width in enumerate((320, 640, 1280)):
        blocks += [(f"down_blocks_{i}_attentions_{j}", width) for j in range(2)]
    blocks.append(("mid_block_attentions_0", 1280))
    for i, width in zip((1, 2, 3), (1280, 640, 320)):
        blocks += [(f"up_blocks_{i}_attentions_{j}", width) for j in range(3)]
    out = []
    for block, d in blocks:
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out_0"):
                inp = 768 if attn == "attn2" and proj in ("to_k", "to_v") else d
                out.append((f"lora_unet_{block}_transformer_blocks_0_{attn}_{proj}", d, inp))
    return out


def random_loras(n: int, rank: int, seed: int, device: str) -> list[LoraState]:
    """Return ``n`` random LoRAs (alpha = rank / 2, as common trainers default) over the SD1.5 attention set."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for i in range(n):
        mods = {}
        for name, d_out, d_in in sd15_attention_modules():
            down = torch.randn(rank, d_in, generator=g) / math.sqrt(d_in)
            up = torch.randn(d_out, rank, generator=g) * 0.01
            mods[name] = LoraModule(down=down.to(device), up=up.to(device), alpha=rank / 2)
        states.append(LoraState(modules=mods, source=f"lora_{i}"))
    return states


def full_matrix_svd_merge(states: list[LoraState], weights: list[float], rank: int) -> tuple[dict, float]:
    """Return (modules as (up, down), overall relative error) by the full-matrix method, error measured directly."""
    out = {}
    err_sq = tot_sq = 0.0
    for name in states[0].modules:
        target = sum(w * s.modules[name].delta() for s, w in zip(states, weights))
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        up, down = u[:, :rank] * s[:rank], vh[:rank]
        err_sq += float(torch.linalg.matrix_norm(target - up @ down)) ** 2
        tot_sq += float(torch.linalg.matrix_norm(target)) ** 2
        out[name] = (up, down)
    return out, math.sqrt(err_sq / tot_sq)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    """Run both merges, print their times, the speed ratio and both relative errors."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loras", type=int, default=8)
    p.add_argument("--rank", type=int, default=32, help="rank of each input LoRA")
    p.add_argument("--target-rank", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="best of N timings for each method")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    states = random_loras(args.loras, args.rank, args.seed, args.device)
    weights = [1.0 / args.loras * (1 + 0.1 * i) for i in range(args.loras)]
    n_mod = len(states[0].modules)

    # Warm-up on one module so one-time library initialisation is not charged to either method.
    one = [LoraState({k: v for k, v in list(s.modules.items())[:1]}) for s in states]
    merge.merge(one, weights, "svd", rank=args.target_rank)
    full_matrix_svd_merge(one, weights, args.target_rank)

    t_ours = t_full = float("inf")
    for _ in range(args.repeat):
        _sync(args.device)
        t0 = time.perf_counter()
        res = merge.merge(states, weights, "svd", rank=args.target_rank)
        _sync(args.device)
        t_ours = min(t_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, full_err = full_matrix_svd_merge(states, weights, args.target_rank)
        _sync(args.device)
        t_full = min(t_full, time.perf_counter() - t0)

    # Our error measured independently too (full matrices), to show the reported number is the real one.
    err_sq = tot_sq = 0.0
    for name, m in res.state.modules.items():
        target = sum(w * s.modules[name].delta() for s, w in zip(states, weights))
        err_sq += float(torch.linalg.matrix_norm(target - m.delta())) ** 2
        tot_sq += float(torch.linalg.matrix_norm(target)) ** 2
    measured = math.sqrt(err_sq / tot_sq)

    print(f"{args.loras} LoRAs x rank {args.rank} -> rank {args.target_rank}, {n_mod} SD1.5 attention modules, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'method':<28}{'time (s)':>10}{'rel. error':>14}")
    print(f"{'factor SVD (lora.merge)':<28}{t_ours:>10.3f}{res.report.overall_error:>14.6f}  (reported)")
    print(f"{'':<28}{'':>10}{measured:>14.6f}  (measured from full matrices)")
    print(f"{'full-matrix SVD (kohya)':<28}{t_full:>10.3f}{full_err:>14.6f}")
    print(f"speed-up: {t_full / t_ours:.1f}x")


if __name__ == "__main__":
    main()
