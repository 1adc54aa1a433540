import pytest

from erc_llm.data.schema import Utterance
from erc_llm.prompting import PromptBuilder, Templates, fit_window
from tests.conftest import LABELS, REPO, toy_dialogue


@pytest.fixture
def builder(tiny_tokenizer):
    return PromptBuilder(tiny_tokenizer, LABELS, max_tokens=4096, max_utterance_tokens=32)


def test_templates_are_files_with_one_label_slot(tmp_path):
    t = Templates.load()
    assert "{speaker}" in t.turn_prefix and "{text}" in t.turn_prefix and len(t.version) == 12
    (tmp_path / "header.txt").write_text("H {labels}\n")
    (tmp_path / "turn.txt").write_text("{speaker}: {text}\n")
    with pytest.raises(ValueError, match=r"exactly one \{label\} slot, found 0"):
        Templates.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="header.txt and turn.txt"):
        Templates.load(tmp_path / "nowhere")


def test_header_names_labels_and_participants(builder, tiny_tokenizer):
    text = tiny_tokenizer.decode(builder.header_ids(toy_dialogue(3)))
    assert "neutral, joy, anger, surprise" in text and "Ross, Rachel, Monica" in text


def test_slots_are_causal(builder):
    """Tokens up to slot i do not depend on turn i's label or on any later turn."""
    d = toy_dialogue(4)
    gold = [u.emotion for u in d.utterances]
    a = builder.build(d, gold)
    d2 = toy_dialogue(4)
    d2.utterances[3] = Utterance("Ross", "Something else entirely.", "joy", "x")
    b = builder.build(d2, gold[:2] + ["joy", "joy"])
    for i in range(3):
        assert a.input_ids[: a.slots[i] + 1] == b.input_ids[: b.slots[i] + 1]
    assert a.input_ids[: a.slots[3]] != b.input_ids[: b.slots[3]] or a.slots[3] != b.slots[3]
    # the label tokens sit right after each slot and are the label's own tokens
    for i, lab in enumerate(gold):
        assert a.label_positions[i][0] == a.slots[i] + 1
        assert [a.input_ids[p] for p in a.label_positions[i]] == builder.label_ids[LABELS.index(lab)]


def test_full_transcript_equals_streaming_segments(builder):
    d = toy_dialogue(5)
    gold = [u.emotion for u in d.utterances]
    t = builder.build(d, gold)
    stream = builder.header_ids(d)
    for u, lab in zip(d.utterances, gold):
        stream += builder.turn_ids(u) + builder.answer_ids(lab)
    assert t.input_ids == stream


def test_truncation_keeps_header_and_latest_turns(tiny_tokenizer):
    big = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=100_000)
    d = toy_dialogue(40)
    gold = [u.emotion for u in d.utterances]
    full = big.build(d, gold)
    budget = len(full.input_ids) // 3
    small = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=budget)
    t = small.build(d, gold)
    header = small.header_ids(d)
    assert len(t.input_ids) <= budget
    assert t.input_ids[: len(header)] == header
    assert t.first_turn > 0 and t.turn_index[-1] == 39  # the last turn is always kept
    assert t.input_ids[len(header):] == full.input_ids[len(full.input_ids) - (len(t.input_ids) - len(header)):]


def test_long_utterance_is_capped(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer, LABELS, max_utterance_tokens=8)
    long = Utterance("Ross", "I can't believe you did that! " * 30, "joy", "u")
    assert len(b.turn_ids(long)) < 8 + 30


@pytest.mark.parametrize("header,segs,budget,k", [
    (10, [5, 5, 5], 100, 0), (10, [5, 5, 5], 20, 1), (10, [5, 5, 5], 19, 2), (10, [5, 5, 5], 25, 0), (10, [50], 20, 0), (0, [], 5, 0),
])
def test_fit_window(header, segs, budget, k):
    assert fit_window(header, segs, budget) == k


def test_text_only_history_writes_no_labels_in_training_or_decoding(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=4096, write_labels=False)
    d = toy_dialogue(4)
    with_gold = b.build(d, [u.emotion for u in d.utterances])
    with_other = b.build(d, ["neutral"] * 4)
    assert with_gold.input_ids == with_other.input_ids  # nothing of the labels reaches the transcript
    assert all(pos == [] for pos in with_gold.label_positions)
    assert b.answer_ids("joy") == b.suffix_ids
    labelled = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=4096)
    assert len(labelled.build(d, ["joy"] * 4).input_ids) > len(with_gold.input_ids)


def test_offline_header_holds_the_whole_conversation(tiny_tokenizer):
    d = toy_dialogue(3)
    b = PromptBuilder(tiny_tokenizer, LABELS, Templates.load(context="offline"))
    header = tiny_tokenizer.decode(b.header_ids(d))
    last = d.utterances[-1]
    assert f"{last.speaker}: {last.text}" in header  # the future is in the header, before the first slot
    online = PromptBuilder(tiny_tokenizer, LABELS)
    assert last.text not in tiny_tokenizer.decode(online.header_ids(d))
    with pytest.raises(ValueError, match="context 'future' not supported"):
        Templates.load(context="future")


@pytest.mark.parametrize("folder,labels", [("meld_described", "MELD_LABELS"), ("iemocap_described", "IEMOCAP_LABELS")])
def test_label_description_prompts_describe_exactly_the_label_set(folder, labels):
    """The shipped label-description headers load as prompt folders, keep the online header's slots, and give
    one description line to every label of their dataset and to no other label."""
    import re

    from erc_llm.data import schema

    t = Templates.load(REPO / "configs" / "prompts" / folder)
    assert "{labels}" in t.header and "{speakers}" in t.header
    assert (t.turn_prefix, t.turn_suffix) == (Templates.load().turn_prefix, Templates.load().turn_suffix)
    described = re.findall(r"^- (\w+): ", t.header, flags=re.M)
    assert sorted(described) == sorted(getattr(schema, labels).labels)


def test_pieces_of_a_dialogue_that_fits_are_its_one_transcript(builder):
    d = toy_dialogue(6)
    enc = builder.encode(d)
    gold = enc["labels"]
    (piece,) = builder.pieces(enc["header"], enc["turns"], gold)
    assert piece.transcript == builder.assemble(enc["header"], enc["turns"], gold)
    assert (piece.first, piece.end) == (0, 6) and piece.targets(gold) == gold


def test_pieces_of_a_long_dialogue_train_every_turn_once_within_the_budget(tiny_tokenizer):
    big = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=100_000)
    d = toy_dialogue(40)
    full = big.build(d, [u.emotion for u in d.utterances])
    small = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=len(full.input_ids) // 3)
    enc = small.encode(d)
    gold = enc["labels"]
    pieces = small.pieces(enc["header"], enc["turns"], gold)
    assert len(pieces) >= 3 and all(len(p.transcript.input_ids) <= small.max_tokens for p in pieces)
    assert pieces[0].transcript == small.assemble(enc["header"], enc["turns"], gold)  # the latest window first
    assert sorted(t for p in pieces for t in range(p.first, p.end)) == list(range(40))
    first = pieces[-1]  # the dialogue's opening turns, read from the dialogue's start as a streaming decoder does
    assert first.first == 0 and first.transcript.input_ids == full.input_ids[: len(first.transcript.input_ids)]
    trained = [lab for p in pieces for lab in p.targets(gold) if lab >= 0]
    assert len(trained) == 40 and sorted(trained) == sorted(gold)
