"""Export a trained run as a standard PEFT adapter folder with its prompts and a model card; package the
shipped model.

    erc-llm export --run runs/meld_seed0 --out my_model/            # any run, or a shipped model's name
    python eval/package_model.py --run runs/meld_seed0 --data-dir ../shared/data/meld   # the shipped model

The folder loads with plain transformers + peft (``PeftModel.from_pretrained(backbone, DIR)``) and is also a
run folder erc-llm reads (``--run DIR``): ``adapter_config.json`` and ``adapter_model.safetensors`` (also under
``adapter/``), ``run.json``, ``prompts/``, ``README.md``. Shipped models also hold ``reference.json``: the
fp32 label probabilities of the first MELD dev dialogues recorded at packaging time, and the adapter's sha256.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import yaml

from erc_llm.config import TrainConfig
from erc_llm.io import atomic_dir, atomic_write_json, claim_output, mark_output, sha256_file
from erc_llm.options import defaults
from erc_llm.run import RunSpec, load, resolve, write_checksums
from erc_llm.stages import STAGES_DIR, describe

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
REFERENCE = "reference.json"
RUN_LOCATION = ("data_dir", "out", "resume", "overwrite")  # where a run is, not what it learns


def _write_adapter(src: Path, dst: Path, dtype: str) -> None:
    import torch  # loads torch; importing this module must not
    from safetensors.torch import load_file, save_file  # loads torch; importing this module must not

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if dtype == "bfloat16":
        tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    for extra in ("projector.pt", "audio.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)


def export(run: str | Path, out: str | Path, dtype: str = "float32", card: str = "") -> Path:
    """Write ``out`` (atomically): PEFT adapter at the top level and under ``adapter/``, run.json, prompts,
    speaker store (if the run has one) and a model card (``card`` or a generated one)."""
    src = resolve(run)
    spec = RunSpec.read(src)
    if spec.finetune != "lora":
        raise ValueError(f"run {src} was trained with finetune: {spec.finetune}; export packages LoRA adapters only "
                         "(a fully fine-tuned run is used in place: --run " + str(src) + ")")
    missing = [f for f in ADAPTER_FILES if not (src / "adapter" / f).is_file()]
    if missing:
        raise FileNotFoundError(f"run {src} has no adapter/{missing[0]}; expected a run folder written by "
                                "erc_llm/train.py")
    claim_output(out, "export", inputs=[src])
    with atomic_dir(out) as tmp:
        mark_output(tmp, "export")
        _write_adapter(src / "adapter", tmp / "adapter", dtype)
        for f in ADAPTER_FILES:
            shutil.copy(tmp / "adapter" / f, tmp / f)
        spec.write(tmp)
        shutil.copytree(src / "prompts", tmp / "prompts")
        if (src / "speaker_store").is_dir():
            shutil.copytree(src / "speaker_store", tmp / "speaker_store", symlinks=False)
        if spec.stages:  # memory index, classifier arrays; their settings are in run.json
            shutil.copytree(src / STAGES_DIR, tmp / STAGES_DIR)
            if (src / "stages.json").is_file():
                shutil.copy(src / "stages.json", tmp / "stages.json")
        (tmp / "README.md").write_text(card or model_card(spec, name=Path(out).name, metrics=run_metrics(src)),
                                       encoding="utf-8")
        write_checksums(tmp)  # every load of the exported folder checks these
    return Path(out)


def run_metrics(run: Path) -> dict:
    """Dev (best.json) and test metrics (eval/test_*) a training run recorded, where present."""
    out = {}
    if (run / "best.json").is_file():
        out["dev"] = json.loads((run / "best.json").read_text())
    for history in ("predicted", "gold"):
        f = run / "eval" / f"test_{history}" / "metrics.json"
        if f.is_file():
            out[f"test_{history}"] = json.loads(f.read_text())
    return out


def _metric_rows(m: dict) -> list[str]:
    return [f"| weighted F1 | {m['weighted_f1']:.2f} |", f"| WA (accuracy) | {m['accuracy']:.2f} |",
            f"| UA (balanced accuracy) | {m['unweighted_accuracy']:.2f} |", f"| macro F1 | {m['macro_f1']:.2f} |"]


def model_card(spec: RunSpec, name: str, metrics: dict, extra: str = "") -> str:
    """A model card from the run's spec and recorded metrics."""
    lines = [f"# {name}", "",
             f"LoRA adapter for `{spec.model}` (erc-llm) labelling the emotion of every turn of a conversation as one of: "
             f"{', '.join(spec.labels)}.", "",
             f"- Prompt: templates in `prompts/` (version {spec.prompt_version}), context "
             f"**{f'offline** (each slot also sees the next {spec.lookahead} turns; batch labelling only)' if spec.lookahead else spec.context + '**'}, "
             f"earlier turns' labels {'written into the transcript' if spec.label_history else 'not written (text-only history)'}, "
             f"token budget {spec.max_tokens}, utterances cut at {spec.max_utterance_tokens} tokens.",
             f"- Features: text{', speaker notes' if spec.speakers else ''}{', audio soft tokens' if spec.audio else ''}.",
             f"- Trained on `{spec.dataset}` with backbone weights in {spec.train_dtype or 'float32'}.",
             f"- Stages after the adapter: {describe(spec.stages)}." + (
                 " For each turn: p = (1 − λ)·p_adapter + λ·p_memory (the k nearest training slots' labels), then "
                 "p ∝ p · p_classifier^w, then softmax(log p / T); the memory index and the classifier's arrays are in "
                 "`stages/` (erc-llm applies them; plain PEFT loading gives the adapter alone)." if spec.stages else ""),
             ""]
    test = metrics.get("test_predicted")
    if test:
        gold = metrics.get("test_gold")
        lines += ["## Test metrics", "", "| metric | value |", "|---|---|", *_metric_rows(test), "",
                  "| class | P | R | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {c['precision']:.2f} | {c['recall']:.2f} | {c['f1']:.2f} | {c['support']} |"
                  for k, c in test["per_class"].items()]
        if gold:
            lines += ["", f"With gold labels written for earlier turns (a diagnostic, not a result): weighted F1 "
                          f"{gold['weighted_f1']:.2f}."]
    dev = metrics.get("dev")
    if dev:
        d = dev["dev_predicted"]
        lines += ["", f"Selected on dev (step {dev['step']}): weighted F1 {d['weighted_f1']:.2f}, WA {d['accuracy']:.2f}, "
                      f"UA {d['unweighted_accuracy']:.2f}, macro F1 {d['macro_f1']:.2f}."]
    return "\n".join(lines + ([extra] if extra else [])) + "\n"


