"""What the training benchmarks share: the machine header, mean and spread, step clocks and peak memory.

Imported by the ``bench_train*.py`` scripts (run as scripts, so this folder is first on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Sequence

MB = 1024 * 1024


def cpu_model() -> str:
    """Return the CPU's model name and whether it has native bf16 (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flagset = set(flags.group(1).split()) if flags else set()
    bf16 = "native bf16" if flagset & {"avx512_bf16", "amx_bf16"} else "no native bf16"
    return f"{name.group(1).strip() if name else 'unknown CPU'} ({bf16})"


def machine_lines() -> list[str]:
    """Return lines describing this machine: cores, torch threads, CPU, GPU, load average, versions."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"machine: {cores} usable cores of {os.cpu_count()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {cpu_model()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    try:
        load = open("/proc/loadavg").read().split()[:3]
        lines.append(f"load average at start: {' '.join(load)} (other users of this machine share its cores)")
    except OSError:
        pass
    return lines


def header(title: str, compared: str, reference: str, extra: Sequence[str] = ()) -> None:
    """Print a benchmark's header: what is compared, against which reference, on which machine."""
    print("=" * 100)
    print(title)
    print(f"compares:  {compared}")
    print(f"reference: {reference}")
    for line in (*machine_lines(), *extra):
        print(line)
    print("=" * 100, flush=True)


def settings_table(rows: Sequence[tuple[str, str, str]], left: str, right: str) -> None:
    """Print ``(setting, left side, right side)`` rows; rows whose sides differ are marked with '*'."""
    width = max(len(r[0]) for r in rows)
    lw = max(len(left), *(len(r[1]) for r in rows))
    print(f"  {'setting':<{width}}   {left:<{lw}}   {right}")
    for name, a, b in rows:
        mark = " " if a == b else "*"
        print(f"{mark} {name:<{width}}   {a:<{lw}}   {b}")
    print("  (* = differs between the sides)", flush=True)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Return (mean, min, max) of ``values``."""
    return statistics.fmean(values), min(values), max(values)


def fmt_spread(values: Sequence[float], digits: int = 3) -> str:
    """Return ``mean (min-max)`` with ``digits`` decimals."""
    mean, lo, hi = spread(values)
    return f"{mean:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def ratio_spread(ours: Sequence[float], theirs: Sequence[float]) -> str:
    """Return the ratio of the means, with the range of the per-repeat ratios (repeats paired by index)."""
    pairs = [a / b for a, b in zip(ours, theirs) if b]
    if not pairs:
        return "n/a"
    return f"{statistics.fmean(ours) / statistics.fmean(theirs):.2f} ({min(pairs):.2f}-{max(pairs):.2f})"


class StepClock:
    """Time stamps after every optimizer step of any optimizer (torch's global step hook), and what it trains.

    Both sides of a comparison are timed the same way: seconds per step is the time between the end of the
    first (warm-up) step and the end of the last one, divided by the steps in between, so set-up, data
    encoding and the first step's one-time costs are left out. ``trainable`` is the number of elements the
    optimizer updates (every parameter in its groups), counted at its first step.
    """

    def __init__(self, on_step=None):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.stamps: list[float] = []
        self.trainable = 0
        self.on_step = on_step
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, _args, _kwargs) -> None:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            self.trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        if self.on_step is not None:
            self.on_step()

    def reset(self) -> None:
        self.stamps.clear()
        self.trainable = 0

    def seconds_per_step(self, warmup: int = 1) -> float:
        """Return the mean seconds of the steps after the first ``warmup`` ones.

        Raises:
            RuntimeError: fewer than ``warmup + 1`` steps were taken.
        """
        if len(self.stamps) <= warmup:
            raise RuntimeError(f"{len(self.stamps)} optimizer steps taken; need more than {warmup}")
        timed = self.stamps[warmup - 1 :] if warmup else self.stamps
        return (timed[-1] - timed[0]) / (len(timed) - 1)

    def close(self) -> None:
        self._handle.remove()


def release_freed_memory() -> None:
    """Collect garbage and give freed heap memory back to the OS (glibc ``malloc_trim``), so a later peak
    starts from what is really in use."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Current and peak resident memory of this process (and of the GPU, where CUDA is used) since ``reset``.

    RSS: Linux resets the peak (``VmHWM``) to the current RSS when "5" is written to ``/proc/self/clear_refs``;
    where that is refused, a thread samples ``/proc/self/statm`` every millisecond instead (it can miss a peak
    shorter than that). GPU: ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated`` (what
    PyTorch's allocator handed out, not what it reserved).
    """

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.method = "VmHWM after clear_refs"
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._sampled = 0
        self._stop = threading.Event()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "sampled /proc/self/statm every 1 ms"
            threading.Thread(target=self._sample, daemon=True).start()

    def _rss_bytes(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, self._rss_bytes())
            time.sleep(0.001)

    def rss(self) -> int:
        """Return the resident set size now, in bytes."""
        return self._rss_bytes()

    def reset(self) -> None:
        """Start a new peak from the memory in use now."""
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._sampled = self._rss_bytes()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_rss(self) -> int:
        """Return the highest RSS since ``reset``, in bytes."""
        if self.method.startswith("VmHWM"):
            return _status_kb("VmHWM") * 1024
        return max(self._sampled, self._rss_bytes())

    def gpu_now(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.cuda else 0

    def gpu_peak(self) -> int:
        import torch

        if not self.cuda:
            return 0
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


def core_layers(diffusion_model, rank: int) -> tuple[list[str], list[str]]:
    """Return (the layers core gives a LoRA that ours can too, those ours cannot: size below ``rank``).

    Core wraps every module with a ComfyUI ``weight_function`` whose weight has two or more dimensions.
    """
    import torch

    ours, skipped = [], []
    for name, m in diffusion_model.named_modules():
        w = getattr(m, "weight", None)
        if not hasattr(m, "weight_function") or w is None or w.dim() < 2:
            continue
        fits = isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and rank <= min(w.shape[0], w[0].numel())
        (ours if fits else skipped).append(name)
    return ours, skipped
