"""HTTP service: happy path, bad requests, limits, concurrency, and the web page in headless Chromium."""

import contextlib
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from erc_llm.server import Limits, create_app, uvicorn_config
from erc_llm.session import Engine, ERCSession
from tests.conftest import LABELS, toy_dialogue


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(None, model=str(tiny_model_dir), labels=LABELS, zero_shot=True)


@pytest.fixture
def client(engine):
    return TestClient(create_app(engine, Limits(max_text_chars=200, max_turns=5, max_dialogues=60,
                                                max_dialogues_per_client=60, turns_per_minute=10_000,
                                                max_body_bytes=2000)), raise_server_exceptions=False)


def test_happy_path(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/labels").json()["labels"] == list(LABELS.labels)
    assert set(client.get("/labels").json()["colours"]) == set(LABELS.labels)
    key = client.post("/dialogues", json={"participants": ["Ross", "Rachel"]}).json()["id"]
    r = client.post(f"/dialogues/{key}/turns", json={"speaker": "Ross", "text": "I can't believe you did that!"})
    assert r.status_code == 200
    body = r.json()
    assert body["label"] in LABELS.labels and set(body["probabilities"]) == set(LABELS.labels)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    busy = client.get("/health").json()["forward_seconds"]
    client.post(f"/dialogues/{key}/turns", json={"speaker": "Monica", "text": "Why?"})
    assert client.get("/health").json()["forward_seconds"] > busy > 0  # how long the model has spent scoring
    t = client.get(f"/dialogues/{key}").json()
    assert [x["speaker"] for x in t["turns"]] == ["Ross", "Monica"] and t["participants"] == ["Ross", "Rachel", "Monica"]
    assert client.get(f"/dialogues/{key}/speakers/0").json()["turns"] == 1  # Ross: the first participant
    assert client.get(f"/dialogues/{key}/speakers/7").status_code == 404
    assert "/dialogues/{key}/turns" in client.get("/openapi.json").json()["paths"]
    assert client.delete(f"/dialogues/{key}").status_code == 204
    assert client.get(f"/dialogues/{key}").status_code == 404


def test_bad_requests_get_4xx_json(client):
    key = client.post("/dialogues", json={}).json()["id"]
    url = f"/dialogues/{key}/turns"
    cases = {
        "malformed json": client.post(url, content=b'{"speaker": "Ross", "text": ', headers={"Content-Type": "application/json"}),
        "non-utf8": client.post(url, content=b'{"speaker": "Ross", "text": "\xff\xfe caf\xe9"}',
                                headers={"Content-Type": "application/json"}),
        "missing field": client.post(url, json={"speaker": "Ross"}),
        "empty text": client.post(url, json={"speaker": "Ross", "text": ""}),
        "blank text": client.post(url, json={"speaker": "Ross", "text": "   "}),
        "oversized text": client.post(url, json={"speaker": "Ross", "text": "x" * 201}),
        "oversized body": client.post(url, json={"speaker": "Ross", "text": "y" * 1990}),
        "unknown dialogue": client.post("/dialogues/nope/turns", json={"speaker": "A", "text": "hi"}),
    }
    expected = {"malformed json": 422, "non-utf8": 400, "missing field": 422, "empty text": 422, "blank text": 422,
                "oversized text": 413, "oversized body": 413, "unknown dialogue": 404}
    for name, r in cases.items():
        assert r.status_code == expected[name], (name, r.status_code, r.text)
        assert "error" in r.json() and "Traceback" not in r.text, name
    assert "problems" in cases["missing field"].json()
    for i in range(5):
        client.post(url, json={"speaker": "Ross", "text": f"turn {i}"})
    assert client.post(url, json={"speaker": "Ross", "text": "one more"}).status_code == 409


def test_dialogue_limit_and_idle_expiry(engine):
    c = TestClient(create_app(engine, Limits(max_dialogues=2, idle_seconds=3600)))
    c.post("/dialogues", json={})
    c.post("/dialogues", json={})
    r = c.post("/dialogues", json={})
    assert r.status_code == 429 and "limit 2" in r.json()["error"]
    c.app.state.dialogues.limits.idle_seconds = 0.0  # everything open is now idle: expired on the next create
    assert c.post("/dialogues", json={}).status_code == 201
    assert len(c.app.state.dialogues.items) == 1


def test_50_concurrent_dialogues_match_sequential_runs(client, engine):
    """Interleaved turns of 50 dialogues from 16 threads give exactly the labels of sequential sessions."""
    dialogues = [toy_dialogue(3 + i % 3, f"d{i}") for i in range(50)]
    for i, d in enumerate(dialogues):  # make the dialogues differ
        d.utterances[0].text = f"Message number {i}: " + d.utterances[0].text
    expected = []
    for d in dialogues:
        s = ERCSession(engine)
        expected.append([s.add_turn(u.speaker, u.text).probs for u in d.utterances])
    keys = [client.post("/dialogues", json={}).json()["id"] for _ in dialogues]
    jobs = [(k, i, j) for j in range(5) for i, k in enumerate(keys) if j < len(dialogues[i].utterances)]
    results: dict = {}

    def post(job):
        k, i, j = job
        u = dialogues[i].utterances[j]
        r = client.post(f"/dialogues/{k}/turns", json={"speaker": u.speaker, "text": u.text})
        assert r.status_code == 200, r.text
        results[(i, j)] = r.json()

    # turns of one dialogue must arrive in order: submit round by round, dialogues interleaved within a round
    with ThreadPoolExecutor(16) as pool:
        for j in range(5):
            list(pool.map(post, [job for job in jobs if job[2] == j]))
    for i, d in enumerate(dialogues):
        got = [results[(i, j)]["probabilities"] for j in range(len(d.utterances))]
        for g, e in zip(got, expected[i]):
            assert g == pytest.approx(e, abs=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def served(app):
    """The address of ``app`` served by uvicorn (the service's own settings) on a free loopback port."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def browser_on(app):
    """(headless Chromium, the page's address) with ``app`` served on a free loopback port."""
    from playwright.sync_api import sync_playwright

    with served(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser, url
        browser.close()


@pytest.mark.parametrize("length", ["abc", "-5", "1, 2"])
def test_a_request_malformed_at_the_http_level_gets_a_json_400(engine, length):
    """An invalid Content-Length never reaches the app; the answer is still the service's JSON error."""
    from urllib.parse import urlparse

    with served(create_app(engine)) as url:
        port = urlparse(url).port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(f"POST /dialogues HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {length}\r\n\r\n{{}}".encode())
            reply = b""
            while chunk := c.recv(4096):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    assert "Content-Length" in json.loads(body)["error"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`apt-get install chromium`; .ci/run installs it)")
def test_web_page_in_headless_chromium(engine, tmp_path):
    with browser_on(create_app(engine)) as (browser, url):
        page = browser.new_page(accept_downloads=True)
        page.goto(url)
        page.wait_for_selector("#legend li")
        assert "Model:" in page.inner_text("#model") and page.locator("#legend li").count() == len(LABELS.labels)
        for n, (speaker, text) in enumerate((("Ross", "I can't believe you did that!"), ("Rachel", "Oh, that's great.")), 1):
            page.fill("#speaker", speaker)
            page.fill("#text", text)
            page.click("#send")
            page.wait_for_selector(f".turn:nth-child({n})", timeout=30_000)  # labelled before the next turn
        turns = page.locator(".turn")
        assert turns.count() == 2
        assert all(turns.nth(i).get_attribute("data-label") in LABELS.labels for i in range(2))
        assert "Rachel: Oh, that's great." in turns.nth(1).inner_text()
        assert page.input_value("#text") == ""
        page.fill("#speaker", "Ross")
        page.evaluate("document.getElementById('text').removeAttribute('maxlength')")
        page.fill("#text", "z" * 2500)  # over the server's limit: the page shows the 4xx error
        page.click("#send")
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=10_000)
        assert "limit" in page.inner_text("#error")
        page.screenshot(path=str(tmp_path / "page.png"))
    assert Path(tmp_path / "page.png").stat().st_size > 1000


def test_import_labels_a_transcript_and_export_gives_every_probability(engine):
    app = TestClient(create_app(engine), raise_server_exceptions=False)
    text = "Ross: I can't believe you did that!\nRachel: Oh, that's great.\n\nMonica: Why?\n"
    r = app.post("/dialogues/import", json={"filename": "talk.txt", "content": text})
    assert r.status_code == 201, r.text
    d = r.json()
    assert [t["speaker"] for t in d["turns"]] == ["Ross", "Rachel", "Monica"] and d["participants"] == ["Ross", "Rachel", "Monica"]
    rows = app.get(f"/dialogues/{d['id']}/export?format=jsonl").text.splitlines()
    assert json.loads(rows[0])["utterances"][1]["probabilities"] == d["turns"][1]["probabilities"]
    csv_text = app.get(f"/dialogues/{d['id']}/export?format=csv").text.splitlines()
    assert csv_text[0].split(",")[-len(LABELS.labels):] == [f"p_{lab}" for lab in LABELS.labels] and len(csv_text) == 4
    assert app.get(f"/dialogues/{d['id']}/export?format=xml").status_code == 422


@pytest.mark.parametrize("name, content, expected", [
    ("talk.txt", "Ross: hi\nthis line has no speaker\n", "talk.txt, line 2"),
    ("d.csv", "Speaker,Text\nRoss,hi\n", "missing column(s) ['Utterance']"),
    ("d.csv", "Speaker,Utterance\nRoss,hi\n,hello\n", "d.csv, line 3, field Speaker: empty"),
    ("d.jsonl", '{"dialogue_id": "a", "utterances": [{"speaker": "Ross", "text": ""}]}', "utterances[0]"),
    ("empty.txt", "  \n", "the file is empty"),
])
def test_bad_uploads_name_the_line_and_field_and_the_session_survives(engine, name, content, expected):
    app = TestClient(create_app(engine), raise_server_exceptions=False)
    r = app.post("/dialogues/import", json={"filename": name, "content": content})
    assert r.status_code == 422 and expected in r.json()["error"]
    assert app.post("/dialogues/import", json={"filename": "ok.txt", "content": "Ross: hi"}).status_code == 201


def test_an_upload_over_the_body_limit_is_a_413_json_error(engine):
    app = TestClient(create_app(engine), raise_server_exceptions=False)
    r = app.post("/dialogues/import", json={"filename": "big.txt", "content": "Ross: hi\n" * 600_000})
    assert r.status_code == 413 and "over" in r.json()["error"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`apt-get install chromium`; .ci/run installs it)")
def test_page_uploads_a_transcript_draws_a_timeline_and_downloads_what_evaluate_predicts(engine, tiny_model_dir,
                                                                                          tmp_path):
    """Upload a 20-turn transcript in headless Chromium: one timeline lane per speaker and a mark per turn; the
    downloaded JSONL holds the probabilities batch evaluation gives the same dialogue."""
    from erc_llm.config import EvalConfig
    from erc_llm.evaluate import evaluate
    from erc_llm.options import build
    from tests.conftest import toy_dialogue, write_dialogues

    dialogue = toy_dialogue(20, "talk")
    (tmp_path / "talk.txt").write_text("\n".join(f"{u.speaker}: {u.text}" for u in dialogue.utterances) + "\n")
    (tmp_path / "data").mkdir()
    write_dialogues(tmp_path / "data" / "test.jsonl", [dialogue])
    evaluate(build(EvalConfig, None, {"dataset": "jsonl", "split": "test", "data_dir": str(tmp_path / "data"),
                                      "zero_shot": True, "model": str(tiny_model_dir), "labels": list(LABELS.labels),
                                      "out": str(tmp_path / "eval")}))
    expected = [json.loads(x)["probabilities"] for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    with browser_on(create_app(engine)) as (browser, url):
        page = browser.new_page(accept_downloads=True, viewport={"width": 360, "height": 800})
        page.goto(url)
        page.wait_for_selector("#legend li")
        page.set_input_files("#file", str(tmp_path / "talk.txt"))
        page.wait_for_selector(".turn:nth-child(20)", timeout=60_000)
        assert page.locator("#timeline .lane").count() == len(dialogue.speakers)
        assert page.locator("#timeline .mark").count() == 20
        page.focus('#timeline .mark[data-index="0"]')
        page.keyboard.press("ArrowRight")  # keyboard navigation along the timeline shows the distribution
        assert page.evaluate("document.activeElement.dataset.index") == "1"
        assert "%" in page.inner_text("#tip")
        with page.expect_download() as d:
            page.click("#dl-jsonl")
        got = json.loads(Path(d.value.path()).read_text().splitlines()[0])["utterances"]
        for g, e in zip(got, expected):
            assert g["probabilities"] == pytest.approx(e, abs=1e-4)
        assert len(got) == 20
        (tmp_path / "bad.csv").write_text("Speaker,Text\nRoss,hi\n")
        page.set_input_files("#file", str(tmp_path / "bad.csv"))
        page.wait_for_function("document.getElementById('error').textContent.includes('Utterance')")
        assert page.locator("#timeline .mark").count() == 20  # the labelled dialogue survives a bad upload
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 1000


def test_one_client_cannot_lock_out_the_others_and_limits_are_visible(engine):
    app = create_app(engine, Limits(max_dialogues=10, max_dialogues_per_client=3, turns_per_minute=4))
    greedy = TestClient(app, client=("10.0.0.1", 5000), raise_server_exceptions=False)
    polite = TestClient(app, client=("10.0.0.2", 5000), raise_server_exceptions=False)
    keys = [greedy.post("/dialogues").json()["id"] for _ in range(3)]
    r = greedy.post("/dialogues")
    assert r.status_code == 429 and "limit 3 per client" in r.json()["error"]
    assert polite.post("/dialogues").status_code == 201  # the others still get in
    assert [d["id"] for d in greedy.get("/dialogues").json()["dialogues"]] == keys
    assert len(polite.get("/dialogues").json()["dialogues"]) == 1
    for i in range(4):
        assert greedy.post(f"/dialogues/{keys[0]}/turns", json={"speaker": "A", "text": f"turn {i}"}).status_code == 200
    r = greedy.post(f"/dialogues/{keys[0]}/turns", json={"speaker": "A", "text": "one more"})
    assert r.status_code == 429 and "Retry-After" in r.headers and "per client" in r.json()["error"]
    assert greedy.delete(f"/dialogues/{keys[0]}").status_code == 204
    assert greedy.post("/dialogues").status_code == 201  # a freed slot is usable again
    assert greedy.get("/limits").json()["max_dialogues_per_client"] == 3


def test_any_speaker_name_round_trips_through_its_id(client):
    key = client.post("/dialogues").json()["id"]
    r = client.post(f"/dialogues/{key}/turns", json={"speaker": "AC/DC", "text": "Highway!"}).json()
    got = client.get(f"/dialogues/{key}/speakers/{r['speaker_id']}").json()
    assert got["speaker"] == "AC/DC" and got["turns"] == 1


def test_one_forward_takes_more_turns_than_the_default_worker_pool(tiny_model_dir):
    """50 dialogues each send a turn at once to a server batching up to 50: all 50 go into one forward. With the
    framework's default pool of 40 worker threads, 10 turns could not even reach the batching engine."""
    engine = Engine.load(None, model=str(tiny_model_dir), labels=LABELS, zero_shot=True)
    engine.start_batching(window_ms=20_000, max_batch=50)  # the forward starts when 50 turns are waiting
    with TestClient(create_app(engine, Limits(max_dialogues=60, max_dialogues_per_client=60))) as c:
        keys = [c.post("/dialogues", json={}).json()["id"] for _ in range(50)]
        with ThreadPoolExecutor(50) as pool:
            codes = list(pool.map(lambda k: c.post(f"/dialogues/{k}/turns", json={"speaker": "Ann", "text": "hi"})
                                  .status_code, keys))
        health = c.get("/health").json()
    engine.batcher.close()
    assert codes == [200] * 50 and health["batching"]["forwards_by_batch_size"] == {"50": 1}
    assert health["forward_seconds"] > 0
