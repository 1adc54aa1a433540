"""Chat-style emotion queries: feed a live conversation turn by turn, ask how each speaker feels.

    from erc_llm.session import ERCSession
    s = ERCSession.from_run()                     # the shipped model; or a run folder; zero_shot=True: bare backbone
    s.add_turn("Ross", "We were on a break!")     # -> TurnResult(label='anger', probs={...})
    s.speaker_summary("Ross")

An :class:`Engine` (backbone + adapter, prompt builder, speaker store, audio projector) is loaded once
and shared; each :class:`ERCSession` owns one dialogue's KV cache (``decoding.StreamState``), so a
turn costs only its own tokens. The prompt is the one the run was trained with: the header lists the
participants (given up front, or as they appear; a newcomer re-reads the transcript once), speaker
notes precede each speaker's first turn, and the model's own labels are written for earlier turns.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from erc_llm import audio as A
from erc_llm.constants import SERVE_MAX_BATCH
from erc_llm.data.jsonl import parse_dialogue
from erc_llm.data.schema import DataError, Dialogue, LabelSet, Utterance
from erc_llm.data.text import normalize_speaker, normalize_text
from erc_llm.decoding import LabelTrie, SharedPrefix, StreamState, score_batch
from erc_llm.projector import model_input, speaker_normalizer
from erc_llm.run import SHIPPED, load
from erc_llm.stages import combine


@dataclass
class TurnResult:
    index: int
    speaker: str
    text: str
    label: str
    probs: dict[str, float]
    used: str = "text"  # what the distribution is made of: the adapter's text reading and each stage applied

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return sorted(self.probs.items(), key=lambda kv: -kv[1])[:k]


class Batcher:
    """Turns of different dialogues scored together: a worker thread takes the turns that are waiting (and those
    arriving within ``window_ms`` of the first), up to ``max_batch``, and scores them in one batched forward
    (``decoding.score_batch``: each dialogue keeps its own KV cache); each caller gets its own turn's
    probabilities as soon as that forward ends. A dialogue has at most one turn in flight (its session waits
    for the answer), so every dialogue's turns keep their order. Under load the window costs nothing: turns
    queue while a forward runs and go together in the next one."""

    def __init__(self, window_ms: float = 2.0, max_batch: int = SERVE_MAX_BATCH):
        if window_ms < 0 or max_batch < 1:
            raise ValueError(f"batching window {window_ms} ms / max batch {max_batch}: expected >= 0 ms and >= 1 turn")
        self.window, self.max_batch = window_ms / 1000, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.sizes: Counter = Counter()  # batch size -> forwards run (what /health reports)
        self.busy = 0.0  # seconds spent in forwards
        self.thread = threading.Thread(target=self._run, name="erc-llm-batcher", daemon=True)
        self.thread.start()

    def score(self, state, turn: list[int], soft=None) -> torch.Tensor:
        """The probabilities of ``turn`` for the dialogue of ``state`` (``StreamState.score_ids``, batched)."""
        if not self.thread.is_alive():
            raise RuntimeError("the batching engine has stopped")
        done: Future = Future()
        self.queue.put((state, turn, soft, done))
        return done.result()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _take(self) -> list | None:
        first = self.queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.window
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self.sizes[len(batch)] += 1
            t = time.perf_counter()
            try:
                probs = score_batch([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch])
            except BaseException as e:  # every waiting caller gets the error, the worker keeps serving
                for *_, done in batch:
                    done.set_exception(e)
                continue
            finally:
                self.busy += time.perf_counter() - t
            for (*_, done), p in zip(batch, probs):
                done.set_result(p)


@dataclass
class Engine:
    """Everything a session needs that is shared and read-only: load once, serve many dialogues."""

    model: object
    builder: object
    labels: LabelSet
    speakers: object = None  # SpeakerContext (its cross-dialogue memory is updated when a dialogue ends)
    audio: object = None  # AudioModel (projector + feature spec) of a run trained with audio
    name: str = ""
    trie: object = None  # LabelTrie of the builder's labels
    stages: object = None  # erc_llm.stages.Stages (memory, fusion, calibration) of the run, if fitted
    dataset: str = ""  # the corpus the run was trained on ("" for a bare backbone)
    dtype: str = "float32"  # the compute dtype the backbone runs in
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward at a time on the shared model
    batcher: Batcher | None = None  # set by ``start_batching``: concurrent sessions' turns share forwards
    prefix: SharedPrefix | None = None  # the headers' shared first tokens, in a cache every new dialogue starts from
    busy: float = 0.0  # seconds spent in one-turn forwards under the lock (the batcher counts its own)

    @classmethod
    def load(cls, run: str | Path | None = None, model: str = "", labels: LabelSet | None = None,
             dtype: str = "auto", threads: int = 0, zero_shot: bool = False, stages: bool = True) -> "Engine":
        """``run``: a run folder or shipped name (default: the shipped model); ``zero_shot=True``: the bare
        ``model`` backbone with ``labels`` (default MELD's); ``stages=False``: the adapter alone, without the
        run's memory, fusion and calibration."""
        if run and zero_shot:
            raise ValueError("give a run or zero_shot=True, not both")
        torch.set_num_threads(threads or os.cpu_count() or 1)
        p = load(None if zero_shot else (run or SHIPPED), model=model, dtype=dtype, labels=labels)
        if p.context != "online":
            seen = f"the next {p.lookahead} turns at every slot" if p.lookahead else "the whole dialogue's text first"
            raise ValueError(f"model {p.name} was trained with {p.context} context ({seen}); a live session only knows "
                             "the turns so far: use a model trained with context: online and lookahead: 0")
        return cls(p.model, p.builder, p.labels, p.speakers, p.audio, p.name, LabelTrie(p.builder.label_ids),
                   p.stages if stages else None, p.spec.dataset if p.spec else "", p.dtype,
                   prefix=SharedPrefix(p.model, p.builder.shared_header_ids()))

    def start_batching(self, window_ms: float = 2.0, max_batch: int = SERVE_MAX_BATCH) -> None:
        """Score the turns of concurrent sessions in batched forwards (see :class:`Batcher`); for servers."""
        if self.batcher is None:
            self.batcher = Batcher(window_ms, max_batch)

    def score(self, state, utt: Utterance, note: str, soft) -> torch.Tensor:
        """A turn's adapter probabilities: through the batching engine when it runs, else under the engine lock."""
        if self.batcher is not None:
            return self.batcher.score(state, self.builder.turn_ids(utt, note), soft)
        with self.lock:
            t = time.perf_counter()
            try:
                return state.score(utt, note, soft)
            finally:
                self.busy += time.perf_counter() - t

    @property
    def forward_seconds(self) -> float:
        """Seconds the model has spent scoring turns since it loaded: over a load, how busy the model was."""
        return self.busy + (self.batcher.busy if self.batcher is not None else 0.0)

    def soft_tokens(self, audio, heard: list | None = None) -> torch.Tensor | None:
        """Soft tokens of one turn: ``audio`` = a wav path (features extracted as in training), a feature
        vector / frame array, or None (the "no audio" input). ``heard``: the feature rows of this speaker's
        earlier turns; this turn's row is appended, and a model trained with speaker normalisation
        standardises with all of them once there are enough (before that, with the corpus statistics)."""
        if self.audio is None:
            if audio is not None and not self.hears_audio:
                raise ValueError("this model was trained without audio; add turns without audio")
            return None

        spec, projector = self.audio.spec, self.audio.projector
        raw = None if audio is None else self._features(spec, audio)
        if raw is not None and heard is not None and spec.normalize == "speaker":
            heard.append(raw)
        norm = speaker_normalizer(spec, heard) if heard else None
        with torch.inference_mode():
            return projector([model_input(spec, raw, norm).to(next(projector.parameters()).device)])[0]

    @property
    def hears_audio(self) -> bool:
        """Whether a turn's audio is used: by the LLM's soft tokens or by the fusion classifier."""
        c = self.stages.classifier if self.stages is not None else None
        return self.audio is not None or (c is not None and c.spec is not None)

    def finish(self, probs: torch.Tensor, slot_state, listener, speaker: str, text: str, audio) -> tuple[np.ndarray, str]:
        """The final distribution of a turn from the adapter's ``probs`` and the run's stages (as batch
        evaluation computes it), and what it used."""
        st = self.stages
        llm = probs.numpy()[None]
        if st is None:
            return llm[0], "text" + (" + audio" if audio is not None and self.audio is not None else "")
        memory = st.memory_probs(slot_state[None]) if st.memory is not None and slot_state is not None else None
        clf, used = None, ["text"]
        if st.classifier is not None:
            c = st.classifier
            raw = self._features(c.spec, audio) if (audio is not None and c.spec is not None) else None
            emb = st.embed([text])[0] if c.text_encoder else None
            clf = c.probabilities(listener.turn(speaker, raw, emb))
            used.append("audio" if raw is not None else "no audio (text only)" if c.spec is not None else "")
        final = combine(llm, memory, clf, st.settings)["calibrated"][0]
        return final, " + ".join(x for x in used if x) + (f"; {', '.join(st.names)}" if st.names else "")

    @staticmethod
    def _features(spec, audio) -> np.ndarray:
        if isinstance(audio, (str, Path)):
            if tuple(spec.names) == A.PROSODY_FEATURES:
                return A.praat_prosody(A.read_wav(audio))
            if len(spec.names) == 88 and spec.names[0].startswith("F0semitone"):
                return A.egemaps(A.read_wav(audio))
            raise ValueError(f"this run uses {spec.source} features ({spec.feature_dim} values) that cannot be computed "
                             "from a wav here; pass the feature vector instead")
        x = np.asarray(audio, dtype=np.float32)
        if x.shape[-1] != spec.feature_dim or x.ndim != (2 if spec.frames else 1):
            want = f"(T, {spec.feature_dim})" if spec.frames else f"({spec.feature_dim},)"
            raise ValueError(f"audio features have shape {x.shape}; this run expects {want} ({spec.source})")
        return x


class ERCSession:
    """One live dialogue. Not thread-safe by itself; the HTTP server keeps one lock per session."""

    def __init__(self, engine: Engine, participants: list[str] | None = None, dialogue_id: str = "chat"):
        self.engine = engine
        self.dialogue_id = dialogue_id
        self._initial = list(participants or [])
        self.heard: dict[str, list] = {}  # speaker -> audio feature rows of their turns so far, across dialogues
        self.listener = engine.stages.listener() if engine.stages is not None else None  # the fusion's inputs
        self.reset(observe=False)

    @classmethod
    def from_run(cls, run: str | Path | None = None, participants: list[str] | None = None, **kw) -> "ERCSession":
        """A session on a run folder or shipped model (default: the shipped model); ``zero_shot=True`` and
        ``model=...`` for the bare backbone."""
        return cls(Engine.load(run, **kw), participants)

    # ------------------------------------------------------------------------------- dialogue

    def reset(self, observe: bool = True, participants: list[str] | None = None) -> None:
        """Start a new dialogue (the finished one's predicted labels go into the speaker memory); ``participants``:
        the new dialogue's speakers known up front (default: those the session was created with)."""
        if observe and getattr(self, "turns", None) and self.engine.speakers is not None:
            self.engine.speakers.observe(self._dialogue(), [t.label for t in self.turns])
        if participants is not None:
            self._initial = list(participants)
        self.participants = list(self._initial)
        self.turns: list[TurnResult] = []
        self.state = None
        if self.listener is not None:
            self.listener.start_dialogue()  # running per-speaker audio statistics carry over

    def _dialogue(self) -> Dialogue:
        return Dialogue(self.dialogue_id, [Utterance(t.speaker, t.text, None, f"{self.dialogue_id}_{t.index}")
                                           for t in self.turns])

    def _header(self) -> list[int]:
        utts = [Utterance(p, "", None, "") for p in self.participants]
        return self.engine.builder.header_ids(Dialogue(self.dialogue_id, utts))

    def add_turn(self, speaker: str, text: str, audio=None) -> TurnResult:
        """Label a new turn; returns the label and the probability of every label."""
        speaker, text = normalize_speaker(speaker), normalize_text(text)
        if not speaker or not text:
            raise ValueError(f"a turn needs a speaker and text; got speaker={speaker!r}, text={text!r}")
        e = self.engine
        soft = e.soft_tokens(audio, self.heard.setdefault(speaker, []))
        first = speaker not in {t.speaker for t in self.turns}
        note = e.speakers.note(speaker, [text]) if (first and e.speakers is not None) else ""
        utt = Utterance(speaker, text, None, f"{self.dialogue_id}_{len(self.turns)}")
        if speaker not in self.participants:
            self.participants.append(speaker)
            if self.state is not None:
                self.state.restart(self._header())
        if self.state is None:
            self.state = StreamState(e.model, e.builder, e.trie, self._header(), e.prefix)
        probs = e.score(self.state, utt, note, soft)
        self.state.commit(e.labels.labels[int(probs.argmax())])  # what batch evaluation writes
        final, used = e.finish(probs, self.state.slot_state, self.listener, speaker, text, audio)
        label = e.labels.labels[int(np.argmax(final))]
        result = TurnResult(len(self.turns), speaker, text, label,
                            {lab: round(float(p), 6) for lab, p in zip(e.labels.labels, final.tolist())}, used)
        self.turns.append(result)
        return result

    # -------------------------------------------------------------------------------- queries

    def history(self) -> list[TurnResult]:
        return list(self.turns)

    def speaker_summary(self, name: str) -> dict:
        """Their emotions so far in this dialogue, and what the speaker store knows about them."""
        own = [t for t in self.turns if t.speaker == name]
        if not own and name not in self.participants:
            known = sorted({t.speaker for t in self.turns} | set(self.participants))
            raise KeyError(f"speaker {name!r} has not spoken in this dialogue; speakers so far = {known}")
        out = {"speaker": name, "turns": len(own), "emotions": [t.label for t in own],
               "counts": dict(Counter(t.label for t in own)), "last": own[-1].label if own else None,
               "last_probs": own[-1].probs if own else None, "biography": None, "earlier_emotions": None}
        ctx = self.engine.speakers
        if ctx is not None:
            p = ctx.store.get(name)
            out["biography"] = p.bio if p is not None else ctx.note(name, [t.text for t in own]) or None
            if name in ctx.memory:
                out["earlier_emotions"] = list(ctx.memory[name])
        return out

    def to_jsonl_row(self) -> dict:
        """This dialogue in the generic JSONL format, with the predicted labels as emotions."""
        return {"dialogue_id": self.dialogue_id, "utterances": [
            {"speaker": t.speaker, "text": t.text, "emotion": t.label, "probabilities": t.probs} for t in self.turns]}


def load_dialogue_file(path: str | Path) -> list[tuple[str, str]]:
    """(speaker, text) turns of the first dialogue in a generic-format JSONL file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a .jsonl file holding one dialogue per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected a .jsonl file of dialogues") from None
    n, line = next(((i, ln) for i, ln in enumerate(lines, 1) if ln.strip()), (0, ""))
    if not n:
        raise DataError(f"{path}: empty; expected one JSON object per line (a dialogue)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
    problems: list[str] = []
    d = parse_dialogue(obj, f"{path}, line {n}", None, problems)
    if problems:
        raise DataError(f"{len(problems)} problem(s); nothing was added:\n" + "\n".join(problems[:10]))
    return [(u.speaker, u.text) for u in d.utterances]


__all__ = ["ERCSession", "Engine", "TurnResult", "load_dialogue_file"]
