"""The benchmark harness: the machine (matmul peak, the CPU's name), the FLOPs of a forward, a child process's wall
time and peak memory, and synthetic dialogues of a chosen length.

Shared by the inference benchmark (``erc_llm.bench.inference``), the training benchmark
(``erc_llm.bench.training``) and the result scripts in ``eval/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from erc_llm.backbone import native_bf16_cpu
from erc_llm.data.schema import Dialogue, Utterance
from erc_llm.io import atomic_write_json, atomic_write_text, mark_output


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


def matmul_peaks() -> dict:
    """The machine's measured fp32 and bf16 matmul peaks (GFLOP/s), as every benchmark record reports them. A CPU
    without native bf16 emulates it at about 1% of its fp32 rate: a smaller product (512) measures that rate in
    seconds instead of minutes. Both products run on the CPU, so the CPU's bf16 decides, not a GPU's."""
    native = native_bf16_cpu() is not None
    return {"matmul_fp32_gflops": matmul_peak(torch.float32),
            "matmul_bf16_gflops": matmul_peak(torch.bfloat16, n=2048 if native else 512, reps=8 if native else 2),
            "bf16_native": native}


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
    """The CPU, its cores, the vector kernels torch runs on it (AVX2, AVX512, ...) and its native bf16, if any."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"

    bf16 = {"amx_bf16": "AMX", "avx512_bf16": "avx512_bf16"}.get(native_bf16_cpu(), "no native bf16")
    return f"{cpu}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()} kernels, {bf16}"


def synthetic(dialogues: list[Dialogue], length: int) -> Dialogue:
    """A dialogue of ``length`` real utterances, taken in order across consecutive dialogues."""
    utts = [u for d in dialogues for u in d.utterances][:length]
    return Dialogue(f"len{length}", [Utterance(u.speaker, u.text, u.emotion, f"len{length}_{i}") for i, u in enumerate(utts)])


def run_child(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; its wall seconds and peak RSS in kB (``VmHWM``, polled)."""

    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a child's progress output never blocks it
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        hwm = 0
        while child.poll() is None:
            hwm = max(hwm, vm_hwm_kb(child.pid))
            time.sleep(0.2)
        if child.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({child.returncode}): {err.read()[-2000:]}")
    return time.perf_counter() - t, hwm


def evaluate_in_child(flags: list[str], out: Path) -> tuple[dict, float, float, list[str]]:
    """``erc-llm evaluate FLAGS --out OUT`` in a child process: its ``metrics.json``, wall seconds, peak RSS in GB
    (the child's own ``VmHWM``) and the command that ran."""
    cmd = [sys.executable, "-m", "erc_llm.cli", "evaluate", *flags, "--out", str(out)]
    wall, hwm = run_child(cmd)
    return json.loads((out / "metrics.json").read_text()), wall, hwm / 1024**2, cmd


def write_results(out: Path, result: dict, title: str, note: str, table: str) -> int:
    """A benchmark's record in ``out``: ``results.json`` (``result``, holding its ``command``) and ``table.md``
    (``title``, the command, ``note`` — the machine and how it ran — and the table), marked as benchmark output;
    the table is printed too."""
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "table.md", f"# {title}\n\nCommand: `{result['command']}`  \n{note}\n\n{table}")
    mark_output(out, "results")
    print(table)
    return 0
