"""What turns an adapter's slot state into the final label distribution: a nearest-neighbour memory of the
training slots, late fusion with a classical text + audio classifier, and a calibration temperature.

Each stage is fitted on a run's train split after the adapter is selected, its settings chosen on dev only,
and saved in the run folder (``stages/``, no pickle: a faiss index, ``.npz`` arrays and JSON) with the settings
in ``run.json`` (``RunSpec.stages``). For one turn, with ``p_llm`` the constrained decoder's distribution:

    p_mem   = softmax over the k nearest training slots' labels (cosine similarity / temperature)
    p_1     = (1 - λ) p_llm + λ p_mem                                  memory
    p_2     ∝ p_1 · p_clf ** w                                         fusion (p_clf: the classifier's)
    p_final = softmax(log p_2 / T)                                     calibration (argmax unchanged)

Everything a turn uses is known when the turn is spoken, so the same code labels a live conversation turn by
turn (``erc_llm.session``) and a finished split (``erc_llm.evaluate``): the memory reads the slot state of the
decoder that scored the turn, and the classifier's audio inputs are z-scored with the speaker's statistics of
the turns heard so far (running statistics, this turn included; fewer than
``projector.SPEAKER_MIN_UTTERANCES`` turns: the training corpus's). ``stage_stats="split"`` is the offline
mode of research scripts: every speaker's statistics over the whole split, later turns included.

Stages need an online run without speaker notes or audio soft tokens (the fusion classifier hears the audio
instead). A run that writes earlier turns' labels into its transcript writes the adapter's own label there, in
training's slot-state pass, in batch evaluation and in a live session alike; the stages change what is reported,
never what the transcript carries, so each turn's slot state is the same wherever the run is used.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from erc_llm.audio import load_source
from erc_llm.constants import DECODE_BATCH
from erc_llm.data.schema import DataError, Dialogue, dialogues_digest
from erc_llm.io import atomic_dir, cache_root, content_digest, progress, sha256_file
from erc_llm.speakers import encoder_path

log = logging.getLogger(__name__)
STAGES_DIR = "stages"
NEIGHBOURS = (8, 32, 128)
MEMORY_TEMPERATURES = (0.01, 0.03, 0.1)
LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
FUSION_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
CODECS = ("fp16", "pq")
STAGE_STATS = ("online", "split")
STEPS = ("adapter", "memory", "fusion", "calibrated")  # the distributions reported per stage, in order


class StageError(ValueError):
    """A stage that cannot be fitted or applied; the message says what to change."""


def stage_problems(context: str, lookahead: int, speakers: bool, audio: bool) -> list[str]:
    """Why a run cannot carry stages (empty: it can)."""
    p = []
    if speakers:
        p.append("it writes speaker-memory notes")
    if audio:
        p.append("it reads audio soft tokens (the fusion classifier hears the audio instead)")
    if context != "online" or lookahead:
        p.append(f"its context is offline ({'look-ahead' if lookahead else context})")
    return p


# ------------------------------------------------------------------------------------------------- memory

def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


@dataclass
class Memory:
    """Training slot states (unit vectors, in a faiss index compressed as ``codec``) and their gold labels."""

    index: object
    labels: np.ndarray  # (N,) label indices
    n_labels: int
    codec: str = "fp16"

    @classmethod
    def fit(cls, states: np.ndarray, labels: np.ndarray, n_labels: int, codec: str = "fp16") -> "Memory":
        import faiss  # heavy; only where a faiss index is used

        if codec not in CODECS:
            raise StageError(f"memory codec {codec!r} not supported; available = {list(CODECS)}")
        x = unit(states)
        d = x.shape[1]
        if codec == "fp16":
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:  # product quantisation: d/8 bytes per slot (a MELD memory fits the shipped-model budget)
            m = next(m for m in (d // 8, d // 10, d // 16, 16, 8, 4, 2, 1) if m and d % m == 0)
            bits = max(1, min(8, int(np.log2(max(len(x), 2)))))  # k-means needs as many slots as centroids
            index = faiss.IndexPQ(d, m, bits, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.add(x)
        return cls(index, np.asarray(labels, dtype=np.int64), n_labels, codec)

    def distribution(self, states: np.ndarray, k: int, temperature: float) -> np.ndarray:
        """(n, L): label distribution of each state's k nearest slots, weighted by softmax(similarity / T)."""
        q = unit(np.atleast_2d(states))
        k = min(k, self.index.ntotal)
        sims, idx = self.index.search(q, k)
        w = np.exp((sims - sims[:, :1]) / temperature)
        out = np.zeros((len(q), self.n_labels))
        np.add.at(out, (np.repeat(np.arange(len(q)), k), self.labels[idx].ravel()), w.ravel())
        return out / out.sum(axis=1, keepdims=True)

    def save(self, directory: Path) -> None:
        import faiss  # heavy; only where a faiss index is used

        faiss.write_index(self.index, str(directory / "memory.faiss"))
        np.save(directory / "memory_labels.npy", self.labels)

    @classmethod
    def load(cls, directory: Path, n_labels: int, codec: str) -> "Memory":
        import faiss  # heavy; only where a faiss index is used

        index = faiss.read_index(str(directory / "memory.faiss"))
        labels = np.load(directory / "memory_labels.npy", allow_pickle=False)
        if index.ntotal != len(labels) or (len(labels) and labels.max() >= n_labels):
            raise StageError(f"{directory}: memory index and labels disagree ({index.ntotal} slots, {len(labels)} "
                             "labels); the run folder is damaged — fit the stages again")
        return cls(index, labels, n_labels, codec)


