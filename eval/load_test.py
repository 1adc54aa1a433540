"""Load test of `erc-llm serve` on loopback: for each server setting, concurrent clients replay MELD test dialogues
turn by turn over HTTP for a fixed time; reports turn requests/s, p50/p95/p99 latency per turn and failures.

    python eval/load_test.py --data-dir ../shared/data/meld --clients 1,10,50 --max-batch 1,64 --think-ms 0,2460

``--max-batch 1`` is the serialised server (one turn per forward), larger values let concurrent dialogues share
forwards (``erc_llm.session.Batcher``). Each setting starts its own server in a child process on a free port,
waits for /health, runs every client count (client *i* starts at dialogue *i* and moves on to the next one when a
dialogue ends), and stops the server. Writes eval/results/http_load/{results.json,table.md}. "model busy" is the
share of the row's time the model spent scoring turns (the server's ``forward_seconds``): near 100%, the forward
itself bounds the throughput.
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

from erc_llm.bench.harness import machine, write_results
from erc_llm.data import load_split
from erc_llm.io import claim_output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(base: str, dialogues, start: int, until: float, participants: str = "given",
           think: float = 0.0) -> tuple[list[float], list[str]]:
    """Turn latencies (seconds) and failures of one client replaying dialogues from ``start`` until ``until``;
    ``participants``: "given" opens each dialogue with its speakers (as batch evaluation reads them), "joining"
    with none (each speaker joins with their first turn); ``think``: the mean pause between a reply and the next
    turn, drawn from an exponential distribution (clients do not march in step: requests arrive as a Poisson
    stream per client), also before the first turn."""
    import httpx

    lat, failed, k = [], [], start
    rng = np.random.default_rng(start)
    with httpx.Client(base_url=base, timeout=300) as c:
        while time.perf_counter() < until:
            d = dialogues[k % len(dialogues)]
            k += 1
            who = list(dict.fromkeys(u.speaker for u in d.utterances)) if participants == "given" else []
            try:
                key = c.post("/dialogues", json={"participants": who}).raise_for_status().json()["id"]
                for u in d.utterances:
                    if think:
                        time.sleep(rng.exponential(think))
                    if time.perf_counter() >= until:
                        break
                    t = time.perf_counter()
                    r = c.post(f"/dialogues/{key}/turns", json={"speaker": u.speaker, "text": u.text})
                    if r.status_code != 200:
                        failed.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    lat.append(time.perf_counter() - t)
                c.delete(f"/dialogues/{key}")
            except httpx.HTTPError as e:
                failed.append(f"{type(e).__name__}: {e}")
    return lat, failed


def measure(base: str, dialogues, clients: int, seconds: float, participants: str = "given",
            think: float = 0.0) -> dict:
    until = time.perf_counter() + seconds
    t0, cpu0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(lambda i: client(base, dialogues, i, until, participants, think), range(clients)))
    wall = time.perf_counter() - t0
    client_cores = (time.process_time() - cpu0) / wall  # the load generator's own share of the shared cores
    lat = np.array([x for xs, _ in parts for x in xs])
    failed = [f for _, fs in parts for f in fs]
    ms = {f"p{q}_ms": 1000 * float(np.percentile(lat, q)) for q in (50, 95, 99)} if lat.size else {}
    return {"clients": clients, "turn_requests": int(lat.size), "failed": len(failed), "failures": failed[:5],
            "wall_seconds": wall, "requests_per_second": lat.size / wall, "client_cpu_cores": client_cores, **ms}


def server(args, port: int, max_batch: int) -> subprocess.Popen:
    import httpx

    # every simulated client comes from 127.0.0.1: lift the per-client quotas that would otherwise throttle them
    cmd = [sys.executable, "-m", "erc_llm.cli", "serve", "--port", str(port), "--max-dialogues-per-client", "100000",
           "--turns-per-minute", "10000000", "--max-batch", str(max_batch), "--batch-window-ms", str(args.window_ms),
           "--dtype", args.dtype] + (["--run", args.run] if args.run else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("server did not come up within 5 minutes")


def table(res: dict) -> str:
    lines = ["| server | think ms | clients | turn requests | failed | requests/s | p50 ms | p95 ms | p99 ms "
             "| model busy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        name = "serialised (--max-batch 1)" if r["max_batch"] == 1 else f"batched (--max-batch {r['max_batch']})"
        lines.append(f"| {name} | {r.get('think_ms', 0):.0f} | {r['clients']} | {r['turn_requests']} | {r['failed']} "
                     f"| {r['requests_per_second']:.2f} "
                     f"| {r.get('p50_ms', 0):.0f} | {r.get('p95_ms', 0):.0f} | {r.get('p99_ms', 0):.0f} "
                     f"| {100 * r['model_busy']:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    import httpx

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="MELD csv folder")
    p.add_argument("--run", default="", help="run folder or shipped name (default: the shipped model)")
    p.add_argument("--dialogues", type=int, default=200, help="MELD test dialogues the clients replay")
    p.add_argument("--clients", default="1,10,50", help="comma-separated client counts")
    p.add_argument("--max-batch", default="1,64", help="comma-separated server settings (1 = serialised)")
    p.add_argument("--window-ms", type=float, default=2.0, help="the server's --batch-window-ms")
    p.add_argument("--dtype", default="auto", help="the server's --dtype")
    p.add_argument("--seconds", type=float, default=30.0, help="how long each client count runs")
    p.add_argument("--participants", default="given", choices=["given", "joining"],
                   help="given: each dialogue opens with its speakers, as batch evaluation reads them (served labels "
                        "equal batch evaluation's); joining: opens with none, and each new speaker makes the server "
                        "re-read the transcript under the new participant list")
    p.add_argument("--think-ms", default="0",
                   help="comma-separated mean pauses of each client between a reply and its next turn, exponentially "
                        "distributed (0 = closed loop: the server saturated; MELD test turns last 2.46 s at the "
                        "median, 3.31 s on average)")
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "http_load"))
    args = p.parse_args()
    out = claim_output(args.out, "results", inputs=[args.data_dir])
    dialogues = load_split("meld", "test", args.data_dir)[0][: args.dialogues]
    rows, health = [], {}
    for mb in [int(x) for x in args.max_batch.split(",")]:
        port = free_port()
        proc = server(args, port, mb)
        try:
            base = f"http://127.0.0.1:{port}"
            measure(base, dialogues, 1, 3.0)  # warm-up: first forwards allocate and tune kernels
            for think in [float(x) for x in args.think_ms.split(",")]:
                for n in [int(x) for x in args.clients.split(",")]:
                    busy = httpx.get(base + "/health", timeout=10).json()["forward_seconds"]
                    row = measure(base, dialogues, n, args.seconds, args.participants, think / 1000)
                    busy = httpx.get(base + "/health", timeout=10).json()["forward_seconds"] - busy
                    rows.append({"max_batch": mb, "think_ms": think, **row, "model_busy": busy / row["wall_seconds"]})
                    print(table({"rows": rows[-1:]}).splitlines()[-1], flush=True)
            health[str(mb)] = httpx.get(base + "/health", timeout=10).json().get("batching")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    res = {"command": "python eval/load_test.py " + " ".join(sys.argv[1:]), "run": args.run or None,
           "dtype": args.dtype, "seconds": args.seconds, "participants": args.participants,
           "dialogues": len(dialogues), "rows": rows, "batching": health,
           "machine": f"{machine()}; server and clients on the same cores, loopback"}
    return write_results(out, res, "HTTP load test (loopback)",
                         f"Machine: {res['machine']}; each row runs {args.seconds:.0f} s; participants "
                         f"{args.participants}; think = a client's pause between a reply and its next turn.",
                         table(res))


if __name__ == "__main__":
    sys.exit(main())
