"""Speaker store: build, persist, verify, retrieve; notes without leakage."""

import json

import pytest

from erc_llm.config import EvalConfig
from erc_llm.data.schema import Dialogue, LabelSet, Utterance
from erc_llm.evaluate import evaluate
from erc_llm.options import build
from erc_llm.speakers import (
    Coverage,
    NoteSettings,
    SpeakerContext,
    SpeakerStore,
    SpeakerTemplates,
    StoreError,
    build_store,
    training_notes,
)
from tests.conftest import write_dialogues

LABELS = LabelSet("toy", ("neutral", "joy", "anger", "surprise"))
CHEF = ["I will bake fresh bread in the oven tonight.", "The soup needs more salt and pepper.",
        "Chop the onions before you fry the garlic.", "This cake recipe uses butter and sugar.",
        "Let the dough rise for an hour in the kitchen."]
PILOT = ["We are cleared for takeoff on runway two.", "The plane will land at the airport soon.",
         "Fasten your seatbelts, we have turbulence ahead.", "The cockpit instruments show our altitude.",
         "Our flight reaches cruising speed over the clouds."]


def _dialogues(split: str, emotions=("joy", "anger")) -> list[Dialogue]:
    out = []
    for k in range(5):
        utts = [Utterance("Chef", CHEF[k], emotions[0], f"{split}{k}_0"),
                Utterance("Pilot", PILOT[k], emotions[1], f"{split}{k}_1"),
                Utterance("Chef", f"{split} line {k}, all good here.", "neutral", f"{split}{k}_2")]
        out.append(Dialogue(f"{split}{k}", utts, {"season": 1, "episode": k}))
    return out


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    store, report = build_store(_dialogues("train"), LABELS, SpeakerTemplates.load(), min_utterances=5)
    assert report == {"speakers": 2, "stored": 2, "skipped_below_min_utterances": 0, "skipped_utterances": 0}
    return store.save(tmp_path_factory.mktemp("store") / "meld")


def test_profiles_count_the_training_split(store_dir):
    store = SpeakerStore.load(store_dir)
    chef = store.get("Chef")
    assert chef.utterances == 10 and chef.emotions == {"joy": 5, "neutral": 5}
    assert chef.stays == 0 and chef.changes == {"joy -> neutral": 5}
    assert chef.last[-2:] == ["joy", "neutral"]
    assert "Chef has 10 lines" in chef.bio and "joy 50%" in chef.bio
    # typical lines: three of the speaker's own training lines, with the dialogue they came from
    own = {(d.id, u.text) for d in _dialogues("train") for u in d.utterances if u.speaker == "Chef"}
    assert len(chef.lines) == 3 and {tuple(x) for x in chef.lines} <= own


def test_store_holds_no_dev_or_test_utterances(tmp_path, capsys):
    from erc_llm.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev", "test"):
        write_dialogues(data / f"{split}.jsonl", _dialogues(split))
    assert main(["speakers", "build", "--dataset", "jsonl", "--data-dir", str(data), "--out", str(tmp_path / "s"),
                 "--labels", "neutral,joy,anger,surprise"]) == 0
    assert main(["speakers", "coverage", "--store", str(tmp_path / "s"), "--dataset", "jsonl", "--split", "train",
                 "--data-dir", str(data)]) == 0
    # Pilot has 5 lines in 5 dialogues: without a dialogue's own line too few are left, as in training
    assert "train: 5 of 10 speaker notes (2 speakers) describe a stored speaker" in capsys.readouterr().out
    blob = (tmp_path / "s" / "profiles.json").read_text()
    assert "train line" in blob or "Chef" in blob
    assert "dev line" not in blob and "test line" not in blob
    with pytest.raises(SystemExit):  # dev/test cannot be chosen at all
        main(["speakers", "build", "--dataset", "jsonl", "--split", "test", "--data-dir", str(data),
              "--out", str(tmp_path / "t")])