# ------------------------------------------------------------------------------------------------- fusion

@dataclass
class Classifier:
    """Multinomial logistic regression over [audio inputs | earlier turns' voice | sentence embedding], saved as
    arrays; ``spec`` = the audio inputs' :class:`~erc_llm.projector.AudioSpec` (None: text only)."""

    coef: np.ndarray  # (L, F), rows in the run's label order
    intercept: np.ndarray  # (L,)
    spec: object
    audio_context: int
    text_encoder: str

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        z = np.atleast_2d(x) @ self.coef.T + self.intercept
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def save(self, directory: Path) -> None:
        np.savez(directory / "fusion.npz", coef=self.coef, intercept=self.intercept)
        if self.spec is not None:
            self.spec.save(directory / "fusion_audio.json")

    @classmethod
    def load(cls, directory: Path, audio_context: int, text_encoder: str) -> "Classifier":
        from erc_llm.projector import AudioSpec  # loads torch; importing this module must not

        arrays = np.load(directory / "fusion.npz", allow_pickle=False)
        spec = AudioSpec.load(directory / "fusion_audio.json") if (directory / "fusion_audio.json").is_file() else None
        return cls(arrays["coef"], arrays["intercept"], spec, audio_context, text_encoder)


class Listener:
    """The classifier's inputs of one turn after another: running per-speaker audio statistics (kept across
    dialogues, like a session's), the voice of the dialogue's earlier turns, the turn's sentence embedding."""

    def __init__(self, classifier: Classifier, split_norms: dict | None = None):
        """``split_norms``: speaker -> Normalizer over the whole split (the offline mode); None = running."""
        self.c, self.split_norms = classifier, split_norms
        self.heard: dict[str, list[np.ndarray]] = {}
        self.start_dialogue()

    def start_dialogue(self) -> None:
        self.rows: dict[str, list[np.ndarray]] = {}  # speaker -> audio inputs of their turns in this dialogue
        self.last: list[tuple[str, np.ndarray]] = []

    def audio_input(self, speaker: str, raw: np.ndarray | None) -> np.ndarray:
        from erc_llm.projector import speaker_normalizer  # loads torch; importing this module must not

        spec = self.c.spec
        if raw is not None and raw.ndim == 2:  # frame-level features: the utterance's mean frame
            raw = np.nanmean(raw, axis=0)
        if self.split_norms is not None:
            norm = self.split_norms.get(speaker)
        else:
            if raw is not None and spec.normalize == "speaker":
                self.heard.setdefault(speaker, []).append(raw)
            norm = speaker_normalizer(spec, self.heard.get(speaker, []))
        return (norm or spec.normalizer).features(raw, spec.feature_dim)

    def turn(self, speaker: str, raw: np.ndarray | None, text: np.ndarray | None) -> np.ndarray:
        parts = []
        if self.c.spec is not None:
            x = self.audio_input(speaker, raw)
            parts.append(x)
            if self.c.audio_context:
                own = self.rows.get(speaker, [])
                parts.append(np.mean(own[-self.c.audio_context:], axis=0) if own else np.zeros_like(x))
                other = [r for s, r in self.last if s != speaker]
                parts.append(other[-1] if other else np.zeros_like(x))
                self.rows.setdefault(speaker, []).append(x)
                self.last.append((speaker, x))
        if self.c.text_encoder:
            parts.append(np.asarray(text, dtype=np.float32))
        return np.concatenate(parts).astype(np.float32)


