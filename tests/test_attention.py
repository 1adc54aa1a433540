"""Block attention and packed training forwards give the same logits and gradients as one masked sdpa
forward per dialogue (tiny Gemma 3 with a sliding window shorter than the dialogues, and Llama)."""

import pytest
import torch

from erc_llm import attention
from erc_llm.heads import first_token_ids, pack, packed_slot_logits, slot_logits
from erc_llm.prompting import PromptBuilder
from tests.conftest import LABELS, make_model, toy_dialogue


def _transcripts(tok, lengths):
    b = PromptBuilder(tok, LABELS, max_tokens=100_000)
    out = []
    for n in lengths:
        d = toy_dialogue(n)
        out.append(b.build(d, [u.emotion for u in d.utterances]))
    return b, out


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_block_attention_equals_sdpa_logits_and_grads(tiny_tokenizer, monkeypatch, arch):
    monkeypatch.setattr(attention, "BLOCK", 16)  # several blocks, and a window (24) that spans two of them
    b, (tr,) = _transcripts(tiny_tokenizer, [12])
    assert len(tr.input_ids) > 4 * attention.BLOCK
    firsts = first_token_ids(b)
    results = []
    for impl in ("sdpa", attention.register()):
        model = make_model(len(tiny_tokenizer), arch).train()
        model.set_attn_implementation(impl)
        logits = slot_logits(model, tr, firsts)
        logits.float().logsumexp(-1).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (ref, ref_g), (got, got_g) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref_g.keys() == got_g.keys()
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("impl", ["sdpa", "block"])
def test_packed_forward_equals_one_forward_per_dialogue(tiny_tokenizer, monkeypatch, impl):
    monkeypatch.setattr(attention, "BLOCK", 16)
    b, trs = _transcripts(tiny_tokenizer, [5, 9, 3])
    model = make_model(len(tiny_tokenizer), "gemma3")
    model.set_attn_implementation(attention.register() if impl == "block" else "sdpa")
    firsts = first_token_ids(b)
    with torch.no_grad():
        alone = [slot_logits(model, tr, firsts) for tr in trs]
        packed = packed_slot_logits(model, trs, firsts)
    assert [p.shape for p in packed] == [a.shape for a in alone]
    for p, a in zip(packed, alone):
        torch.testing.assert_close(p, a, rtol=1e-4, atol=1e-4)


def test_block_attention_falls_back_for_cached_decoding(tiny_tokenizer):
    """With a KV cache (queries shorter than keys) the call goes to sdpa: decoding is unchanged."""
    from erc_llm.decoding import StreamingTagger

    b = PromptBuilder(tiny_tokenizer, LABELS)
    d = toy_dialogue(6)
    ref = make_model(len(tiny_tokenizer), "gemma3")
    got = make_model(len(tiny_tokenizer), "gemma3")
    got.set_attn_implementation(attention.register())
    for p, q in zip(StreamingTagger(ref, b).tag(d), StreamingTagger(got, b).tag(d)):
        assert p.label == q.label
        torch.testing.assert_close(torch.tensor(p.probs), torch.tensor(q.probs), rtol=1e-5, atol=1e-6)


def test_pack_groups_consecutive_items_within_budget():
    assert pack([100, 200, 300, 50], 400) == [[0, 1], [2, 3]]
    assert pack([500, 100], 400) == [[0], [1]]  # longer than the budget: alone
    assert pack([10, 10, 10], 0) == [[0], [1], [2]]


def test_lookahead_mask_lets_each_slot_see_the_next_turns_and_nothing_else():
    # two packed transcripts: slots at 1, 3, 5 (6 tokens) and at 1, 3 (4 tokens); one turn of look-ahead
    m = attention.lookahead_masks([6, 4], [[1, 3, 5], [1, 3]], 1)
    assert m.shape == (10, 10)
    text = [0, 2, 4]
    assert m[1].nonzero().flatten().tolist() == [0, 1, 2]  # slot of turn 0: its text, itself, turn 1's text
    assert m[3].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # turn 1: earlier slot too, turn 2's text
    assert m[5].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]  # the last turn has nothing after it
    for q in text:  # text is causal and never sees a slot (what a slot saw ahead cannot flow back through it)
        assert m[q].nonzero().flatten().tolist() == [k for k in text if k <= q]
    assert not m[:6, 6:].any() and not m[6:, :6].any()  # packed transcripts never see each other
    assert m[7].nonzero().flatten().tolist() == [6, 7, 8]


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_block_attention_equals_sdpa_with_lookahead_masks(tiny_tokenizer, monkeypatch, arch):
    """Look-ahead masks let queries see keys after their block: block attention widens its band to them."""
    monkeypatch.setattr(attention, "BLOCK", 16)
    b, trs = _transcripts(tiny_tokenizer, [10, 4])
    b.write_labels = False
    trs = [b.build(toy_dialogue(n), [u.emotion for u in toy_dialogue(n).utterances]) for n in (10, 4)]
    firsts = first_token_ids(b)
    results = []
    for impl in ("sdpa", attention.register()):
        model = make_model(len(tiny_tokenizer), arch).train()
        model.set_attn_implementation(impl)
        logits = packed_slot_logits(model, trs, firsts, lookahead=2)
        torch.cat(logits).float().logsumexp(-1).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(([x.detach() for x in logits], grads))
    (ref, ref_g), (got, got_g) = results
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-5, msg=n)
