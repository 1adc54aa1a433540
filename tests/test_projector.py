"""Audio soft tokens: projector shapes, missing audio, and the KV-cached decoder with audio."""

import json

import numpy as np
import pytest
import torch

from erc_llm.audio import FeatureTable
from erc_llm.data.schema import DataError
from erc_llm.decoding import StreamingTagger
from erc_llm.heads import slot_logits
from erc_llm.projector import (
    SPEAKER_MIN_UTTERANCES,
    AudioFeed,
    AudioInputs,
    AudioModel,
    AudioProjector,
    AudioSpec,
    embed_ids,
    embedding_rms,
    fit_spec,
)
from erc_llm.prompting import AUDIO_TOKEN, PromptBuilder
from erc_llm.session import Engine
from tests.conftest import LABELS, make_model, make_sharp_model, over_budget, toy_dialogue


def _table(ids, dim=8, frames=False, seed=0):
    rng = np.random.default_rng(seed)
    vals = {i: rng.normal(size=(5 + k, dim) if frames else dim).astype(np.float32) for k, i in enumerate(ids)}
    return FeatureTable(tuple(f"f{j}" for j in range(dim)), vals, "test")


def test_utterance_projector_shapes_and_scale():
    torch.manual_seed(0)
    p = AudioProjector(in_dim=16, hidden_size=24, k_tokens=3, frames=False, target_rms=5.0)
    y = p([torch.randn(16) for _ in range(4)])
    assert y.shape == (4, 3, 24)
    assert y.pow(2).mean().sqrt().item() == pytest.approx(5.0, rel=0.05)  # matched to the LLM's embeddings


def test_frame_projector_pools_variable_lengths_without_padding_effects():
    torch.manual_seed(0)
    p = AudioProjector(in_dim=9, hidden_size=24, k_tokens=2, frames=True).eval()
    short, long = torch.randn(3, 9), torch.randn(50, 9)
    both = p([short, long])
    assert both.shape == (2, 2, 24)
    torch.testing.assert_close(both[0], p([short])[0], atol=1e-5, rtol=1e-5)  # padding never leaks in


def test_missing_audio_gets_the_no_audio_input_and_is_counted():
    spec = fit_spec("csv", 1, _table(["a", "b", "c"]), ["a", "b", "c"])
    inputs = AudioInputs(spec, _table(["a", "b"]), ["a", "b", "zz"])
    assert inputs.missing == 1
    assert inputs.inputs["zz"].tolist() == [0.0] * 8 + [1.0] * 8  # values 0, every "missing" flag 1
    assert inputs.inputs["a"][8:].sum() == 0
    fspec = fit_spec("npy", 2, _table(["a", "b"], frames=True), ["a", "b"])
    assert fspec.frames and fspec.in_dim == 9
    finputs = AudioInputs(fspec, _table(["a"], frames=True), ["a", "q"])
    assert finputs.inputs["a"].shape == (5, 9) and finputs.inputs["q"].tolist() == [[0.0] * 8 + [1.0]]
    with pytest.raises(DataError, match="have 5 values per utterance; the run was trained on 8"):
        AudioInputs(spec, _table(["a"], dim=5), ["a"])
    with pytest.raises(DataError, match="none of the 2 training utterances has features"):
        fit_spec("csv", 1, _table(["x"]), ["a", "b"])


def test_builder_puts_k_placeholders_before_each_slot(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer, LABELS, audio_tokens=2)
    d = toy_dialogue(3)
    tr = b.build(d, [u.emotion for u in d.utterances])
    pos = [i for i, t in enumerate(tr.input_ids) if t == AUDIO_TOKEN]
    assert len(pos) == 6
    for slot, (a, c) in zip(tr.slots, zip(pos[::2], pos[1::2])):
        assert c == a + 1 and a < slot  # the turn's two soft tokens come before its emotion slot


