"""Write a tiny IEMOCAP_full_release-format corpus (our own lines; the real corpus is licensed)."""

from __future__ import annotations

from pathlib import Path

# (utterance suffix, start, end, label, text); deliberately listed out of time order
DIALOGUE = [
    ("F000", 6.2901, 8.2357, "neu", "Excuse me."),
    ("M001", 8.9, 10.1, "fru", "Yeah, what is it?"),
    ("F002", 11.0, 12.5, "xxx", "Is there a problem?"),
    ("M000", 2.0, 4.0, "ang", "I have been waiting for an hour."),
    ("F001", 13.0, 14.0, "hap", "Oh, this is wonderful news!"),
    ("M002", 15.0, 16.0, "exc", "We did it!"),
    ("F003", 16.5, 17.0, "sad", "I miss her."),
    ("M003", 17.5, 18.0, "sur", "Really?"),
]


def write_iemocap(root: Path, dialogues_per_session: int = 3) -> Path:
    for s in range(1, 6):
        tdir = root / f"Session{s}" / "dialog" / "transcriptions"
        edir = root / f"Session{s}" / "dialog" / "EmoEvaluation"
        tdir.mkdir(parents=True)
        edir.mkdir(parents=True)
        for k in range(dialogues_per_session):
            name = f"Ses0{s}{'F' if k % 2 == 0 else 'M'}_impro0{k + 1}"
            trans, evals = [], ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            for suffix, start, end, lab, text in DIALOGUE:
                uid = f"{name}_{suffix}"
                trans.append(f"{uid} [{start:08.4f}-{end:08.4f}]: {text}")
                evals.append(f"[{start:.4f} - {end:.4f}]\t{uid}\t{lab}\t[2.5000, 3.0000, 3.5000]")
                evals.append("C-E1:\tNeutral;\t()")
                evals.append("")
            trans.append("M: [BREATHING]")
            (tdir / f"{name}.txt").write_text("\n".join(trans) + "\n")
            (edir / f"{name}.txt").write_text("\n".join(evals) + "\n")
    return root
