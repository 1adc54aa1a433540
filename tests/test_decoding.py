import functools
import inspect
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from erc_llm.data.schema import Dialogue, LabelSet, Utterance
from erc_llm.decoding import (
    CACHE_ARG,
    LabelTrie,
    PackedTagger,
    SharedPrefix,
    StreamingTagger,
    StreamState,
    rollout,
    score_batch,
)
from erc_llm.prompting import PromptBuilder
from tests.conftest import LABELS, make_model, make_sharp_model, make_tokenizer, over_budget, toy_dialogue


@torch.inference_mode()
def brute_force_probs(model, builder: PromptBuilder, dialogue: Dialogue, history: list[str]) -> list[list[float]]:
    """Reference: for every turn and every label, one full forward of the whole prefix (no cache)."""
    out = []
    prefix = builder.header_ids(dialogue)
    for utt, written in zip(dialogue.utterances, history):
        prefix = prefix + builder.turn_ids(utt)
        scores = []
        for ids in builder.label_ids:
            x = torch.tensor([prefix + ids])
            lp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
            scores.append(sum(lp[len(prefix) - 1 + j, t] for j, t in enumerate(ids)))
        out.append(torch.softmax(torch.stack(scores), 0).tolist())
        prefix = prefix + builder.answer_ids(written)
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("history", ["predicted", "gold"])
def test_streaming_equals_full_forward(tiny_tokenizer, arch, history):
    """The KV-cached tagger gives the same probabilities as re-reading the whole prefix each turn.

    The gemma3 model has a 24-token sliding window, shorter than the dialogue: the cache handles it.
    """
    model = make_model(len(tiny_tokenizer), arch)
    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=4096)
    d = toy_dialogue(6)
    preds = StreamingTagger(model, builder, history).tag(d)
    written = [u.emotion for u in d.utterances] if history == "gold" else [p.label for p in preds]
    ref = brute_force_probs(model, builder, d, written)
    for p, r in zip(preds, ref):
        assert p.probs == pytest.approx(r, abs=1e-4)
        assert sum(p.probs) == pytest.approx(1.0, abs=1e-5)
        assert p.label == LABELS.labels[max(range(len(r)), key=r.__getitem__)]


def test_predicted_history_writes_predictions_not_gold(tiny_tokenizer, tiny_model):
    """With predicted history, changing the gold labels changes nothing."""
    builder = PromptBuilder(tiny_tokenizer, LABELS)
    tagger = StreamingTagger(tiny_model, builder, "predicted")
    d1, d2 = toy_dialogue(5), toy_dialogue(5)
    for u in d2.utterances:
        u.emotion = "neutral"
    assert [p.probs for p in tagger.tag(d1)] == [p.probs for p in tagger.tag(d2)]
    gold = StreamingTagger(tiny_model, builder, "gold")
    assert [p.probs for p in gold.tag(d1)] != [p.probs for p in gold.tag(d2)]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.inference_mode()
def test_kv_cache_is_fed_under_the_name_the_installed_transformers_takes(tiny_tokenizer, arch):
    """transformers renames the cache argument (deprecated first, removed later): decoding must use the current
    name, or it breaks when the old one goes."""
    model = make_model(len(tiny_tokenizer), arch)
    assert CACHE_ARG in inspect.signature(type(model.get_decoder()).forward).parameters
    builder = PromptBuilder(tiny_tokenizer, LABELS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        StreamingTagger(model, builder, "predicted").tag(toy_dialogue(4))
        PackedTagger(model, builder, batch=2).tag_many([toy_dialogue(3), toy_dialogue(4)])
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_unknown_history_mode(tiny_tokenizer, tiny_model):
    with pytest.raises(ValueError, match=r"available = \['predicted', 'gold'\]"):
        StreamingTagger(tiny_model, PromptBuilder(tiny_tokenizer, LABELS), "oracle")


def test_truncation_keeps_cache_within_budget(tiny_tokenizer, tiny_model):
    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=200, max_utterance_tokens=24)
    tagger = StreamingTagger(tiny_model, builder)
    d = toy_dialogue(40)
    state = tagger.new_state(d)
    for u in d.utterances:
        probs = state.score(u)
        assert state.cache_len + state.max_answer <= 200
        assert torch.isclose(probs.sum(), torch.tensor(1.0))
        state.commit(LABELS.labels[int(probs.argmax())])
    assert state.first_kept > 0 and len(state.segments) == 40


