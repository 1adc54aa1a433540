import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erc_llm.heads import first_token_ids, packed_slot_outputs, slot_logits
from erc_llm.prompting import PromptBuilder
from erc_llm.training.losses import SlotBank, class_weights, label_loss, supervised_contrastive
from erc_llm.training.objective import batch_pieces, corrupt_history, long_dialogue_report
from tests.conftest import LABELS, toy_dialogue


def test_class_weights_normalised_and_ordered():
    counts = [470, 163, 40, 22]
    for mode in ("inverse", "sqrt_inverse"):
        w = class_weights(counts, mode)
        assert float((w * torch.tensor(counts, dtype=torch.float)).sum() / sum(counts)) == pytest.approx(1.0, rel=1e-5)
        assert torch.all(w[:-1] < w[1:])  # rarer classes weigh more
    assert torch.allclose(class_weights(counts, "none"), torch.ones(4))
    with pytest.raises(ValueError, match="available"):
        class_weights(counts, "balanced")


def test_label_loss_matches_cross_entropy_and_focal_downweights_easy():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])
    assert label_loss(logits, targets, None, 0.0) == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-5)
    assert label_loss(logits, targets, w, 0.0) == pytest.approx(float(F.cross_entropy(logits, targets, weight=w)), rel=1e-5)
    easy = torch.tensor([[5.0, 0, 0, 0]])
    hard = torch.tensor([[0.0, 0, 0, 0]])
    t = torch.tensor([0])
    ratio_ce = label_loss(easy, t, None, 0) / label_loss(hard, t, None, 0)
    ratio_focal = label_loss(easy, t, None, 2.0) / label_loss(hard, t, None, 2.0)
    assert ratio_focal < ratio_ce / 10


def test_label_smoothing_matches_torch_and_keeps_a_confident_model_from_zero_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    want = F.cross_entropy(logits, targets, label_smoothing=0.1)
    assert label_loss(logits, targets, None, 0.0, 0.1) == pytest.approx(float(want), rel=1e-5)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])
    per = F.cross_entropy(logits, targets, reduction="none", label_smoothing=0.1)  # the slot's class weight weighs it all
    assert label_loss(logits, targets, w, 0.0, 0.1) == pytest.approx(float((w[targets] * per).sum() / w[targets].sum()), rel=1e-5)
    sure = torch.tensor([[30.0, 0, 0, 0]])
    assert label_loss(sure, torch.tensor([0]), None, 0.0) < 1e-6
    assert label_loss(sure, torch.tensor([0]), None, 0.0, 0.1) > 2.0  # 0.1 x mean(30) over the wrong labels


def test_corrupt_history():
    rng = np.random.default_rng(0)
    gold = [0, 1, 2, 3] * 250
    assert corrupt_history(gold, 0.0, np.array([0.25] * 4), rng) == gold
    prior = np.array([0.0, 0.0, 1.0, 0.0])
    assert corrupt_history(gold, 1.0, prior, rng) == [2] * 1000
    noisy = corrupt_history(gold, 0.3, np.array([1.0, 0, 0, 0]), rng)
    changed = sum(a != b for a, b in zip(noisy, gold)) / len(gold)
    assert 0.17 < changed < 0.28  # 30% replaced, a quarter of those by the same label
    assert corrupt_history([-1, -1], 0.0, prior, rng) == [2, 2]  # unlabelled turns still get a label


def test_slot_logits_equal_full_forward(tiny_tokenizer, tiny_model):
    b = PromptBuilder(tiny_tokenizer, LABELS)
    d = toy_dialogue(4)
    tr = b.build(d, [u.emotion for u in d.utterances])
    firsts = first_token_ids(b)
    got = slot_logits(tiny_model, tr, firsts)
    full = tiny_model(input_ids=torch.tensor([tr.input_ids])).logits[0]
    assert torch.allclose(got, full[tr.slots][:, firsts], atol=1e-5)


def test_packed_slot_outputs_give_the_slots_last_layer_states(tiny_tokenizer, tiny_model):
    b = PromptBuilder(tiny_tokenizer, LABELS)
    trs = [b.build(d, [u.emotion for u in d.utterances]) for d in (toy_dialogue(3, "a"), toy_dialogue(4, "b"))]
    firsts = first_token_ids(b)
    out = packed_slot_outputs(tiny_model, trs, firsts, states=True)
    for tr, lg, st in zip(trs, out.logits, out.states):
        alone = tiny_model(input_ids=torch.tensor([tr.input_ids]), output_hidden_states=True)
        assert torch.allclose(lg, alone.logits[0][tr.slots][:, firsts], atol=1e-4)
        assert torch.allclose(st, alone.hidden_states[-1][0][tr.slots], atol=1e-4)
    assert packed_slot_outputs(tiny_model, trs, firsts).states is None