def split_normalizers(spec, table, dialogues: list[Dialogue]) -> dict:
    """speaker -> statistics of all their utterances with audio in the split (the offline mode)."""
    from erc_llm.projector import speaker_normalizer  # loads torch; importing this module must not

    rows: dict[str, list[np.ndarray]] = {}
    for d in dialogues:
        for u in d.utterances:
            raw = table.values.get(u.utterance_id) if table is not None else None
            if raw is not None:
                rows.setdefault(u.speaker, []).append(np.nanmean(raw, axis=0) if raw.ndim == 2 else raw)
    return {s: n for s, r in rows.items() if (n := speaker_normalizer(spec, r)) is not None}


def text_encoder(name: str):
    from sentence_transformers import SentenceTransformer  # heavy; only where sentences are encoded

    return SentenceTransformer(encoder_path(name), device="cpu")


def split_features(classifier: Classifier, dialogues: list[Dialogue], table, texts: dict | None,
                   stage_stats: str = "online") -> np.ndarray:
    """(n, F) classifier inputs of every utterance of a split, in spoken order (dialogues in the given order)."""
    norms = split_normalizers(classifier.spec, table, dialogues) if stage_stats == "split" and classifier.spec else None
    listener = Listener(classifier, norms)
    out = []
    for d in dialogues:
        listener.start_dialogue()
        for u in d.utterances:
            raw = table.values.get(u.utterance_id) if table is not None else None
            out.append(listener.turn(u.speaker, raw, texts[u.utterance_id] if texts else None))
    return np.stack(out)


# ------------------------------------------------------------------------------------------------- mixing

def log_clip(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-12, None))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def combine(llm: np.ndarray, memory: np.ndarray | None, clf: np.ndarray | None, settings: dict) -> dict[str, np.ndarray]:
    """Every stage's distribution (``STEPS``) for rows of ``llm`` (and the memory's / classifier's), as set in
    ``settings`` (``RunSpec.stages``); a stage that is off passes its input on."""
    out = {"adapter": llm}
    p = llm
    if memory is not None and settings.get("memory"):
        lam = settings["memory"]["lambda"]
        p = (1 - lam) * p + lam * memory
    out["memory"] = p
    if clf is not None and settings.get("fusion"):
        p = softmax(log_clip(p) + settings["fusion"]["weight"] * log_clip(clf))
    out["fusion"] = p
    out["calibrated"] = softmax(log_clip(p) / settings.get("temperature", 1.0))
    return out


# ------------------------------------------------------------------------------------------------ metrics

