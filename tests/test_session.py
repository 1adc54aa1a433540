"""ERCSession (Python API) and the REPL."""

import json
import subprocess
import sys

import pytest

from erc_llm.chat import Repl
from erc_llm.decoding import StreamingTagger
from erc_llm.session import Engine, ERCSession
from tests.conftest import LABELS, REPO, toy_dialogue
from tests.test_decoding import brute_force_probs


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(None, model=str(tiny_model_dir), labels=LABELS, zero_shot=True)


def test_session_with_participants_equals_batch_tagging(engine):
    d = toy_dialogue(6)
    batch = StreamingTagger(engine.model, engine.builder).tag(d)
    s = ERCSession(engine, participants=d.speakers)
    live = [s.add_turn(u.speaker, u.text) for u in d.utterances]
    for b, r in zip(batch, live):
        assert b.label == r.label
        assert b.probs == pytest.approx([r.probs[lab] for lab in LABELS.labels], abs=1e-5)


def test_concurrent_sessions_share_batched_forwards_with_the_answers_of_one_at_a_time(tiny_model_dir):
    """Sessions on several threads, turns interleaved (newcomers re-reading their transcript included), scored by
    the batching engine: every turn gets the label and probabilities the session gets alone, in order, and
    forwards of more than one turn did happen."""
    import threading

    engine = Engine.load(None, model=str(tiny_model_dir), labels=LABELS, zero_shot=True)
    ds = [toy_dialogue(n, f"d{n}") for n in (7, 3, 9, 5, 6)]
    for i, d in enumerate(ds):
        d.utterances[0].text = f"variant {i} " + d.utterances[0].text

    def play(d, out):
        s = ERCSession(engine, dialogue_id=d.id)
        out.extend(s.add_turn(u.speaker, u.text) for u in d.utterances)

    alone = [[] for _ in ds]
    for d, out in zip(ds, alone):
        play(d, out)
    engine.start_batching(window_ms=30, max_batch=4)
    got = [[] for _ in ds]
    threads = [threading.Thread(target=play, args=(d, out)) for d, out in zip(ds, got)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.batcher.close()
    assert max(engine.batcher.sizes) > 1 and max(engine.batcher.sizes) <= 4
    for ref, live in zip(alone, got):
        assert [r.label for r in ref] == [r.label for r in live]
        assert [r.index for r in live] == list(range(len(ref)))
        for a, b in zip(ref, live):
            assert [a.probs[lab] for lab in LABELS.labels] == pytest.approx([b.probs[lab] for lab in LABELS.labels], abs=1e-4)


def test_newcomer_rereads_transcript_with_new_header(engine):
    """No participants given: each newcomer changes the header; later turns still equal a full forward."""
    d = toy_dialogue(5)  # Ross, Rachel, Monica, Ross, Rachel
    s = ERCSession(engine)
    live = [s.add_turn(u.speaker, u.text) for u in d.utterances]
    assert s.participants == ["Ross", "Rachel", "Monica"]
    ref = brute_force_probs(engine.model, engine.builder, d, [r.label for r in live])
    for r, p in zip(live[2:], ref[2:]):  # from the turn where the last newcomer joined
        assert [r.probs[lab] for lab in LABELS.labels] == pytest.approx(p, abs=1e-4)


def test_history_summary_reset_and_errors(engine):
    s = ERCSession(engine)
    for u in toy_dialogue(4).utterances:
        s.add_turn(u.speaker, u.text)
    assert [t.speaker for t in s.history()] == ["Ross", "Rachel", "Monica", "Ross"]
    ross = s.speaker_summary("Ross")
    assert ross["turns"] == 2 and sum(ross["counts"].values()) == 2 and ross["last"] == s.turns[-1].label
    assert sum(ross["last_probs"].values()) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(KeyError, match=r"speakers so far = \['Monica', 'Rachel', 'Ross'\]"):
        s.speaker_summary("Joey")
    with pytest.raises(ValueError, match="a turn needs a speaker and text"):
        s.add_turn("Ross", "   ")
    with pytest.raises(ValueError, match="trained without audio"):
        s.add_turn("Ross", "hi", audio=[1.0, 2.0])
    s.reset()
    assert s.history() == [] and s.participants == []


def test_repl_commands_and_questions(engine, tmp_path):
    repl = Repl(ERCSession(engine))
    out = repl.handle("Ross: I can't believe you did that!")
    assert out.startswith("  Ross → ") and "%" in out
    repl.handle("Rachel: Oh, that's great.")
    assert repl.handle("how does Ross feel?").startswith("Ross: 1 turns; now ")
    assert repl.handle("What is Rachel feeling?").startswith("Rachel: 1 turns; now ")
    assert repl.handle("who is angry?").startswith("anger at their last turn: ")
    assert "not an emotion of this model" in repl.handle("who is hungry?")
    assert repl.handle("/labels") == "neutral, joy, anger, surprise"
    assert "0 Ross: I can't believe you did that!  [" in repl.handle("/history")
    assert "has not spoken" in repl.handle("/who Joey")
    assert repl.handle("/save " + str(tmp_path / "d.jsonl")) == f"saved 2 turns to {tmp_path / 'd.jsonl'}"
    row = json.loads((tmp_path / "d.jsonl").read_text())
    assert [u["speaker"] for u in row["utterances"]] == ["Ross", "Rachel"]
    assert repl.handle("/reset") == "new dialogue" and repl.handle("/history") == "(no turns yet)"
    loaded = repl.handle("/load " + str(tmp_path / "d.jsonl")).splitlines()
    assert len(loaded) == 2 and loaded[1].startswith("  Rachel → ")
    assert "no such file" in repl.handle("/load /nonexistent.jsonl")
    assert "unknown command /dance" in repl.handle("/dance")
    assert "not understood" in repl.handle("hello there")
    repl.handle("/quit")
    assert repl.done


def test_chat_piped_end_to_end(tiny_model_dir, tmp_path):
    script = "Ross: We were on a break!\nRachel: Oh, that's great.\nhow does Ross feel?\n/history\n/quit\nJoey: never read\n"
    r = subprocess.run([sys.executable, "-m", "erc_llm.cli", "chat", "--zero-shot", "--model", str(tiny_model_dir)], input=script,
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "ERC_LLM_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines[0].startswith("  Ross → ") and lines[1].startswith("  Rachel → ")
    assert lines[2].startswith("Ross: 1 turns; now ")
    assert "Joey" not in r.stdout  # nothing after /quit


def test_session_keeps_each_speakers_audio_across_dialogues(engine, tiny_tokenizer):
    """With a speaker-normalised audio model, every turn's features are kept per speaker (across reset, so
    a speaker's statistics grow over the session) and turns without audio add nothing."""
    import numpy as np

    from erc_llm.audio import FeatureTable
    from erc_llm.decoding import LabelTrie
    from erc_llm.projector import AudioModel, AudioProjector, fit_spec
    from erc_llm.prompting import PromptBuilder

    rng = np.random.default_rng(0)
    table = FeatureTable(("f0", "f1"), {str(i): rng.normal(size=2).astype(np.float32) for i in range(6)}, "test")
    spec = fit_spec("csv", 1, table, list(table.values), normalize="speaker")
    builder = PromptBuilder(tiny_tokenizer, LABELS, audio_tokens=1)
    proj = AudioProjector(spec.in_dim, engine.model.config.hidden_size, 1, False).eval()
    e = Engine(engine.model, builder, LABELS, audio=AudioModel(spec, proj), trie=LabelTrie(builder.label_ids))
    s = ERCSession(e)
    for u in toy_dialogue(4).utterances:  # Ross, Rachel, Monica, Ross
        r = s.add_turn(u.speaker, u.text, audio=rng.normal(size=2).astype(np.float32))
        assert sum(r.probs.values()) == pytest.approx(1.0, abs=1e-5)
    s.add_turn("Ross", "no audio here")
    assert {k: len(v) for k, v in s.heard.items()} == {"Ross": 2, "Rachel": 1, "Monica": 1}
    s.reset()
    s.add_turn("Ross", "again", audio=[0.5, 0.5])
    assert len(s.heard["Ross"]) == 3
