"""The machine a benchmark runs on: matmul peak, the FLOPs of a forward, a process's peak memory, the CPU's name.

Shared by the decoding benchmark (``erc_llm.bench``), the training benchmark (``erc_llm.throughput``) and the
result scripts in ``eval/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def matmul_peak(dtype=torch.float32, n: int = 2048, reps: int = 8) -> float:
    """GFLOP/s of a large square ``torch.matmul`` (best of ``reps``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def forward_flops(model, tokens: int) -> float:
    """FLOPs of one prefill of ``tokens`` tokens through the body (linear layers + attention; no LM head)."""
    cfg = model.config
    linear = sum(m.in_features * m.out_features for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    attn_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    window = getattr(cfg, "sliding_window", None) or tokens
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    ctx = sum(tokens * tokens / 2 if k == "full_attention" else tokens * min(window, tokens) - min(window, tokens) ** 2 / 2
              for k in kinds)
    return 2 * linear * tokens + 4 * attn_dim * ctx


def vm_hwm_kb(pid: int) -> int:
    """Peak resident memory (``VmHWM``, kB) of process ``pid``; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    from erc_llm.backbone import native_bf16_cpu

    bf16 = {"amx_bf16": "AMX", "avx512_bf16": "avx512_bf16"}.get(native_bf16_cpu(), "no native bf16")
    return f"{cpu}, {os.cpu_count()} cores, {bf16}"