def calibration(gold: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error (top label, ``bins`` equal-width confidence bins, in %), NLL and the bins."""
    conf, hit = probs.max(axis=1), (probs.argmax(axis=1) == gold).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(hit[m].mean() - conf[m].mean())
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(m.sum()),
                          "accuracy": float(hit[m].mean()), "confidence": float(conf[m].mean())})
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(gold)), gold], 1e-12, None))))
    return {"ece": 100 * float(ece), "nll": nll, "bins": table}


def choose_temperature(gold: np.ndarray, probs: np.ndarray) -> float:
    """The temperature minimising dev NLL (bounded to [0.05, 20])."""
    from scipy.optimize import minimize_scalar  # heavy; only when fitting

    logp = log_clip(probs)

    def nll(log_t):
        q = softmax(logp / np.exp(log_t))
        return -np.mean(np.log(np.clip(q[np.arange(len(gold)), gold], 1e-12, None)))

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def weighted_f1(gold: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import f1_score  # heavy; only when fitting

    return 100 * f1_score(gold, probs.argmax(axis=1), average="weighted", labels=range(probs.shape[1]), zero_division=0)


# ------------------------------------------------------------------------------------------------- bundle

@dataclass
class Stages:
    """A run's fitted stages and their settings (``RunSpec.stages``), loaded once and shared."""

    settings: dict
    memory: Memory | None = None
    classifier: Classifier | None = None
    encoder: object = field(default=None, repr=False)  # the sentence encoder (loaded on first use)
    files: list = field(default_factory=list)  # the stage files read (their content is in ``digest``)

    @property
    def names(self) -> list[str]:
        return [n for n, on in (("memory", self.memory), ("fusion", self.classifier)) if on is not None] + \
               (["calibration"] if self.settings.get("temperature", 1.0) != 1.0 else [])

    def memory_probs(self, states) -> np.ndarray | None:
        if self.memory is None or states is None:
            return None
        m = self.settings["memory"]
        return self.memory.distribution(np.asarray(states, np.float32), m["k"], m["temperature"])

    def embed(self, texts: list[str]) -> np.ndarray:
        if self.encoder is None:
            self.encoder = text_encoder(self.classifier.text_encoder)
        return self.encoder.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)

    def listener(self) -> Listener | None:
        return Listener(self.classifier) if self.classifier is not None else None

    def digest(self) -> str:
        """Content of the stage files and settings (part of a resumable evaluation's fingerprint)."""
        return content_digest(self.settings, *[sha256_file(f) for f in sorted(self.files)])[:16]

    def save(self, run: Path) -> None:
        with atomic_dir(run / STAGES_DIR) as tmp:
            if self.memory is not None:
                self.memory.save(tmp)
            if self.classifier is not None:
                self.classifier.save(tmp)

    @classmethod
    def load(cls, run: Path, settings: dict | None, n_labels: int) -> "Stages | None":
        if not settings:
            return None
        d = run / STAGES_DIR
        try:
            memory = Memory.load(d, n_labels, settings["memory"]["codec"]) if settings.get("memory") else None
            f = settings.get("fusion")
            classifier = Classifier.load(d, f["audio_context"], f["text_encoder"]) if f else None
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise StageError(f"{d}: cannot read the stages run.json names ({e}); the run folder is damaged — fit "
                             "the stages again (train.py --resume true) or restore the folder") from None
        return cls(settings, memory, classifier, files=sorted(d.iterdir()) if d.is_dir() else [])


# ------------------------------------------------------------------------------------------- batch pipeline

@dataclass
class SplitInputs:
    """What the stages read for one split, in spoken order."""

    gold: np.ndarray  # (n,) label index, -1 = unlabelled
    llm: np.ndarray  # (n, L) the adapter's distribution
    states: np.ndarray | None  # (n, H) slot states (for the memory)


NO_AUDIO = SimpleNamespace(values={})  # a split without audio features: every turn gets the "no audio" input


def audio_table(source: str, directory: str | Path, split: str):
    return load_source(source, directory, split)


