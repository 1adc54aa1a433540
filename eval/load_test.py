"""Bounded load test of `erc-llm serve` on loopback: concurrent clients, each replaying MELD test dialogues
turn by turn over HTTP. Reports requests/s and p50/p95 latency of turn requests.

    python eval/load_test.py --data-dir ../shared/data/meld --run runs/meld_gemma_seed0 --dialogues 24 --clients 8

Starts the server in a child process on a free port, waits for /health, runs the clients, stops the
server, and writes eval/results/http_load/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc_llm.data import load_split  # noqa: E402
from erc_llm.io import atomic_write_json, atomic_write_text  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(base: str, dialogue) -> list[float]:
    import httpx

    lat = []
    with httpx.Client(base_url=base, timeout=120) as c:
        key = c.post("/dialogues", json={"participants": []}).json()["id"]
        for u in dialogue.utterances:
            t = time.perf_counter()
            r = c.post(f"/dialogues/{key}/turns", json={"speaker": u.speaker, "text": u.text})
            lat.append(time.perf_counter() - t)
            r.raise_for_status()
        c.delete(f"/dialogues/{key}")
    return lat


def main() -> int:
    import httpx

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--run", default="")
    p.add_argument("--dialogues", type=int, default=24)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "http_load"))
    args = p.parse_args()
    dialogues = load_split("meld", "test", args.data_dir)[0][: args.dialogues]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # every simulated client comes from 127.0.0.1: lift the per-client quotas that would otherwise throttle them
    cmd = [sys.executable, "-m", "erc_llm.cli", "serve", "--port", str(port), "--max-dialogues-per-client", "100000",
           "--turns-per-minute", "10000000"] + (["--run", args.run] if args.run else [])
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise SystemExit("server did not come up")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            lat = [x for xs in pool.map(lambda d: client(base, d), dialogues) for x in xs]
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    lat = np.array(lat)
    res = {"command": "python eval/load_test.py " + " ".join(sys.argv[1:]), "run": args.run or None,
           "dialogues": len(dialogues), "clients": args.clients, "turn_requests": int(lat.size), "wall_seconds": wall,
           "requests_per_second": lat.size / wall, "p50_ms": 1000 * float(np.percentile(lat, 50)),
           "p95_ms": 1000 * float(np.percentile(lat, 95)), "max_ms": 1000 * float(lat.max()),
           "machine": f"{os.cpu_count()}-core CPU, loopback"}
    atomic_write_json(Path(args.out) / "results.json", res)
    table = ("| clients | dialogues | turn requests | requests/s | p50 ms | p95 ms | max ms |\n|---|---|---|---|---|---|---|\n"
             f"| {args.clients} | {len(dialogues)} | {lat.size} | {res['requests_per_second']:.2f} | {res['p50_ms']:.0f} | "
             f"{res['p95_ms']:.0f} | {res['max_ms']:.0f} |\n")
    atomic_write_text(Path(args.out) / "table.md", f"# HTTP load test (loopback)\n\nCommand: `{res['command']}`\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