@pytest.mark.parametrize("max_tokens", [4096, 200])
def test_rollout_of_tokenized_turns_writes_what_the_tagger_predicts(tiny_tokenizer, tiny_model, max_tokens):
    """On-policy history in training: the labels decoded from a tokenized dialogue (``encode``) are the
    tagger's predictions with predicted history, also when the transcript outgrows the token budget."""
    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=max_tokens, max_utterance_tokens=24)
    d = toy_dialogue(30)
    enc = builder.encode(d)
    written = rollout(tiny_model, builder, enc["header"], enc["turns"])
    assert written == [LABELS.index(p.label) for p in StreamingTagger(tiny_model, builder).tag(d)]


def test_packed_rollouts_write_what_each_dialogue_alone_writes(tiny_tokenizer):
    """On-policy rollouts of a training step's dialogues packed into one forward per turn step: the same labels
    as one dialogue at a time, also for a dialogue over the token budget (shortened as it is alone)."""
    model = make_sharp_model(len(tiny_tokenizer))
    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=600, max_utterance_tokens=24)
    ds = [toy_dialogue(n, f"d{n}") for n in (6, 60, 2, 11)]
    for i, d in enumerate(ds):
        d.utterances[0].text = f"variant {i} " + d.utterances[0].text
    encoded = [builder.encode(d) for d in ds]
    tagger = PackedTagger(model, builder, batch=4)
    assert [over_budget(builder, d) for d in ds] == [False, True, False, False]
    got = tagger.rollout_many([(e["header"], e["turns"]) for e in encoded])
    assert got == [rollout(model, builder, e["header"], e["turns"]) for e in encoded]
    assert all(len(set(g)) > 1 for g in got if len(g) > 5), "the written labels should vary within a dialogue"


def test_trie_rejects_ambiguous_labels():
    with pytest.raises(ValueError, match="prefix"):
        LabelTrie([[5], [5, 6]])
    with pytest.raises(ValueError, match="same token sequence"):
        LabelTrie([[5, 6], [5, 6]])
    assert LabelTrie([[5], [6]]).single_token and not LabelTrie([[5, 7], [6]]).single_token


@functools.lru_cache(maxsize=None)
def _tok_and_model(vocab_size: int):
    tok = make_tokenizer(vocab_size)
    return tok, make_model(len(tok), seed=vocab_size)


words = st.text(alphabet="abcdefghijklmnoprstu", min_size=2, max_size=9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=st.lists(words, min_size=2, max_size=6, unique=True), vocab=st.sampled_from([40, 60, 120, 300]),
       n_turns=st.integers(1, 4))