def split_texts(stages_or_encoder, dialogues: list[Dialogue]) -> dict[str, np.ndarray]:
    utts = [u for d in dialogues for u in d.utterances]
    emb = stages_or_encoder([u.text for u in utts])
    return {u.utterance_id: e for u, e in zip(utts, emb)}


def apply(stages: Stages, dialogues: list[Dialogue], llm: np.ndarray, memory: np.ndarray | None, table,
          stage_stats: str = "online") -> dict[str, np.ndarray]:
    """Every stage's distribution for a split's utterances (dialogues in the given order, which is the order
    running statistics follow); ``table``: the split's audio features (None: the fusion stage is skipped)."""
    clf = None
    if stages.classifier is not None and (table is not None or stages.classifier.spec is None):
        texts = split_texts(stages.embed, dialogues) if stages.classifier.text_encoder else None
        clf = stages.classifier.probabilities(split_features(stages.classifier, dialogues, table, texts, stage_stats))
    settings = stages.settings if clf is not None else {**stages.settings, "fusion": None}
    return combine(llm, memory, clf, settings)


def fit_classifier(train: list[Dialogue], gold: np.ndarray, table, spec, audio_context: int, encoder_name: str,
                   embed, stage_stats: str = "online") -> Classifier:
    from sklearn.linear_model import LogisticRegression  # heavy; only when fitting

    shell = Classifier(np.zeros(0), np.zeros(0), spec, audio_context, encoder_name)
    texts = split_texts(embed, train) if encoder_name else None
    x = split_features(shell, train, table, texts, stage_stats)
    keep = gold >= 0
    n_labels = int(gold.max()) + 1
    missing = sorted(set(range(n_labels)) - set(gold[keep].tolist()))
    if missing:
        raise StageError(f"labels {missing} never occur in train; the fusion classifier needs examples of every label")
    clf = LogisticRegression(max_iter=5000, class_weight="balanced").fit(x[keep], gold[keep])
    return Classifier(clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64), spec, audio_context,
                      encoder_name)


def choose_memory(memory: Memory, dev: SplitInputs, grid=(NEIGHBOURS, MEMORY_TEMPERATURES, LAMBDAS)) -> tuple[dict, list]:
    """(k, temperature, λ) with the best dev weighted F1 (ties: smaller λ, larger k, smaller temperature)."""
    scored = dev.gold >= 0
    rows = []
    for k, t in itertools.product(grid[0], grid[1]):
        knn = memory.distribution(dev.states, k, t)
        for lam in grid[2]:
            f1 = weighted_f1(dev.gold[scored], ((1 - lam) * dev.llm + lam * knn)[scored])
            rows.append({"k": k, "temperature": t, "lambda": lam, "dev_weighted_f1": f1})
    best = max(rows, key=lambda g: (g["dev_weighted_f1"], -g["lambda"], g["k"], -g["temperature"]))
    return {"k": best["k"], "temperature": best["temperature"], "lambda": best["lambda"]}, rows


def choose_fusion_weight(gold: np.ndarray, base: np.ndarray, clf: np.ndarray, weights=FUSION_WEIGHTS) -> tuple[float, list]:
    scored = gold >= 0
    curve = [{"weight": w, "dev_weighted_f1": weighted_f1(gold[scored], softmax(log_clip(base) + w * log_clip(clf))[scored])}
             for w in weights]
    return max(curve, key=lambda c: (c["dev_weighted_f1"], -c["weight"]))["weight"], curve


def stage_report(gold: np.ndarray, steps: dict[str, np.ndarray]) -> dict:
    """Per stage: weighted F1, ECE and NLL on the labelled rows."""
    scored = gold >= 0
    return {name: {"weighted_f1": weighted_f1(gold[scored], p[scored]),
                   **{k: v for k, v in calibration(gold[scored], p[scored]).items() if k != "bins"}}
            for name, p in steps.items()}


