"""``erc-llm chat``: a REPL that labels a conversation as it is typed.

    erc-llm chat --run runs/meld
    printf 'Ross: We were on a break!\\nhow does Ross feel?\\n' | erc-llm chat --run runs/meld   # scripted

Lines ``Speaker: text`` are labelled on arrival (label, top-3 probabilities, a bar). Commands:
``/who NAME``, ``/history``, ``/labels``, ``/reset``, ``/load FILE`` (a dialogue in the generic JSONL
format), ``/save FILE``, ``/help``, ``/quit``. Questions such as "how does Ross feel?" or "who is
angry?" are answered from the session state (no generation).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from erc_llm.errors import EXPECTED, describe
from erc_llm.io import atomic_write_text, cache_root
from erc_llm.session import ERCSession, TurnResult, load_dialogue_file

HELP = """Type turns as `Speaker: text`. Commands:
  /who NAME     what NAME has felt so far (and their stored biography)
  /history      the dialogue so far with labels
  /labels       the label set
  /reset        start a new dialogue
  /load FILE    label a dialogue from a generic-format JSONL file (first line)
  /save FILE    write this dialogue with predicted labels as JSONL
  /help, /quit
Questions: "how does NAME feel?", "who is angry?" """

TURN = re.compile(r"^(?P<speaker>[^:/?][^:]{0,59}):\s*(?P<text>\S.*)$")
FEEL = re.compile(r"^\s*(?:how|what)\s+(?:does|is|do|did|was)\s+(?P<name>.+?)\s+(?:feel|feeling|doing)\b[^?]*\??\s*$",
                  re.I)
WHO = re.compile(r"^\s*who(?:'s|\s+is|\s+was|\s+feels?)\s+(?P<word>[a-z]+)\s*\??\s*$", re.I)
ADJECTIVES = {"angry": "anger", "mad": "anger", "happy": "joy", "joyful": "joy", "sad": "sadness", "scared": "fear",
              "afraid": "fear", "fearful": "fear", "disgusted": "disgust", "surprised": "surprise",
              "frustrated": "frustrated", "excited": "excited", "calm": "neutral"}


def bar(p: float, width: int = 10) -> str:
    n = round(p * width)
    return "█" * n + "░" * (width - n)


def render_turn(r: TurnResult) -> str:
    (lab, p), *rest = r.top(3)
    others = "  ".join(f"{k} {100 * v:.0f}%" for k, v in rest)
    used = f"  ({r.used})" if r.used != "text" else ""
    return f"  {r.speaker} → {lab} {100 * p:.0f}% {bar(p)}  {others}{used}"


class Repl:
    """Line in, text out; holds one :class:`ERCSession`."""

    def __init__(self, session: ERCSession):
        self.session = session
        self.done = False

    def handle(self, line: str) -> str:
        line = line.strip()
        if not line:
            return ""
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            fn = getattr(self, "cmd_" + cmd[1:].lower(), None)
            if fn is None:
                return f"unknown command {cmd}; available = /who /history /labels /reset /load /save /help /quit"
            try:
                return fn(arg.strip())
            except EXPECTED as e:  # a mistake in a command never ends the session
                return f"error: {describe(e)}"
        m = FEEL.match(line)
        if m:
            return self.cmd_who(m.group("name"))
        m = WHO.match(line)
        if m:
            return self.who_is(m.group("word").lower())
        m = TURN.match(line)
        if m:
            try:
                return render_turn(self.session.add_turn(m.group("speaker"), m.group("text")))
            except ValueError as e:
                return f"error: {e}"
        return "not understood: type `Speaker: text`, a question like `how does Ross feel?`, or /help"

    def who_is(self, word: str) -> str:
        labels = self.session.engine.labels.labels
        label = word if word in labels else ADJECTIVES.get(word)
        if label not in labels:
            return f"'{word}' is not an emotion of this model; labels = {list(labels)}"
        last = {}
        for t in self.session.turns:
            last[t.speaker] = t
        who = [f"{s} ({100 * t.probs[label]:.0f}%)" for s, t in last.items() if t.label == label]
        return f"{label} at their last turn: " + (", ".join(who) if who else "nobody")

    def cmd_who(self, name: str) -> str:
        if not name:
            return "usage: /who NAME"
        try:
            s = self.session.speaker_summary(name)
        except KeyError as e:
            return str(e.args[0])
        lines = [f"{name}: {s['turns']} turns"]
        if s["last"]:
            top = sorted(s["last_probs"].items(), key=lambda kv: -kv[1])[:3]
            lines[0] += f"; now {s['last']} ({', '.join(f'{k} {100 * v:.0f}%' for k, v in top)})"
            lines.append("  so far: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["counts"].items(), key=lambda kv: -kv[1])))
        if s["earlier_emotions"]:
            lines.append("  earlier conversations: " + ", ".join(s["earlier_emotions"]))
        if s["biography"]:
            lines.append("  about: " + s["biography"])
        return "\n".join(lines)

    def cmd_history(self, _: str) -> str:
        if not self.session.turns:
            return "(no turns yet)"
        return "\n".join(f"{t.index:>3} {t.speaker}: {t.text}  [{t.label} {100 * t.probs[t.label]:.0f}%]"
                         for t in self.session.turns)

    def cmd_labels(self, _: str) -> str:
        return ", ".join(self.session.engine.labels.labels)

    def cmd_reset(self, _: str) -> str:
        self.session.reset()
        return "new dialogue"

    def cmd_load(self, arg: str) -> str:
        if not arg:
            return "usage: /load FILE"
        turns = load_dialogue_file(arg)  # every turn is validated before the first is added
        return "\n".join(render_turn(self.session.add_turn(s, t)) for s, t in turns)

    def cmd_save(self, arg: str) -> str:
        if not arg:
            return "usage: /save FILE"
        if Path(arg).is_dir():
            return f"error: {arg} is a folder; give a file name, e.g. {Path(arg) / 'dialogue.jsonl'}"
        atomic_write_text(Path(arg), json.dumps(self.session.to_jsonl_row(), ensure_ascii=False) + "\n")
        return f"saved {len(self.session.turns)} turns to {arg}"

    def cmd_help(self, _: str) -> str:
        return HELP

    def cmd_quit(self, _: str) -> str:
        self.done = True
        return ""


def run(repl: Repl, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Interactive with a prompt and readline history on a terminal; plain line by line when piped."""
    tty = stdin.isatty() and stdout.isatty()
    if tty:
        _readline()
        print(f"erc-llm chat — {repl.session.engine.name}; /help for commands", file=stdout)
    while not repl.done:
        try:
            line = input("> ") if tty else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not tty and line == "":
            break
        out = repl.handle(line)
        if out:
            print(out, file=stdout, flush=True)


def _readline() -> None:
    import atexit  # interactive REPL only

    try:
        import readline  # interactive REPL only
    except ImportError:  # not on every platform
        return

    path = cache_root() / "chat_history"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    atexit.register(readline.write_history_file, path)