def test_only_valid_labels_with_exact_probabilities(labels, vocab, n_turns):
    """Random label sets under tokenizers that split them differently (often into several tokens):
    every prediction is a label of the set, probabilities sum to 1 and equal the exact sequence
    probabilities of a full forward pass."""
    tok, model = _tok_and_model(vocab)
    label_set = LabelSet("random", tuple(labels))
    ids = [tok(" " + lab, add_special_tokens=False)["input_ids"] for lab in labels]
    assume(all(not (a is not b and b[: len(a)] == a) for a in ids for b in ids))  # trie precondition
    builder = PromptBuilder(tok, label_set)
    d = Dialogue("r", [Utterance(f"S{i % 2}", f"turn number {i}", None, f"r{i}") for i in range(n_turns)])
    preds = StreamingTagger(model, builder).tag(d)
    ref = brute_force_probs(model, builder, d, [p.label for p in preds])
    for p, r in zip(preds, ref):
        assert p.label in label_set.labels
        assert len(p.probs) == len(labels) and sum(p.probs) == pytest.approx(1.0, abs=1e-5)
        assert p.probs == pytest.approx(r, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("history", ["predicted", "gold"])
def test_packed_dialogues_equal_one_at_a_time(tiny_tokenizer, arch, history):
    """Several dialogues packed into one forward per step == each through its own KV cache (sliding window too)."""
    tok = tiny_tokenizer
    model = make_model(len(tok), arch)
    builder = PromptBuilder(tok, LABELS, max_tokens=4096)
    ds = [toy_dialogue(n, f"d{n}") for n in (1, 7, 3, 12, 5)]
    for i, d in enumerate(ds):
        d.utterances[0].text = f"variant {i} " + d.utterances[0].text
    ref = [StreamingTagger(model, builder, history).tag(d) for d in ds]
    got = PackedTagger(model, builder, history, batch=3).tag_many(ds)
    for r, g in zip(ref, got):
        assert [p.label for p in r] == [p.label for p in g]
        for a, b in zip(r, g):
            assert a.probs == pytest.approx(b.probs, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("max_tokens", [4096, 120])
def test_batched_turns_of_interleaved_dialogues_equal_each_dialogue_alone(tiny_tokenizer, arch, max_tokens):
    """Turns of different dialogues arriving in any interleaving and scored in batched forwards (each dialogue
    with its own KV cache, padded into one batch) give every dialogue the labels and probabilities it gets
    alone, and leave each cache able to go on alone: sliding windows, dialogues joining late, replays and
    truncation rebuilds (``max_tokens`` 120) included."""
    import random

    model = make_model(len(tiny_tokenizer), arch)
    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=max_tokens)
    trie = LabelTrie(builder.label_ids)
    ds = [toy_dialogue(n, f"d{n}") for n in (9, 3, 12, 6)]
    for i, d in enumerate(ds):
        d.utterances[0].text = f"variant {i} " + d.utterances[0].text
    ref = [StreamingTagger(model, builder).tag(d) for d in ds]
    prefix = SharedPrefix(model, builder.shared_header_ids())  # half the dialogues start from the shared header
    states = [StreamState(model, builder, trie, builder.header_ids(d), prefix if i % 2 else None)
              for i, d in enumerate(ds)]
    states[1].replay(ds[1].utterances[0], ref[1][0].label)  # a resumed dialogue: its first turn is replayed
    done = [0, 1, 0, 0]
    got: list[list] = [[None] * len(d.utterances) for d in ds]
    got[1][0] = ref[1][0].probs
    rng = random.Random(0)
    while any(k < len(d.utterances) for k, d in zip(done, ds)):
        open_ = [i for i, d in enumerate(ds) if done[i] < len(d.utterances)]
        members = rng.sample(open_, rng.randint(1, len(open_)))
        turns = [builder.turn_ids(ds[i].utterances[done[i]]) for i in members]
        for i, p in zip(members, score_batch([states[i] for i in members], turns)):
            got[i][done[i]] = p.tolist()
            states[i].commit(LABELS.labels[int(p.argmax())])
            done[i] += 1
    for r, g in zip(ref, got):
        assert [p.label for p in r] == [LABELS.labels[max(range(len(x)), key=x.__getitem__)] for x in g]
        for a, b in zip(r, g):
            assert a.probs == pytest.approx(b, abs=1e-4)


def test_dialogues_start_from_the_shared_header_prefix(tiny_tokenizer, tiny_model):
    """The task line and label list every header starts with are read once per tagger: a dialogue's first forward
    feeds only its participants and first turn; a header that shares fewer tokens starts from only those."""
    builder = PromptBuilder(tiny_tokenizer, LABELS)
    tagger = StreamingTagger(tiny_model, builder)
    d = toy_dialogue(3)
    header, turn = builder.header_ids(d), builder.turn_ids(d.utterances[0])
    state = tagger.new_state(d)
    n = state.cache_len
    assert 10 < n < len(header) and header[:n] == tagger.prefix.ids[:n] and state.pending == header[n:]
    assert state.cache.get_seq_length() == n
    feed, _ = state.prepare(turn)
    assert feed == header[n:] + turn
    assert tagger.prefix.start(header[:4] + [header[4] + 1] + header[5:])[1] == 4
    assert tagger.prefix.start([header[0] + 1] + header[1:]) == (None, 0)


def test_a_batch_takes_one_turn_per_dialogue(tiny_tokenizer, tiny_model):
    builder = PromptBuilder(tiny_tokenizer, LABELS)
    d = toy_dialogue(2)
    state = StreamState(tiny_model, builder, LabelTrie(builder.label_ids), builder.header_ids(d))
    turns = [builder.turn_ids(u) for u in d.utterances]
    with pytest.raises(ValueError, match="one turn in a batch"):
        score_batch([state, state], turns)
    other = StreamState(tiny_model, builder, LabelTrie(builder.label_ids), builder.header_ids(d))
    state.score_ids(turns[0])  # scored, not committed
    with pytest.raises(RuntimeError, match="without commit"):
        score_batch([other, state], turns)
    assert other._turn is None and other.cache.get_seq_length() == 0  # refused before anything changed


def test_continuous_batching_keeps_the_forward_full_and_yields_dialogues_as_they_finish(tiny_tokenizer, tiny_model,
                                                                                          monkeypatch):
    """At most ``batch`` dialogues in flight; a finished dialogue's place goes to the next one at once (every
    forward is full until the queue is empty); each dialogue comes out when its last turn is scored, with the
    predictions it gets alone."""
    import erc_llm.decoding as decoding

    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=4096)
    ds = [toy_dialogue(n, f"d{n}") for n in (1, 7, 3, 12, 5)]
    sizes, real = [], decoding.score_batch
    monkeypatch.setattr(decoding, "score_batch", lambda states, *a: sizes.append(len(states)) or real(states, *a))
    streamed = list(PackedTagger(tiny_model, builder, batch=2).tag_stream(ds))
    assert [k for k, _ in streamed] == [0, 2, 1, 4, 3]
    assert sizes == [2] * 12 + [1] * 4  # 28 turns in 16 forwards
    for k, preds in streamed:
        alone = StreamingTagger(tiny_model, builder).tag(ds[k])
        assert [p.label for p in preds] == [p.label for p in alone]
        for a, b in zip(alone, preds):
            assert a.probs == pytest.approx(b.probs, abs=1e-4)
    with pytest.raises(ValueError, match="at least 1 dialogue"):
        PackedTagger(tiny_model, builder, batch=0)