def log_report(report: dict) -> None:
    for split in ("dev", "test"):
        if split in report.get("steps", {}):
            log.info("%s: %s", split, ", ".join(f"{n} {m['weighted_f1']:.2f} (ECE {m['ece']:.1f})"
                                                   for n, m in report["steps"][split].items()))


def check_audio_dir(directory: str | Path, source: str) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise DataError(f"fusion audio folder {str(directory)!r} is not a folder; expected the {source} features of "
                        "each split (pass --audio-dir, or evaluate without fusion: --stages false)")
    return path


def describe(settings: dict | None) -> str:
    """One line for outputs and model cards."""
    if not settings:
        return "adapter alone"
    parts = []
    if settings.get("memory"):
        m = settings["memory"]
        parts.append(f"memory of {m['slots']} training slots (k {m['k']}, T {m['temperature']}, λ {m['lambda']}, {m['codec']})")
    if settings.get("fusion"):
        f = settings["fusion"]
        audio = f["audio_source"] != "none"
        hears = " + ".join(x for x in (audio and f"{f['audio_source']} audio",
                                       audio and f["audio_context"] and f"{f['audio_context']} earlier turns' voice",
                                       f["text_encoder"] and f"{f['text_encoder']} text") if x)
        parts.append(f"fusion with a {hears} classifier (w {f['weight']})")
    parts.append(f"temperature {settings.get('temperature', 1.0):.3f}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------- fitting

def slot_inputs(p, dialogues: list[Dialogue], desc: str) -> SplitInputs:
    """The adapter's distribution and slot state at every turn of ``dialogues``, from the decoder evaluation
    uses (packed where dialogues fit the token budget, streamed with truncation otherwise); cached by the content
    of the adapter, prompts and dialogues, so fitting other stages for the same adapter reads them back."""
    adapter = sorted((p.run_dir / "adapter").glob("*")) if p.run_dir else []
    key = content_digest("slots-v1", p.manifest.get("sha256"), [sha256_file(f) for f in adapter],
                         p.builder.templates.version, p.builder.max_tokens, p.builder.max_utterance_tokens,
                         p.labels.labels, dialogues_digest(dialogues))[:16]
    path = cache_root() / "features" / f"slots-{key}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        return SplitInputs(z["gold"], z["llm"], z["states"] if z["states"].size else None)
    out = _slot_inputs(p, dialogues, desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, gold=out.gold, llm=out.llm, states=out.states if out.states is not None else np.zeros(0))
    os.replace(tmp, path)
    return out


def _slot_inputs(p, dialogues: list[Dialogue], desc: str) -> SplitInputs:
    tagger = p.tagger("predicted", batch=DECODE_BATCH)
    preds: list = [None] * len(dialogues)
    for k, ps in progress(tagger.tag_stream(dialogues), total=len(dialogues), desc=desc, unit="dialogue"):
        preds[k] = ps
    turns = [t for ts in preds for t in ts]
    gold = np.array([p.labels.index(u.emotion) if u.emotion is not None else -1 for d in dialogues for u in d.utterances])
    states = None if any(t.state is None for t in turns) else np.stack([t.state for t in turns]).astype(np.float32)
    return SplitInputs(gold, np.array([t.probs for t in turns]), states)


def fit(p, data: dict[str, list[Dialogue]], opts) -> tuple[Stages, dict]:
    """Fit the stages ``opts`` (a :class:`~erc_llm.config.StageOptions`) asks for on ``data`` (train, dev and
    test dialogues) for the adapter of predictor ``p``; every setting is chosen on dev, test is only reported.
    Returns the stages and a report: per split and stage the weighted F1, ECE and NLL, the dev grids."""
    problems = stage_problems(p.context, p.lookahead, p.speakers is not None, p.audio is not None)
    if problems:
        raise StageError(f"model {p.name}: stages need an online run without speaker notes or audio soft tokens; "
                         + "; ".join(problems))
    if opts.memory and any(len(ids) != 1 for ids in p.builder.label_ids):
        raise StageError(f"labels {list(p.labels.labels)}: the memory reads the slot state of single-token label "
                         "sets; this tokenizer splits some labels into several tokens")
    n_labels = len(p.labels.labels)
    inputs = {s: slot_inputs(p, d, f"slot states {s}") for s, d in data.items()}
    settings: dict = {"chosen_on": "dev"}
    report: dict = {}
    stages = Stages(settings)
    mem = {s: None for s in inputs}
    if opts.memory:
        train = inputs["train"]
        keep = train.gold >= 0
        stages.memory = Memory.fit(train.states[keep], train.gold[keep], n_labels, opts.memory_codec)
        chosen, report["memory_grid"] = choose_memory(stages.memory, inputs["dev"])
        settings["memory"] = {**chosen, "slots": int(keep.sum()), "codec": opts.memory_codec}
        mem = {s: stages.memory_probs(i.states) for s, i in inputs.items()}
    clf = {s: None for s in inputs}
    if opts.fusion:
        clf, report["classifier"] = _fit_fusion(stages, data, inputs, opts)
        base = combine(inputs["dev"].llm, mem["dev"], None, settings)["memory"]
        weight, report["fusion_curve"] = choose_fusion_weight(inputs["dev"].gold, base, clf["dev"])
        settings["fusion"] = {"weight": weight, "audio_source": opts.fusion_audio_source,
                              "audio_dir": str(Path(opts.fusion_audio_dir).resolve()) if opts.fusion_audio_dir else "",
                              "audio_context": opts.fusion_audio_context, "text_encoder": opts.fusion_text_encoder,
                              "stage_stats": opts.stage_stats}
    settings["temperature"] = 1.0
    if opts.calibrate:
        dev = inputs["dev"]
        final = combine(dev.llm, mem["dev"], clf["dev"], settings)["fusion"]
        settings["temperature"] = choose_temperature(dev.gold[dev.gold >= 0], final[dev.gold >= 0])
    report["steps"] = {s: stage_report(inputs[s].gold, combine(inputs[s].llm, mem[s], clf[s], settings))
                       for s in ("dev", "test") if s in inputs and (inputs[s].gold >= 0).any()}
    report["settings"] = settings
    return stages, report


def _fit_fusion(stages: Stages, data, inputs, opts) -> tuple[dict, dict]:
    """Fit the classifier on train (online statistics); its probabilities on every split and its own scores."""
    from erc_llm.projector import fit_spec  # loads torch; importing this module must not

    tables, spec = {s: None for s in data}, None
    if opts.fusion_audio_source != "none":
        check_audio_dir(opts.fusion_audio_dir, opts.fusion_audio_source)
        tables = {s: audio_table(opts.fusion_audio_source, opts.fusion_audio_dir, s) for s in data}
        ids = [u.utterance_id for d in data["train"] for u in d.utterances]
        spec = fit_spec(opts.fusion_audio_source, 1, tables["train"], ids, "speaker")
    stages.encoder = text_encoder(opts.fusion_text_encoder) if opts.fusion_text_encoder else None
    stages.classifier = fit_classifier(data["train"], inputs["train"].gold, tables["train"], spec,
                                       opts.fusion_audio_context, opts.fusion_text_encoder, stages.embed,
                                       opts.stage_stats)
    clf, own = {}, {}
    for s, d in data.items():
        texts = split_texts(stages.embed, d) if opts.fusion_text_encoder else None
        clf[s] = stages.classifier.probabilities(split_features(stages.classifier, d, tables[s], texts,
                                                                opts.stage_stats))
        g = inputs[s].gold
        if (g >= 0).any() and s != "train":
            own[s] = {"weighted_f1": weighted_f1(g[g >= 0], clf[s][g >= 0]),
                      "without_audio": sum(u.utterance_id not in tables[s].values for x in d for u in x.utterances)
                      if tables[s] is not None else None}
    return clf, own
