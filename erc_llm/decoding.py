"""Constrained label decoding: at every emotion slot, score only the valid labels.

There is no free-text generation and no parsing: each label is a token sequence; its score is the
model's log-probability of that sequence at the slot (a trie shares common prefixes, so multi-token
labels are exact). A softmax over the label scores gives a probability for every label.

The :class:`StreamingTagger` walks a dialogue turn by turn over one KV cache: every turn costs only its own
tokens, and every dialogue's cache starts from the headers' shared first tokens (task line, label list:
:class:`SharedPrefix`), read once per decoder. What is written into an earlier turn's slot is the model's own
prediction (``history="predicted"``, the default and the honest setting) or, as a clearly marked diagnostic, the
gold label (``history="gold"``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from erc_llm.attention import NAME, RoutedCache, Rows, register
from erc_llm.constants import HISTORY_MODES
from erc_llm.data.schema import Dialogue, Utterance
from erc_llm.heads import decoder_hidden, first_token_ids, label_head, pack, packed_slot_logits
from erc_llm.kvcache import new_cache
from erc_llm.projector import embed_ids
from erc_llm.prompting import Piece, PromptBuilder, fit_window

# The keyword that feeds a KV cache to a forward, and the output field that returns it: transformers 5.24 renamed
# ``past_key_values`` to ``cache`` (the old name warns there and is removed in 5.40); 5.0-5.23 know only the old one.
CACHE_ARG = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


class LabelTrie:
    """Label token sequences organised by shared prefixes."""

    def __init__(self, label_ids: list[list[int]]):
        if len({tuple(ids) for ids in label_ids}) != len(label_ids):
            raise ValueError("two labels tokenize to the same token sequence; they cannot be told apart")
        for a in label_ids:
            for b in label_ids:
                if a is not b and len(a) < len(b) and b[: len(a)] == a:
                    raise ValueError(f"label tokens {a} are a prefix of {b}; the labels are ambiguous at the slot")
        self.label_ids = label_ids
        # proper, non-empty prefixes after which another token must be scored
        self.inner = sorted({tuple(ids[:j]) for ids in label_ids for j in range(1, len(ids))}, key=len)

    @property
    def single_token(self) -> bool:
        return not self.inner

    def sequence_scores(self, logprobs: dict[tuple[int, ...], torch.Tensor]) -> torch.Tensor:
        """Sum of per-token log-probs of every label; ``logprobs[prefix]`` is the distribution after prefix."""
        out = []
        for ids in self.label_ids:
            out.append(sum(logprobs[tuple(ids[:j])][t] for j, t in enumerate(ids)))
        return torch.stack(out)


@dataclass
class TurnPrediction:
    utterance_id: str
    label: str
    probs: list[float]
    state: object = None  # the final hidden state at the turn's slot (float32 numpy), where the decoder has it


def _last_logprobs(model, ids: list[int], cache, soft: torch.Tensor | None = None):
    """Feed ``ids`` after ``cache``; return (log-softmax of the last position's logits, updated cache).

    ``soft`` fills the audio placeholder positions of ``ids`` (see ``erc_llm.projector``)."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    if soft is None:
        out = model(input_ids=x, **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
    else:
        out = model(inputs_embeds=embed_ids(model, x, soft), **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1), out[CACHE_ARG]


def _last_label_logits(model, ids: list[int], cache, columns: list[int], soft: torch.Tensor | None = None):
    """Feed ``ids`` after ``cache``; return (logits of the label tokens at the last position, updated cache).

    For single-token label sets: the softmax over these equals the softmax over the labels' full-vocabulary
    log-probabilities, at a fraction of the cost (no 262k-row LM head). Also returns the slot's final hidden
    state (what a nearest-neighbour memory compares)."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    out = decoder_hidden(model, x, soft, **{CACHE_ARG: cache}, use_cache=True)
    hidden = out.last_hidden_state[0, -1]
    return label_head(model, hidden, columns).float(), out[CACHE_ARG], hidden.float().cpu().numpy()


def score_slot(model, trie: LabelTrie, slot_logprobs: torch.Tensor, cache) -> torch.Tensor:
    """Label log-probabilities at a slot. Multi-token labels extend a copy of the cache, never the original."""
    logprobs = {(): slot_logprobs}
    for prefix in trie.inner:
        lp, _ = _last_logprobs(model, list(prefix), copy.deepcopy(cache))
        logprobs[prefix] = lp
    return trie.sequence_scores(logprobs)


class SharedPrefix:
    """The keys and values of the tokens every dialogue's header starts with (``PromptBuilder.shared_header_ids``:
    BOS, the task line, the label list), computed once and given to every dialogue a decoder starts, so a
    dialogue's first forward carries only its participants and first turn. The tensors are shared, never written:
    every new cache copies them into its own buffers. Valid while the weights do not change (a decoder lives within
    one dev pass, one evaluation or one server)."""

    def __init__(self, model, ids: list[int]):
        window = getattr(model.config, "sliding_window", None)
        self.model, self.ids = model, ids[:window - 1] if window else ids  # a sliding layer keeps window - 1 keys
        self.kv: list = []
        if self.ids:
            with torch.inference_mode():
                cache = new_cache(model.config)
                decoder_hidden(model, torch.tensor([self.ids], device=model.device), **{CACHE_ARG: cache},
                               use_cache=True)
            self.kv = [_cached(cache, layer) for layer in range(len(cache.layers))]

    def start(self, header: list[int]) -> tuple[DynamicCache | None, int]:
        """A new cache holding the longest run of ``header``'s first tokens this prefix has, and its length."""
        n = 0
        for a, b in zip(self.ids, header):
            if a != b:
                break
            n += 1
        if not n:
            return None, 0
        cache = new_cache(self.model.config)
        for layer, (k, v) in enumerate(self.kv):
            cache.update(k[:, :, :n], v[:, :, :n], layer)
        return cache, n


class StreamState:
    """One dialogue in progress: the KV cache of the transcript so far and what is still to feed.

    ``score(utt)`` returns the label probabilities for a new turn; ``commit(label)`` writes the label
    chosen for that turn into the transcript. Used by batch evaluation and by chat sessions.
    """

    def __init__(self, model, builder: PromptBuilder, trie: LabelTrie, header: list[int],
                 prefix: SharedPrefix | None = None):
        """``prefix``: the header's shared first tokens, already in a cache (the forward starts after them)."""
        self.model, self.builder, self.trie = model, builder, trie
        self.header, self.prefix = header, prefix
        self.segments: list[list[int]] = []  # per committed turn: turn tokens + answer tokens
        self.soft: list[torch.Tensor | None] = []  # per committed turn: its audio soft tokens
        self.first_kept = 0  # index into segments of the oldest turn still in the cache
        self.pending: list[int] = self._fresh_cache()
        self.pending_soft: list[torch.Tensor] = []  # soft tokens of audio placeholders in ``pending``
        self.backlog: list[int] = []  # replayed tokens counted in ``cache_len`` but not fed yet
        self.backlog_soft: list[torch.Tensor] = []
        self._turn: list[int] | None = None
        self.max_answer = max(len(ids) for ids in builder.label_ids) + len(builder.suffix_ids)
        self.columns = [ids[0] for ids in trie.label_ids]
        self.slot_state = None  # final hidden state at the last scored slot (single-token label sets)

    def score(self, utt: Utterance, note: str = "", soft: torch.Tensor | None = None) -> torch.Tensor:
        """Label probabilities of a new turn; ``soft`` = its audio soft tokens when the prompt has audio."""
        return self.score_ids(self.builder.turn_ids(utt, note), soft)

    @torch.inference_mode()
    def score_ids(self, turn: list[int], soft: torch.Tensor | None = None) -> torch.Tensor:
        """``score`` for a turn already tokenized by ``PromptBuilder.turn_ids``."""
        feed, feed_soft = self.prepare(turn, soft)
        if self.trie.single_token:
            scores, self.cache, self.slot_state = _last_label_logits(self.model, feed, self.cache, self.columns,
                                                                     feed_soft)
        else:
            slot_lp, self.cache = _last_logprobs(self.model, feed, self.cache, feed_soft)
            scores = score_slot(self.model, self.trie, slot_lp, self.cache)
        return torch.softmax(scores, dim=0)

    def prepare(self, turn: list[int], soft: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor | None]:
        """What the next forward feeds for ``turn`` (replayed turns first) and its soft tokens; after it, the turn
        waits for ``commit``. Used by ``score_ids`` and by :func:`score_batch`."""
        if self._turn is not None:
            raise RuntimeError("score() called twice without commit(); commit a label for the previous turn first")
        feed, parts = self._advance(turn, soft)
        feed = self.backlog + feed  # turns replayed since the last forward go in with this one
        parts = self.backlog_soft + parts
        self.backlog, self.backlog_soft = [], []
        self._turn, self._soft = turn, soft
        return feed, (torch.cat(parts) if parts else None)

    def _advance(self, turn: list[int], soft) -> tuple[list[int], list[torch.Tensor]]:
        """Tokens (and soft-token parts) that bring the cache up to ``turn``'s slot, re-reading a shortened
        transcript when the budget would overflow; counts them as in the cache."""
        feed = self.pending + turn
        parts = self.pending_soft + ([soft] if soft is not None else [])
        if self.cache_len + len(feed) + self.max_answer > self.builder.max_tokens:
            feed = self._rebuild(turn)
            parts = [s for s in self.soft[self.first_kept:] + [soft] if s is not None]
            self.backlog, self.backlog_soft = [], []
        self.cache_len += len(feed)
        return feed, parts

    def _rebuild(self, turn: list[int]) -> list[int]:
        """Drop the oldest turns (keeping the header) so the cache refills to ~3/4 of the budget."""
        kept = self.segments[self.first_kept:]
        lens = [len(s) for s in kept] + [len(turn) + self.max_answer]
        self.first_kept += fit_window(len(self.header), lens, self.builder.max_tokens * 3 // 4)
        return self._fresh_cache() + [t for s in self.segments[self.first_kept:] for t in s] + turn

    def _fresh_cache(self) -> list[int]:
        """Start the cache again (holding the shared prefix, if any); returns the header tokens still to feed."""
        cache, self.cache_len = self.prefix.start(self.header) if self.prefix is not None else (None, 0)
        self.cache = cache if cache is not None else new_cache(self.model.config)
        return self.header[self.cache_len:]

    def replay(self, utt: Utterance, label: str, note: str = "", soft: torch.Tensor | None = None) -> None:
        """Append an already-labelled turn without scoring it (resuming a dialogue): its tokens join what the
        next ``score`` feeds in one forward."""
        if self._turn is not None:
            raise RuntimeError("replay() between score() and commit()")
        turn = self.builder.turn_ids(utt, note)
        feed, parts = self._advance(turn, soft)  # the same truncation points as when the turn was scored
        self.backlog += feed
        self.backlog_soft += parts
        self._turn, self._soft = turn, soft
        self.commit(label)

    def commit(self, label: str) -> None:
        if self._turn is None:
            raise RuntimeError("commit() without a scored turn")
        answer = self.builder.answer_ids(label)
        self.segments.append(self._turn + answer)
        self.soft.append(self._soft)
        self.pending, self.pending_soft, self._turn = answer, [], None

    def restart(self, header: list[int]) -> None:
        """New header (e.g. a chat participant joined): the cache is dropped and the kept turns are re-read
        with the next ``score``."""
        if self._turn is not None:
            raise RuntimeError("restart() between score() and commit()")
        self.header = header
        self.backlog, self.backlog_soft = [], []
        self.pending = self._fresh_cache() + [t for s in self.segments[self.first_kept:] for t in s]
        self.pending_soft = [s for s in self.soft[self.first_kept:] if s is not None]


def _cached(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The keys and values a state's cache holds for ``layer`` (None while empty)."""
    c = cache.layers[layer]
    return (c.keys, c.values) if getattr(c, "is_initialized", False) and c.keys.numel() else None


@torch.inference_mode()
def score_batch(states: list["StreamState"], turns: list[list[int]], softs: list | None = None) -> list[torch.Tensor]:
    """``StreamState.score_ids`` for turns of several dialogues in one forward: the new tokens of every dialogue
    are packed into one sequence (no padding: the weights are read once and every multiplied row is a real token),
    and each token attends only to its own dialogue's cached and new keys (``attention.row_attention``; the model
    is switched to the ``erc_block`` attention, which is sdpa for every other call). Each dialogue's new keys and
    values go back into its own cache exactly as a forward of that dialogue alone would store them, so the
    probabilities equal one-at-a-time scoring up to float rounding. Multi-token label sets and a single state go
    through ``score_ids``."""
    softs = softs or [None] * len(states)
    if len(states) == 1 or not states[0].trie.single_token:
        return [st.score_ids(t, s) for st, t, s in zip(states, turns, softs)]
    if len({id(st) for st in states}) != len(states):
        raise ValueError("a dialogue can have one turn in a batch; score its turns one after another")
    if any(st._turn is not None for st in states):  # checked for all before any state changes
        raise RuntimeError("score() called twice without commit(); commit a label for the previous turn first")
    model = states[0].model
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(register())
    prepared = [st.prepare(t, s) for st, t, s in zip(states, turns, softs)]
    cfg, dev = model.config, model.device
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    widths = [len(f) for f, _ in prepared]
    starts = [st.cache.get_seq_length() for st in states]
    held: dict[str, list[int]] = {}
    for layer, kind in enumerate(types):
        held.setdefault(kind, [0 if x is None else x[0].shape[-2] for x in (_cached(st.cache, layer) for st in states)])
    rows = Rows.build(held, widths, starts, getattr(cfg, "sliding_window", None), dev)
    ids = torch.tensor([[t for f, _ in prepared for t in f]], device=dev)
    pos = torch.tensor([[s + j for s, w in zip(starts, widths) for j in range(w)]], device=dev)
    parts = [x for _, x in prepared if x is not None]
    x = {"input_ids": ids} if not parts else {"inputs_embeds": embed_ids(model, ids, torch.cat(parts))}
    masks = {kind: None for kind in held} if len(held) > 1 else None  # row_attention builds its own
    routed = RoutedCache([st.cache for st in states], rows)  # new keys go straight into each dialogue's cache
    out = model.get_decoder()(**x, position_ids=pos, attention_mask=masks, **{CACHE_ARG: routed}, use_cache=True,
                              erc_rows=rows)
    ends = torch.tensor(widths).cumsum(0)
    hidden = out.last_hidden_state[0, ends - 1]
    probs = torch.softmax(label_head(model, hidden, states[0].columns).float(), dim=-1)
    for st, h in zip(states, hidden.float().cpu().numpy()):
        st.slot_state = h
    return list(probs)


def rollout(model, builder: PromptBuilder, header: list[int], turns: list[list[int]], soft=None) -> list[int]:
    """The labels (indices) the model writes for every turn of a tokenized dialogue (``PromptBuilder.encode``)
    when it labels it turn by turn with its own predictions as history, exactly as at test time; ``soft(i)``
    = turn *i*'s audio soft tokens when the prompt has audio. Used for on-policy history in training: the
    caller puts the model in eval mode."""
    state = StreamState(model, builder, LabelTrie(builder.label_ids), header)
    written = []
    for i, turn in enumerate(turns):
        written.append(int(state.score_ids(turn, soft(i) if soft else None).argmax()))
        state.commit(builder.labels.labels[written[-1]])
    return written


def written_label(history: str, utt: Utterance, predicted: str) -> str:
    """The label written into the transcript for a labelled turn: the prediction, or gold (diagnostic)."""
    if history != "gold":
        return predicted
    if utt.emotion is None:
        raise ValueError(f"history='gold' needs gold labels; utterance {utt.utterance_id} has none")
    return utt.emotion


class StreamingTagger:
    """Label every turn of a dialogue with the constrained decoder over one KV cache.

    With a :class:`~erc_llm.speakers.SpeakerContext`, each speaker's first turn carries their note and
    the labels written for a finished dialogue go into the cross-dialogue memory (so dialogues must
    be tagged in dataset order).
    """

    def __init__(self, model, builder: PromptBuilder, history: str = "predicted", speakers=None, audio=None):
        """``audio``: an AudioFeed when the prompt carries audio soft tokens."""
        if history not in HISTORY_MODES:
            raise ValueError(f"history {history!r} not supported; available = {list(HISTORY_MODES)}")
        self.model, self.builder, self.history, self.speakers = model, builder, history, speakers
        self.audio = audio
        self.trie = LabelTrie(builder.label_ids)
        self.labels = builder.labels

    @functools.cached_property
    def prefix(self) -> SharedPrefix:
        """The headers' shared first tokens in a cache, computed with the first dialogue (the weights do not change
        while a tagger is in use)."""
        return SharedPrefix(self.model, self.builder.shared_header_ids())

    def new_state(self, dialogue: Dialogue) -> StreamState:
        return StreamState(self.model, self.builder, self.trie, self.builder.header_ids(dialogue), self.prefix)

    @torch.inference_mode()
    def tag(self, dialogue: Dialogue, resume: list[TurnPrediction] = (), on_turn=None) -> list[TurnPrediction]:
        """Predictions for every turn. ``resume``: predictions of the first turns from an interrupted run
        (replayed, not scored again); ``on_turn(i, prediction)`` is called after each newly labelled turn."""
        state = self.new_state(dialogue)
        notes = self.speakers.notes(dialogue) if self.speakers else [""] * len(dialogue.utterances)
        preds, written = [], []
        for i, (utt, note) in enumerate(zip(dialogue.utterances, notes)):
            soft = self.audio.soft_tokens([utt.utterance_id]) if self.audio else None
            if i < len(resume):
                written.append(written_label(self.history, utt, resume[i].label))
                state.replay(utt, written[-1], note, soft)
                preds.append(resume[i])
                continue
            probs = state.score(utt, note, soft)
            label = self.labels.labels[int(probs.argmax())]
            written.append(written_label(self.history, utt, label))
            state.commit(written[-1])
            preds.append(TurnPrediction(utt.utterance_id, label, probs.tolist(), state.slot_state))
            if on_turn is not None:
                on_turn(i, preds[-1])
        if self.speakers:
            self.speakers.observe(dialogue, written)
        return preds

    def tag_stream(self, dialogues: list[Dialogue]) -> Iterator[tuple[int, list[TurnPrediction]]]:
        """``(index, predictions)`` of every dialogue, one at a time, in order (a speaker memory needs it)."""
        for k, d in enumerate(dialogues):
            yield k, self.tag(d)


@dataclass
class _InFlight:
    """A dialogue being decoded by :class:`PackedTagger`: its stream and what it has produced so far."""

    k: int  # index into the job list
    state: StreamState
    probs: list = field(default_factory=list)
    slots: list = field(default_factory=list)

    @property
    def t(self) -> int:  # the next turn to score
        return len(self.probs)


class PackedTagger:
    """Continuous batching over dialogues: up to ``batch`` dialogues are in flight, each over its own KV cache
    (a :class:`StreamState`); at every step the next turn of each goes into one packed forward
    (:func:`score_batch`: no padding, each token attends only to its own dialogue), and when a dialogue ends
    the next one waiting takes its place, so the forward stays full until the last dialogues. Each dialogue sees
    exactly what :class:`StreamingTagger` shows it (over-budget transcripts are shortened the same way), while
    the weights are read once per step for all of them (on a CPU, small forwards are bound by reading them).

    Used for batch evaluation, training's dev passes and on-policy rollouts (``rollout_many``) when there is
    no cross-dialogue state (no speaker memory). ``audio``: an AudioFeed when the prompt carries audio soft
    tokens (each turn's, as :class:`StreamingTagger` computes them).
    """

    def __init__(self, model, builder: PromptBuilder, history: str = "predicted", batch: int = 8, audio=None):
        if batch < 1:
            raise ValueError(f"batch {batch}: expected at least 1 dialogue in flight")
        self.single = StreamingTagger(model, builder, history, audio=audio)
        self.model, self.builder, self.history, self.batch, self.audio = model, builder, history, batch, audio
        self.labels = builder.labels

    def tag_stream(self, dialogues: list[Dialogue]) -> Iterator[tuple[int, list[TurnPrediction]]]:
        """``(index, predictions)`` of every dialogue, in the order they finish (a short dialogue started later
        can finish before a long one)."""
        encoded = [(self.builder.header_ids(d), [self.builder.turn_ids(u) for u in d.utterances]) for d in dialogues]
        soft = ((lambda k, t: self.audio.soft_tokens([dialogues[k].utterances[t].utterance_id]))
                if self.audio else None)

        def write(k: int, t: int, label: str) -> str:
            return written_label(self.history, dialogues[k].utterances[t], label)

        for k, probs, slots in self._stream(encoded, write, soft):
            yield k, [TurnPrediction(u.utterance_id, self.labels.labels[int(p.argmax())], p.tolist(), h)
                      for u, p, h in zip(dialogues[k].utterances, probs, slots)]

    def tag_many(self, dialogues: list[Dialogue]) -> list[list[TurnPrediction]]:
        """Predictions of every dialogue, in input order."""
        out: list = [None] * len(dialogues)
        for k, preds in self.tag_stream(dialogues):
            out[k] = preds
        return out

    def rollout_many(self, dialogues: list[tuple[list[int], list[list[int]]]], soft=None) -> list[list[int]]:
        """:func:`rollout` of several tokenized dialogues ``(header, turns)`` (``PromptBuilder.encode``) decoded
        together; ``soft(k, t)``: the audio soft tokens of dialogue *k*'s turn *t* when the prompt has audio.
        On-policy history in training: the caller puts the model in eval mode."""
        out: list = [None] * len(dialogues)
        for k, probs, _ in self._stream(dialogues, lambda k, t, label: label, soft):
            out[k] = [int(p.argmax()) for p in probs]
        return out

    @torch.inference_mode()
    def _stream(self, encoded: list[tuple[list[int], list[list[int]]]], write, soft=None):
        """Yields ``(k, probs, slot_states)`` per tokenized dialogue ``(header, turns)`` as it finishes; after
        dialogue *k*'s turn *t* the label ``write(k, t, predicted)`` goes into its transcript."""
        waiting = iter(range(len(encoded)))
        live: list[_InFlight] = []
        while True:
            while len(live) < self.batch and (k := next(waiting, None)) is not None:
                if not encoded[k][1]:
                    yield k, [], []
                    continue
                state = StreamState(self.model, self.builder, self.single.trie, encoded[k][0], self.single.prefix)
                live.append(_InFlight(k, state))
            if not live:
                return
            turns = [encoded[x.k][1][x.t] for x in live]
            probs = score_batch([x.state for x in live], turns, [soft(x.k, x.t) for x in live] if soft else None)
            for x, p in zip(live, probs):
                x.state.commit(write(x.k, x.t, self.labels.labels[int(p.argmax())]))
                x.slots.append(x.state.slot_state)
                x.probs.append(p)
            for x in live:
                if x.t == len(encoded[x.k][1]):
                    yield x.k, x.probs, x.slots
            live = [x for x in live if x.t < len(encoded[x.k][1])]


class LookaheadTagger:
    """Offline labelling of finished dialogues by a model trained with look-ahead: one forward over the whole
    text-only transcript, in which the slot of every turn also attends to the next ``turns`` turns (as in
    training; :func:`erc_llm.attention.lookahead_masks`). Several dialogues share a forward (packed, each
    seeing only itself). Labels are scored by their first token, as training scores them (distinct for every
    label; exact when each label is one token). A dialogue longer than the token budget is scored in pieces
    from its end: each piece is the longest run of turns that fits, and keeps the ``turns`` turns after the
    last turn it scores, so every turn is scored once with its look-ahead.
    """

    history = "none"  # a look-ahead transcript carries no labels of earlier turns

    def __init__(self, model, builder: PromptBuilder, turns: int, batch: int = 8, group_tokens: int | None = None):
        if builder.write_labels:
            raise ValueError("look-ahead needs a text-only transcript (label_history: false): a slot that sees later "
                             "turns would also see the labels written after them")
        if turns < 1:
            raise ValueError(f"turns {turns}: expected >= 1 (0 is an online model; use StreamingTagger)")

        self.model, self.builder, self.turns, self.batch = model, builder, turns, batch
        self.group_tokens = group_tokens or builder.max_tokens
        self.labels = builder.labels
        self.columns = first_token_ids(builder)

    @property
    def single(self) -> "LookaheadTagger":
        return self

    def pieces(self, dialogue: Dialogue) -> list[Piece]:
        """Transcripts covering every turn once with its look-ahead, latest first (as training cuts them)."""
        enc = self.builder.encode(dialogue)
        return self.builder.pieces(enc["header"], enc["turns"], [0] * len(enc["turns"]), self.turns)

    def tag_stream(self, dialogues: list[Dialogue]) -> Iterator[tuple[int, list[TurnPrediction]]]:
        """``(index, predictions)`` of every dialogue, ``batch`` dialogues per :meth:`tag_many` call."""
        for k in range(0, len(dialogues), self.batch):
            for j, preds in enumerate(self.tag_many(dialogues[k:k + self.batch])):
                yield k + j, preds

    def tag(self, dialogue: Dialogue, resume: list[TurnPrediction] = (), on_turn=None) -> list[TurnPrediction]:
        """Predictions for every turn (one forward; ``resume``'s predictions are kept, ``on_turn`` is called
        for the others, as :meth:`StreamingTagger.tag` does)."""
        preds = list(resume) + self.tag_many([dialogue])[0][len(resume):]
        if on_turn is not None:
            for i in range(len(resume), len(preds)):
                on_turn(i, preds[i])
        return preds

    @torch.inference_mode()
    def tag_many(self, dialogues: list[Dialogue]) -> list[list[TurnPrediction]]:
        jobs = [(i, piece) for i, d in enumerate(dialogues) for piece in self.pieces(d)]
        probs: dict = {}
        for group in pack([len(piece.transcript.input_ids) for _, piece in jobs], self.group_tokens):
            logits = packed_slot_logits(self.model, [jobs[j][1].transcript for j in group], self.columns,
                                        lookahead=self.turns)
            for j, lg in zip(group, logits):
                i, piece = jobs[j]
                p = torch.softmax(lg.float(), dim=-1)
                for row, t, scored in zip(p, piece.transcript.turn_index, piece.scored()):
                    if scored:
                        probs[(i, t)] = row
        out = []
        for i, d in enumerate(dialogues):
            rows = [probs[(i, t)] for t in range(len(d.utterances))]
            out.append([TurnPrediction(u.utterance_id, self.labels.labels[int(p.argmax())], p.tolist())
                        for u, p in zip(d.utterances, rows)])
        return out


def make_tagger(model, builder: PromptBuilder, history: str = "predicted", batch: int = 1, speakers=None,
                audio=None, lookahead: int = 0):
    """The decoder for a model: a LookaheadTagger (``lookahead`` > 0), a PackedTagger (``batch`` > 1, no speaker
    memory) or a StreamingTagger. ``audio``: an AudioFeed when the prompt carries audio soft tokens."""
    if lookahead:
        return LookaheadTagger(model, builder, lookahead, max(batch, 1))
    if batch > 1 and speakers is None:
        return PackedTagger(model, builder, history, batch, audio=audio)
    return StreamingTagger(model, builder, history, speakers, audio)
