"""Honest training metrics: FLOPs by a stated rule, the measured matmul roofline, peak memory, the loss curve.

FLOPs counting rule (LoRA-aware, per real — non-pad — token):
    4 · N_base + 6 · N_lora
N_base counts the weights of every linear layer of the frozen model, LM head included (SmolLM2-135M: 134.5M).
The forward costs 2·N_base; the backward needs activation gradients (2·N_base) but no gradients for frozen
weights; LoRA weights are trained, so they cost 6 per parameter. Attention scores and softmax are not counted.
This is a *model* FLOPs rule: work a plain implementation needs, whether or not ours skips some of it (we run the
LM head only at supervised positions), so MFU = rule FLOP/s ÷ measured fp32 matmul FLOP/s of this device.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

RULE = "4·N_base + 6·N_lora FLOPs per real token (N_base: all linear weights incl. LM head; attention not counted)"


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(N_base: linear weights of the frozen model, N_lora: trainable parameters)."""
    base = sum(
        m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return base, lora


def flops_per_token(n_base: int, n_lora: int) -> int:
    return 4 * n_base + 6 * n_lora


def matmul_flops(device: torch.device | str = "cpu", size: int = 1024, seconds: float = 0.5) -> float:
    """Measured FLOP/s of a square fp32 matmul on `device` (the roofline MFU is quoted against): the best of
    several short windows, so that a moment of load from other processes does not lower the roofline (which
    would overstate MFU)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    cuda = torch.device(device).type == "cuda"
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        n, start = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - start < seconds / 8:
            a @ b
            n += 1
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start))
    return best


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def set_mmap_threshold(threshold: int) -> bool:
    """glibc's `mallopt(M_MMAP_THRESHOLD, threshold)`: blocks of `threshold` bytes or more are mapped on their own
    and unmapped when freed. It also turns off glibc's adaptive threshold, which rises to the largest block freed
    (up to 32 MiB) and then serves activation-sized buffers from a heap that stays resident after they are freed.
    The same as `MALLOC_MMAP_THRESHOLD_` in the environment, but settable once the process runs. False (and nothing
    changed) off glibc."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak window: CUDA's allocator peak, or on Linux the process's RSS high-water mark (VmHWM,
    reset by writing 5 to /proc/self/clear_refs). Elsewhere the CPU peak stays the process's lifetime peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def current_memory_bytes(device: torch.device) -> int:
    """Memory in use now: CUDA allocated bytes, or the process's RSS."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_memory_bytes(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last `reset_peak_memory`: CUDA max allocated, or RSS high-water mark (VmHWM; ru_maxrss
    where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def plot_losses(steps: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss", linewidth=1.2)
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    starts = sorted({s["step"] for s in steps if s.get("stage_step") == 1} - {1})
    for x in starts:
        ax.axvline(x - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per supervised token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