def test_text_only_history_decoding_equals_full_forward(tiny_tokenizer, tiny_model):
    """With no labels written, the KV-cached decoder still matches a full forward per turn and prefix."""
    builder = PromptBuilder(tiny_tokenizer, LABELS, write_labels=False)
    d = toy_dialogue(5)
    preds = StreamingTagger(tiny_model, builder).tag(d)
    ref = brute_force_probs(tiny_model, builder, d, [p.label for p in preds])
    for p, r in zip(preds, ref):
        assert p.probs == pytest.approx(r, abs=1e-4)
    packed = PackedTagger(tiny_model, builder, batch=4).tag_many([d, toy_dialogue(3, "d2")])[0]
    assert [p.label for p in packed] == [p.label for p in preds]


def _with_text(d: Dialogue, i: int, text: str) -> Dialogue:
    utts = list(d.utterances)
    utts[i] = Utterance(utts[i].speaker, text, utts[i].emotion, utts[i].utterance_id)
    return Dialogue(d.id, utts)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_lookahead_slot_depends_on_exactly_the_next_turns(tiny_tokenizer, arch):
    """With look-ahead N, turn i's probabilities change with the text of turn i + N and not with any later turn."""
    from erc_llm.decoding import LookaheadTagger

    model = make_model(len(tiny_tokenizer), arch)
    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=4096, write_labels=False)
    tagger = LookaheadTagger(model, builder, 2)
    d = toy_dialogue(8)
    base = [torch.tensor(p.probs) for p in tagger.tag(d)]
    assert all(abs(float(p.sum()) - 1) < 1e-5 for p in base)
    changed = [torch.tensor(p.probs) for p in tagger.tag(_with_text(d, 5, "Never, ever again, Ross."))]
    for i in range(3):  # turns 0..2 see at most turn 4
        torch.testing.assert_close(changed[i], base[i], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[3], base[3], atol=1e-5)  # turn 3 sees turn 5
    # several dialogues in one forward give what each gives alone
    many = tagger.tag_many([toy_dialogue(3, "a"), d, toy_dialogue(5, "b")])
    torch.testing.assert_close(torch.tensor([p.probs for p in many[1]]), torch.stack(base), rtol=0, atol=1e-5)


def test_lookahead_scores_a_long_dialogue_in_pieces_with_every_turn_once(tiny_tokenizer, tiny_model):
    from erc_llm.decoding import LookaheadTagger

    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=120, max_utterance_tokens=24, write_labels=False)
    tagger = LookaheadTagger(tiny_model, builder, 2)
    d = toy_dialogue(20)
    pieces = tagger.pieces(d)
    assert len(pieces) > 2 and all(len(p.transcript.input_ids) <= 120 for p in pieces)
    scored = sorted(t for p in pieces for t in range(p.first, p.end))
    assert scored == list(range(20))
    for p in pieces:  # each scored turn has its two look-ahead turns in the same transcript
        assert p.transcript.turn_index[-1] >= min(19, p.end - 1 + 2)
    preds = tagger.tag(d)
    assert [p.utterance_id for p in preds] == [u.utterance_id for u in d.utterances]
    with pytest.raises(ValueError, match="look-ahead needs a text-only transcript"):
        LookaheadTagger(tiny_model, PromptBuilder(tiny_tokenizer, LABELS), 2)
