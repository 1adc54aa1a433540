"""Screenshots of the `erc-llm serve` page labelling a real conversation, for docs/serving.md.

    python eval/page_screenshot.py --data-dir ../shared/data/meld --dialogue 16 --out eval/results/page

Starts the service on loopback with a model (default: the shipped one), uploads the chosen MELD test dialogue
as a ``Speaker: text`` transcript in headless Chromium, and saves the page at 1,000 and 360 px wide.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from erc_llm.data import load_split
from erc_llm.io import claim_output, mark_output


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="MELD folder")
    ap.add_argument("--dialogue", type=int, default=1, help="index of the test dialogue to upload")
    ap.add_argument("--run", default="", help="run folder or shipped model (default: the shipped model)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import uvicorn
    from playwright.sync_api import sync_playwright

    from erc_llm.server import create_app
    from erc_llm.session import Engine

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    d = load_split("meld", "test", args.data_dir)[0][args.dialogue]
    work = Path(tempfile.mkdtemp())
    transcript = work / f"meld_test_{d.id}.txt"
    transcript.write_text("\n".join(f"{u.speaker}: {u.text}" for u in d.utterances) + "\n", encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Engine.load(args.run or None)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        out = claim_output(args.out, "screenshots", inputs=[args.data_dir])
        out.mkdir(parents=True, exist_ok=True)  # a plain folder: results are committed
        mark_output(out, "screenshots")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
            for width, name in ((1000, "page.png"), (360, "page_360px.png")):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#legend li")
                page.set_input_files("#file", str(transcript))
                page.wait_for_selector(f".turn:nth-child({len(d.utterances)})", timeout=300_000)
                page.focus('#timeline .mark[data-index="2"]')
                page.screenshot(path=str(out / f".{name}.tmp.png"), full_page=True)
                os.replace(out / f".{name}.tmp.png", out / name)
            browser.close()
    finally:
        server.should_exit = True
    print(f"{args.out}: page.png, page_360px.png ({len(d.utterances)} turns of MELD test dialogue {d.id})")


if __name__ == "__main__":
    main()