@pytest.mark.parametrize("frames", [False, True])
def test_streaming_with_audio_equals_full_forward(tiny_tokenizer, frames):
    """Soft tokens through the KV-cached decoder == one whole-transcript forward, also after truncation."""
    torch.manual_seed(0)
    model = make_model(len(tiny_tokenizer), "llama")
    d = toy_dialogue(12)
    ids = [u.utterance_id for u in d.utterances]
    spec = fit_spec("npy", 2, _table(ids, frames=frames), ids)
    inputs = AudioInputs(spec, _table(ids[:-2], frames=frames), ids)  # last two turns without audio
    proj = AudioProjector(spec.in_dim, model.config.hidden_size, 2, frames, target_rms=embedding_rms(model)).eval()
    for budget in (4096, 160):
        builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=budget, max_utterance_tokens=16, audio_tokens=2)
        preds = StreamingTagger(model, builder, "predicted", audio=AudioFeed(inputs, proj)).tag(d)
        if budget == 4096:  # reference: full forward over the transcript with the same written labels
            tr = builder.build(d, [p.label for p in preds])
            with torch.no_grad():
                soft = inputs.soft_tokens(proj, [ids[i] for i in tr.turn_index])
                ref = torch.softmax(slot_logits(model, tr, [x[0] for x in builder.label_ids], soft), -1)
            for p, r in zip(preds, ref):
                assert p.probs == pytest.approx(r.tolist(), abs=1e-4)
        assert len(preds) == 12 and all(sum(p.probs) == pytest.approx(1.0, abs=1e-5) for p in preds)


def test_audio_changes_predictions_and_placeholders_need_soft_tokens(tiny_tokenizer):
    torch.manual_seed(0)
    model = make_model(len(tiny_tokenizer), "llama")
    x = torch.tensor([[5, AUDIO_TOKEN, 7]])
    with pytest.raises(ValueError, match="1 audio positions but 0 soft tokens"):
        embed_ids(model, x, None)
    e = embed_ids(model, x, torch.full((1, model.config.hidden_size), 3.0))
    assert torch.equal(e[0, 1], torch.full((model.config.hidden_size,), 3.0))
    assert torch.equal(e[0, 0], model.get_input_embeddings()(torch.tensor(5)))


def test_audio_model_round_trips_through_a_run_folder(tmp_path, tiny_model):
    """What training saves beside the adapter loads back into the same projector and spec; a folder without
    audio.json is a run trained without audio."""
    ids = ["a", "b", "c"]
    spec = fit_spec("npy", 2, _table(ids), ids)
    saved = AudioModel(spec, AudioProjector(spec.in_dim, tiny_model.config.hidden_size, 2, False).eval())
    saved.save(tmp_path)
    loaded = AudioModel.load(tmp_path, tiny_model.config.hidden_size, "cpu")
    assert loaded.spec == spec and not loaded.projector.training
    inputs = AudioInputs(spec, _table(ids[:2]), ids)
    with torch.no_grad():
        assert torch.equal(saved.feed(inputs).soft_tokens(ids), loaded.feed(inputs).soft_tokens(ids))
    assert AudioModel.load(tmp_path / "none", tiny_model.config.hidden_size, "cpu") is None


def test_speaker_normalisation_removes_a_speakers_offset_and_falls_back_below_the_minimum():
    """Speaker B is speaker A shifted by +10 on every feature: speaker statistics give both the same inputs,
    corpus statistics do not; a speaker with fewer than SPEAKER_MIN_UTTERANCES utterances gets the corpus ones."""
    a = _table([f"a{i}" for i in range(6)])
    vals = dict(a.values) | {f"b{i}": a.values[f"a{i}"] + 10 for i in range(6)} | {"c0": a.values["a0"] + 10}
    table = FeatureTable(a.names, vals, "test")
    ids, who = list(vals), [k[0] for k in vals]
    corpus = AudioInputs(fit_spec("csv", 1, table, ids), table, ids, who)
    spec = fit_spec("csv", 1, table, ids, normalize="speaker")
    inputs = AudioInputs(spec, table, ids, who)
    assert inputs.speaker_normalized == 2  # a and b; c has one utterance
    for i in range(6):
        torch.testing.assert_close(inputs.inputs[f"a{i}"], inputs.inputs[f"b{i}"])
        assert not torch.allclose(corpus.inputs[f"a{i}"], corpus.inputs[f"b{i}"])
    torch.testing.assert_close(inputs.inputs["c0"], corpus.inputs["c0"])
    z = torch.stack([inputs.inputs[f"a{i}"][:8] for i in range(6)])
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)  # the speaker's own z-scores
    with pytest.raises(ValueError, match="needs the speaker of every utterance"):
        AudioInputs(spec, table, ids)


def test_audio_spec_of_older_runs_loads_with_corpus_normalisation(tmp_path):
    ids = ["a", "b", "c"]
    spec = fit_spec("npy", 2, _table(ids), ids, normalize="speaker")
    spec.save(tmp_path / "audio.json")
    assert AudioSpec.load(tmp_path / "audio.json") == spec
    old = json.loads((tmp_path / "audio.json").read_text())
    del old["normalize"]
    (tmp_path / "audio.json").write_text(json.dumps(old))
    assert AudioSpec.load(tmp_path / "audio.json").normalize == "corpus"