def train_command(config: dict, base_config: str) -> str:
    """The ``erc_llm/train.py`` command that reproduces a run's ``config.yaml`` (``config``): ``--config
    base_config`` plus one flag for every field whose value differs from that file (or from the schema's default
    where the file does not set it); data and output folders are left as ``DATA`` and ``RUN``."""
    base = defaults(TrainConfig)
    base.update(yaml.safe_load(Path(base_config).read_text()) or {})
    flags = []
    for key, value in config.items():
        if key in RUN_LOCATION or base.get(key) == value:
            continue
        text = (",".join(map(str, value)) if isinstance(value, list) else
                str(value).lower() if isinstance(value, bool) else str(value))
        flags.append(f"--{key.replace('_', '-')} {shlex.quote(text)}")
    return " ".join(["accelerate launch --config_file configs/accelerate/cpu.yaml erc_llm/train.py --config",
                     base_config, "--data-dir DATA --out RUN", *flags])


def record_reference(run: str | Path, dialogues, out: Path) -> dict:
    """fp32 label probabilities of ``dialogues`` and the adapter's sha256, for the packaging check."""
    p = load(run, dtype="float32")
    tagger = p.tagger("predicted", batch=1)
    rows = [{"dialogue_id": d.id, "labels": [t.label for t in preds], "probs": [t.probs for t in preds]}
            for d, preds in ((d, tagger.tag(d)) for d in dialogues)]
    ref = {"adapter_sha256": sha256_file(resolve(run) / "adapter" / "adapter_model.safetensors"), "dialogues": rows}
    atomic_write_json(out / REFERENCE, ref)
    return ref
