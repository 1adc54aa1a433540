"""Package a trained MELD run as the shipped model (erc_llm/pretrained/NAME): the adapter (bfloat16 storage),
its prompts and spec, reference predictions for the packaging check, test metrics of the packaged files, and
the model card.

    python eval/package_model.py --run runs/meld_seed0 --data-dir ../shared/data/meld

Replace the shipped model only with a run that is better on dev (the script refuses otherwise unless --force).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from erc_llm.data import load_split
from erc_llm.export import export, model_card, record_reference, run_metrics, train_command
from erc_llm.run import PRETRAINED_DIR, RunSpec, write_checksums

USE = """
## Intended use and limits

Emotion labels for English conversational text in the style of the TV series *Friends* (MELD), with the
7 MELD labels. It reads the conversation so far (online, causal): batch tagging, chat and streaming.
It was not trained on other domains, languages or label sets; MELD's fear and disgust are rare (about 2–3% of
turns) and are recognised poorly. It does not see audio or faces. Not for decisions about people.

## Training data and licence

MELD (Poria et al., 2019; declare-lab/MELD), GPL-3.0: 1,038 training dialogues (9,989 utterances), model
selected on the 114 dev dialogues only; the test split was read once for the figures above. The adapter is a
derivative of that data; the backbone (Gemma 3 270M) is under the Gemma terms of use.

## Use

```bash
erc-llm evaluate --dataset meld --split test --data-dir /path/to/MELD      # this model is the default
erc-llm chat                                                              # label turns as you type
```

With plain transformers + peft: load the backbone (`erc-llm prepare-model gemma-3-270m` writes it to
`~/.cache/erc_llm/models/gemma-3-270m`), then `PeftModel.from_pretrained(model, THIS_FOLDER/adapter)` (or
`erc-llm export` for a folder with the adapter at the top level). The prompt is
`prompts/header.txt` (labels, participants) followed, per turn, by `prompts/turn.txt` up to `{label}`; each
piece is tokenized on its own (no special tokens) and the pieces concatenated after the BOS token. The
label distribution at a turn is the softmax over the first tokens of " neutral", " joy", ... at the last
position of that turn's piece; {history} `erc-llm export` writes this folder for any run;
tests/test_export.py checks the recipe against erc-llm.
"""

HISTORY = {
    False: "earlier turns are followed only by the turn's suffix (this model writes no labels into the history).",
    True: "each earlier turn's piece continues with the tokens of the label this model predicted for it (the "
          "argmax, tokenized with its leading space, e.g. \" joy\"; its own prediction, never a gold label: it was "
          "trained on the labels it writes), then the turn's suffix.",
}


def usage(label_history: bool) -> str:
    """The model card's use section for a model that does (or does not) write its labels into the history."""
    return USE.replace("{history}", HISTORY[label_history])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the trained run folder")
    p.add_argument("--data-dir", required=True, help="MELD csv folder (reference dialogues and test metrics)")
    p.add_argument("--name", default="meld-gemma3-270m")
    p.add_argument("--reference-dialogues", type=int, default=3)
    p.add_argument("--force", action="store_true", help="replace a shipped model that is better on dev")
    args = p.parse_args()
    target = PRETRAINED_DIR / args.name
    new = run_metrics(Path(args.run))
    if (target / "metrics.json").is_file() and not args.force:
        old = json.loads((target / "metrics.json").read_text())["dev"]["dev_predicted"]["weighted_f1"]
        if new["dev"]["dev_predicted"]["weighted_f1"] <= old:
            print(f"not replacing {target}: dev weighted F1 {new['dev']['dev_predicted']['weighted_f1']:.2f} <= {old:.2f}")
            return 1
    spec = RunSpec.read(args.run)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    cfg = (Path(args.run) / "config.yaml").read_text()
    export(args.run, target, "bfloat16", card="(being packaged)\n")
    if target.is_symlink():  # atomic_dir publishes a versioned folder behind a symlink; the package needs the folder
        real = target.resolve()
        target.unlink()
        real.rename(target)
        target.chmod(0o755)
    for name in ("adapter_config.json", "adapter_model.safetensors", "checksums.json"):  # one copy, in adapter/;
        (target / name).unlink()  # the checksums are written once the folder is complete
    dev, _, _ = load_split("meld", "dev", args.data_dir)
    record_reference(target, dev[: args.reference_dialogues], target)
    t = time.time()
    out = Path("eval/results") / f"{args.name}_meld_test"
    cmd = [sys.executable, "-m", "erc_llm.cli", "evaluate", "--dataset", "meld", "--split", "test", "--data-dir",
           args.data_dir, "--run", args.name, "--out", str(out)]
    subprocess.run(cmd, check=True)
    packaged = json.loads((out / "metrics.json").read_text())
    metrics = {**new, "test_predicted": packaged, "packaged_test_seconds": time.time() - t,
               "run_test_fp32_adapter": new.get("test_predicted", {}).get("weighted_f1")}
    (target / "metrics.json").write_text(json.dumps({k: metrics[k] for k in ("dev",)}, indent=2) + "\n")
    command = train_command(yaml.safe_load(cfg), "configs/meld.yaml")
    extra = (f"\n## Provenance\n\nTrained with `{command}` (DATA = the MELD folder; configuration below); "
             f"packaged at commit `{commit}` with `python eval/package_model.py --run RUN --data-dir DATA`. "
             f"The adapter is stored in bfloat16: MELD test weighted F1 {packaged['weighted_f1']:.2f} with these "
             f"files (fp32 compute) vs {metrics['run_test_fp32_adapter']:.2f} with the float32 adapter. MELD test "
             f"(2,610 utterances) took {packaged['seconds']:.0f} s here ({packaged['utterances_per_second']:.1f} utt/s, "
             f"float32, {packaged['threads']} threads).\n\n```yaml\n{cfg}```\n" + usage(spec.label_history))
    (target / "README.md").write_text(model_card(spec, args.name, metrics, extra), encoding="utf-8")
    write_checksums(target)
    print(f"packaged {args.run} -> {target}; MELD test weighted F1 {packaged['weighted_f1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