def test_live_session_normalises_with_the_speakers_turns_so_far(tiny_model):
    """Engine.soft_tokens: corpus statistics until the speaker has SPEAKER_MIN_UTTERANCES turns with audio,
    then the statistics of all of them, which at that turn equal the split-level speaker statistics."""
    ids = [f"a{i}" for i in range(SPEAKER_MIN_UTTERANCES)]
    table = _table(ids)
    spec = fit_spec("csv", 1, _table(ids, seed=1), ids, normalize="speaker")
    proj = AudioProjector(spec.in_dim, tiny_model.config.hidden_size, 1, False).eval()
    engine = Engine(None, None, LABELS, audio=AudioModel(spec, proj))
    heard: list = []
    live = [engine.soft_tokens(table.values[i], heard) for i in ids]
    assert len(heard) == len(ids)
    split = AudioInputs(spec, table, ids, ["a"] * len(ids))
    corpus = AudioInputs(fit_spec("csv", 1, _table(ids, seed=1), ids), table, ids)
    with torch.no_grad():
        for i, got in zip(ids[:-1], live[:-1]):
            torch.testing.assert_close(got, proj([corpus.inputs[i]])[0])
        torch.testing.assert_close(live[-1], proj([split.inputs[ids[-1]]])[0])


def test_packed_decoding_with_audio_equals_one_dialogue_at_a_time(tiny_tokenizer):
    """Dialogues with audio soft tokens packed into one forward per turn step (batch evaluation, dev passes) get
    the probabilities each gets through its own KV cache, also one over the token budget (shortened as alone)."""
    from erc_llm.decoding import PackedTagger, make_tagger

    torch.manual_seed(0)
    model = make_model(len(tiny_tokenizer), "gemma3")
    ds = [toy_dialogue(n, f"d{n}") for n in (3, 9, 1, 40)]
    ids = [u.utterance_id for d in ds for u in d.utterances]
    spec = fit_spec("csv", 8, _table(ids), ids)
    inputs = AudioInputs(spec, _table(ids[:-3]), ids)  # the last turns without audio
    proj = AudioProjector(spec.in_dim, model.config.hidden_size, 2, False, target_rms=embedding_rms(model)).eval()
    feed = AudioFeed(inputs, proj)
    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=700, max_utterance_tokens=16, audio_tokens=2)
    tagger = make_tagger(model, builder, "predicted", 3, audio=feed)
    assert isinstance(tagger, PackedTagger)
    assert [over_budget(builder, d) for d in ds] == [False, False, False, True]
    ref = [StreamingTagger(model, builder, "predicted", audio=feed).tag(d) for d in ds]
    for r, g in zip(ref, tagger.tag_many(ds)):
        assert [p.label for p in r] == [p.label for p in g]
        for a, b in zip(r, g):
            assert a.probs == pytest.approx(b.probs, abs=1e-4)


def test_packed_rollouts_with_audio_write_what_each_dialogue_alone_writes(tiny_tokenizer):
    """On-policy rollouts of dialogues with audio soft tokens, packed (training's on-policy history): the labels
    each dialogue writes through its own KV cache with the same soft tokens, also over the token budget."""
    from erc_llm.decoding import PackedTagger, rollout

    model = make_sharp_model(len(tiny_tokenizer))
    ds = [toy_dialogue(n, f"d{n}") for n in (3, 9, 1, 40)]
    ids = [u.utterance_id for d in ds for u in d.utterances]
    spec = fit_spec("csv", 8, _table(ids), ids)
    inputs = AudioInputs(spec, _table(ids), ids)
    proj = AudioProjector(spec.in_dim, model.config.hidden_size, 2, False, target_rms=embedding_rms(model)).eval()
    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=700, max_utterance_tokens=16, audio_tokens=2)
    encoded = [builder.encode(d) for d in ds]
    soft = lambda k, t: inputs.soft_tokens(proj, [ds[k].utterances[t].utterance_id])  # noqa: E731
    tagger = PackedTagger(model, builder, batch=2)
    assert [over_budget(builder, d) for d in ds] == [False, False, False, True]
    with torch.inference_mode():
        got = tagger.rollout_many([(e["header"], e["turns"]) for e in encoded], soft)
        alone = [rollout(model, builder, e["header"], e["turns"], lambda t, k=k: soft(k, t))
                 for k, e in enumerate(encoded)]
        silent = tagger.rollout_many([(e["header"], e["turns"]) for e in encoded], lambda k, t: 0 * soft(k, t))
    assert got == alone
    assert got != silent, "the audio soft tokens should change some written label"