def test_unseen_speaker_gets_the_nearest_stored_speakers(store_dir):
    store = SpeakerStore.load(store_dir)
    assert [p.name for p, _ in store.similar(["The oven is hot, I am baking cookies with flour."], 1)] == ["Chef"]
    assert [p.name for p, _ in store.similar(["The captain says the aircraft is descending."], 1)] == ["Pilot"]
    ctx = SpeakerContext(store, SpeakerTemplates.load(), NoteSettings(bios=True, top_k=1))
    d = Dialogue("x", [Utterance("Baker", "I knead dough and bake bread every morning.", None, "x0"),
                       Utterance("Chef", "Nice.", None, "x1"), Utterance("Baker", "Thanks.", None, "x2")])
    notes = ctx.notes(d)
    assert "Baker is new" in notes[0] and "Chef (" in notes[0] and "Pilot" not in notes[0]
    assert notes[1].startswith("[About Chef: Chef has 10 lines")
    assert notes[2] == ""  # one note per speaker per dialogue


def test_corrupt_store_is_refused_with_a_clear_error(store_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(store_dir, bad)
    profiles = json.loads((bad / "profiles.json").read_text())
    profiles[0]["emotions"]["joy"] += 1
    (bad / "profiles.json").write_text(json.dumps(profiles))
    with pytest.raises(StoreError, match="profiles.json does not match its checksum"):
        SpeakerStore.load(bad)
    (bad / "index.faiss").unlink()
    with pytest.raises(StoreError, match="index.faiss is missing"):
        SpeakerStore.load(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json: not valid JSON"):
        SpeakerStore.load(bad)
    with pytest.raises(StoreError, match="no manifest.json"):
        SpeakerStore.load(tmp_path)


def test_mismatched_encoder_or_labels_are_refused(store_dir):
    from erc_llm.prompting import PROMPTS_DIR
    from erc_llm.speakers import open_context

    with pytest.raises(StoreError, match="built with encoder 'all-MiniLM-L6-v2', not 'other/model'"):
        SpeakerStore.load(store_dir, encoder="other/model")
    settings = {"bios": True, "history": 0, "top_k": 2, "note_tokens": 64}
    with pytest.raises(StoreError, match="built for labels"):
        open_context(store_dir, settings, PROMPTS_DIR, LabelSet("other", ("happy", "sad")))


def test_coverage_counts_notes_that_describe_a_stored_speaker(store_dir):
    """What a training or evaluation log reports: notes with a biography against notes naming the nearest speakers."""
    ctx = SpeakerContext(SpeakerStore.load(store_dir), SpeakerTemplates.load(), NoteSettings(bios=True, top_k=1))
    # leave-one-out: without its own dialogue Pilot keeps 4 lines (< 5), so all five Pilot notes name neighbours
    assert ctx.coverage(_dialogues("train"), leave_out=True) == Coverage(known=5, notes=10, speakers=2)
    assert ctx.coverage(_dialogues("test")) == Coverage(known=10, notes=10, speakers=2)
    d = Dialogue("x", [Utterance("Baker", "I bake bread.", None, "x0"), Utterance("Chef", "Nice.", None, "x1"),
                       Utterance("Baker", "Thanks.", None, "x2")])
    assert str(ctx.coverage([d])).startswith("1 of 2 speaker notes (2 speakers) describe a stored speaker; the other 1")


def test_training_notes_never_describe_their_own_dialogue(store_dir):
    """Leave-one-out: a training dialogue's bio equals the bio of a store built without that dialogue."""
    train = _dialogues("train")
    store = SpeakerStore.load(store_dir)
    notes = training_notes(store, SpeakerTemplates.load(), NoteSettings(bios=True, history=3), train)
    store4, _ = build_store(train[1:], LABELS, SpeakerTemplates.load(), min_utterances=5)
    assert store4.get("Chef").bio in notes["train0"][0]
    assert "Chef has 10 lines" not in notes["train0"][0]
    # Pilot has 5 lines: without this dialogue only 4 are left (< min), so Pilot is treated as unseen
    assert "Pilot is new" in notes["train0"][1] and "Pilot (" not in notes["train0"][1]
    # history: the first dialogue in story order has none; later ones see earlier gold training labels only
    assert "last emotions" not in notes["train0"][0]
    assert "[Chef's last emotions in earlier conversations: joy, neutral.]" in notes["train1"][0]


def test_test_time_history_never_reads_gold_test_labels(store_dir, tmp_path, tiny_model_dir):
    """Two copies of the test split that differ only in gold labels give identical predictions and memory."""
    outs = []
    for name, emotions in (("a", ("joy", "anger")), ("b", ("surprise", "neutral"))):
        data = tmp_path / name
        data.mkdir()
        for split in ("train", "test"):
            write_dialogues(data / f"{split}.jsonl", _dialogues(split, emotions if split == "test" else ("joy", "anger")))
        cfg = build(EvalConfig, None, {
            "dataset": "jsonl", "split": "test", "data_dir": str(data), "labels": list(LABELS.labels),
            "model": str(tiny_model_dir), "zero_shot": True, "out": str(tmp_path / f"out_{name}"),
            "speaker_store": str(store_dir),
            "speaker_bios": True, "speaker_history": 4})
        evaluate(cfg)
        metrics = json.loads((tmp_path / f"out_{name}" / "metrics.json").read_text())
        assert metrics["speakers"]["coverage"] == {"known": 10, "notes": 10, "speakers": 2}
        rows = [json.loads(r) for r in (tmp_path / f"out_{name}" / "predictions.jsonl").read_text().splitlines()]
        outs.append([(r["utterance_id"], r["predicted"], r["probabilities"]) for r in rows])
    assert outs[0] == outs[1]


def test_memory_is_fed_predictions_not_gold(store_dir):
    store = SpeakerStore.load(store_dir)
    ctx = SpeakerContext(store, SpeakerTemplates.load(), NoteSettings(bios=False, history=2))
    assert list(ctx.memory["Chef"]) == ["joy", "neutral"]  # seeded from the last training labels
    d = _dialogues("test", ("anger", "anger"))[0]
    ctx.observe(d, ["surprise", "joy", "surprise"])
    assert list(ctx.memory["Chef"]) == ["surprise", "surprise"]
    assert ctx.notes(d)[0] == "[Chef's last emotions in earlier conversations: surprise, surprise.]"


def test_iemocap_speakers_are_session_and_gender(tmp_path):
    """IEMOCAP through the same path: speakers Ses0N_F / Ses0N_M of sessions 1-4 only; session 5 is unseen."""
    from erc_llm.data import IEMOCAP_LABELS, load_split
    from tests.data.iemocap_fixture import write_iemocap

    root = write_iemocap(tmp_path / "IEMOCAP_full_release")
    train, labels, _ = load_split("iemocap", "train", root)
    store, report = build_store(train, labels, SpeakerTemplates.load(), min_utterances=1)
    names = {p.name for p in store.profiles}
    assert names and all(n[:5] in {"Ses01", "Ses02", "Ses03", "Ses04"} and n[-2:] in {"_F", "_M"} for n in names)
    assert store.manifest["labels"] == list(IEMOCAP_LABELS.labels)
    test, _, _ = load_split("iemocap", "test", root)
    ctx = SpeakerContext(store, SpeakerTemplates.load(), NoteSettings(bios=True, top_k=1))
    note = ctx.notes(test[0])[0]
    assert note.startswith("[Ses05_") and " is new; known speakers who talk like " in note


def test_bio_model_writes_the_biography(tiny_model_dir):
    """--bio-model: a causal LM writes each biography from the template facts (here a tiny random model)."""
    from erc_llm.backbone import load_backbone

    model, tok, _ = load_backbone(str(tiny_model_dir))
    store, _ = build_store(_dialogues("train"), LABELS, SpeakerTemplates.load(), min_utterances=5, bio_model=(model, tok))
    assert store.manifest["bio"] == "llm"
    chef = store.get("Chef")
    assert chef.bio and "Chef has 10 lines" not in chef.bio  # generated, not the template text
    assert chef.emotions == {"joy": 5, "neutral": 5}  # the facts themselves are unchanged