def test_supervised_contrastive_matches_its_definition_and_uses_the_bank():
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    empty = torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)
    got = supervised_contrastive(z, labels, *empty, temperature=0.5)
    sim = z @ z.T / 0.5  # rows are unit vectors already
    # anchors 0 and 1 have one positive each (each other); anchor 2 has none and is left out
    want = -0.5 * sum(sim[i, j] - torch.logsumexp(sim[i][torch.arange(3) != i], 0) for i, j in ((0, 1), (1, 0)))
    assert got == pytest.approx(float(want), rel=1e-5)
    # a slot alone with its label in the step finds its partner in the bank of earlier slots
    lonely = supervised_contrastive(z[2:], labels[2:], torch.tensor([[0.1, 1.0], [1.0, 0.0]]), torch.tensor([1, 0]), 0.5)
    assert lonely > 0 and supervised_contrastive(z[2:], labels[2:], *empty, 0.5) == 0
    # pulling towards same-label slots: the loss is lower when the labels follow the geometry
    assert supervised_contrastive(z, torch.tensor([0, 1, 0]), *empty, 0.5) > got


def test_slot_bank_keeps_the_latest_slots():
    bank = SlotBank(3)
    assert bank.view(2)[0].shape == (0, 2)
    bank.push(torch.ones(2, 2, requires_grad=True), torch.tensor([0, 1]))
    bank.push(torch.zeros(2, 2), torch.tensor([2, 3]))
    z, labels = bank.view(2)
    assert labels.tolist() == [1, 2, 3] and z.tolist() == [[1, 1], [0, 0], [0, 0]] and not z.requires_grad


def test_first_token_clash_is_reported(tiny_tokenizer):
    from erc_llm.data.schema import LabelSet

    b = PromptBuilder(tiny_tokenizer, LabelSet("x", ("excited", "excitedly")))
    if b.label_ids[0][0] == b.label_ids[1][0]:
        with pytest.raises(ValueError, match="start with the same token"):
            first_token_ids(b)
    else:
        assert len(set(first_token_ids(b))) == 2


@pytest.mark.parametrize("mode", ["none", "sqrt_inverse"])
def test_a_dialogue_cut_into_pieces_weighs_as_its_turns_together(tiny_tokenizer, mode):
    """Each piece's loss times its share sums to the (class-)weighted mean loss over all the dialogue's
    labelled turns, as if it had been one transcript; a dialogue that fits has one piece of share 1."""
    d = toy_dialogue(40)
    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=200, max_utterance_tokens=24)
    row = builder.encode(d)
    row["labels"][3] = -1  # an unlabelled turn (context only) counts in no share
    weights = None if mode == "none" else class_weights([5, 1, 2, 3, 1, 1, 4], mode)
    jobs = batch_pieces(builder, [row], [[max(x, 0) for x in row["labels"]]], weights)
    assert len(jobs) > 2 and sum(share for _, _, share in jobs) == pytest.approx(1.0)
    logits = torch.randn(40, len(LABELS), generator=torch.Generator().manual_seed(0))
    target = torch.tensor(row["labels"])
    keep = target >= 0
    whole = label_loss(logits[keep], target[keep], weights, 0.0)
    parts = 0.0
    for _, piece, share in jobs:
        t = torch.tensor(piece.targets(row["labels"]))
        idx = torch.tensor(piece.transcript.turn_index)[t >= 0]
        parts = parts + share * label_loss(logits[idx], t[t >= 0], weights, 0.0)
    torch.testing.assert_close(parts, whole)
    short = builder.encode(toy_dialogue(4, "d2"))
    assert [(k, share) for k, _, share in batch_pieces(builder, [short, row], [short["labels"], row["labels"]],
                                                         weights)][0] == (0, 1.0)


def test_the_training_log_says_how_many_dialogues_are_cut(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, LABELS, max_tokens=200, max_utterance_tokens=24)
    data = [builder.encode(toy_dialogue(40, "long")), builder.encode(toy_dialogue(3, "short"))]
    msg = long_dialogue_report(builder, data)
    assert msg.startswith("1 of 2 training dialogues exceed max_tokens 200") and "of 43 turns" in msg
    assert long_dialogue_report(builder, data[1:]).startswith("every training dialogue fits")
