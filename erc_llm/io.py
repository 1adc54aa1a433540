"""Atomic file writes: a reader never sees a half-written file or directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm


def cache_root() -> Path:
    """Where converted weights, tokenized datasets and feature caches live (``$ERC_LLM_CACHE``, default
    ``~/.cache/erc_llm``)."""
    return Path(os.environ.get("ERC_LLM_CACHE", Path.home() / ".cache" / "erc_llm"))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh directory; publish it as ``final`` only if the block succeeds.

    ``final`` is a symlink to a versioned sibling (``.NAME.XXXX``) swapped with one atomic
    ``os.replace``: a reader (or a process killed at any instant) sees the old complete directory or
    the new complete one, never a half-written or missing one. The old version is removed afterwards.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.resolve() if final.is_symlink() else None
    if final.exists() and not final.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{final} is a file; expected a folder to write (nothing was changed): choose another path")
    if final.exists() and not final.is_symlink():  # a plain folder (written before outputs were versioned): replace it
        legacy = final.with_name(f".{final.name}.legacy")
        shutil.rmtree(legacy, ignore_errors=True)
        os.replace(final, legacy)
        old = legacy
    link = final.with_name(f".{final.name}.link")
    link.unlink(missing_ok=True)
    os.symlink(tmp.name, link)
    os.replace(link, final)
    if old is not None and old != tmp.resolve():
        shutil.rmtree(old, ignore_errors=True)


OUTPUT_MANIFEST = ".erc-llm-output.json"
# what identifies each kind of output folder written before it carried the manifest
LEGACY_MARKS = {"run": ("run.json", "config.yaml"), "export": ("run.json", "adapter_config.json"),
                "evaluation": ("metrics.json",), "speaker store": ("manifest.json", "profiles.json"),
                "audio features": ("sources.json",), "results": ("results.json",)}


class OutputError(ValueError):
    """An output folder that would destroy something the command did not write."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def claim_output(out: str | Path, kind: str, inputs: Iterable[str | Path] = (), replace: bool = True) -> Path:
    """The one rule for every command that writes a folder: nothing it did not write is ever deleted or renamed.

    ``out`` may not be, or lie inside, one of the command's ``inputs``, nor contain one (replacing it would delete
    the input). An existing ``out`` must be a folder that is empty or an earlier output of the same ``kind``
    (recognised by its manifest, :func:`mark_output`); ``replace=False`` refuses that too (the caller's
    ``--overwrite`` decides). Every problem raises :class:`OutputError` naming the path and what to do."""
    out = Path(os.path.abspath(out))
    for given in inputs:
        if not given:
            continue
        src = Path(os.path.abspath(given))
        if _inside(out, src):
            raise OutputError(f"--out {out} is {'the same folder as' if out == src else 'inside'} the input {src}; "
                              "writing there would destroy it: choose an --out outside the inputs")
        if out.is_dir() and _inside(src, out):
            raise OutputError(f"--out {out} contains the input {src}; replacing the folder would delete it: choose "
                              "another --out")
    if not os.path.lexists(out):
        return out
    if not out.is_dir():
        raise OutputError(f"--out {out} is an existing file; expected a folder to write: choose another --out "
                          "(nothing was changed)")
    if not any(out.iterdir()):
        return out
    if written_by(out) != kind:
        raise OutputError(f"--out {out} already holds files that erc-llm did not write as a {kind} (e.g. "
                          f"{sorted(x.name for x in out.iterdir())[:3]}); nothing was changed: choose another --out, "
                          "or empty or remove that folder yourself")
    if not replace:
        raise OutputError(f"--out {out} holds an earlier {kind}; pass --overwrite true to replace it, or choose "
                          "another --out")
    return out


def written_by(folder: Path) -> str | None:
    """The kind of erc-llm output ``folder`` is (its manifest, else the files that kind has always written)."""
    try:
        return json.loads((folder / OUTPUT_MANIFEST).read_text(encoding="utf-8"))["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for kind, marks in LEGACY_MARKS.items():
        if all((folder / m).is_file() for m in marks):
            return kind
    return None


def mark_output(folder: str | Path, kind: str) -> None:
    """Record that ``folder`` is erc-llm output of ``kind`` (what :func:`claim_output` recognises)."""
    atomic_write_json(Path(folder) / OUTPUT_MANIFEST, {"kind": kind, "tool": "erc-llm"})


def _remove_orphans(final: Path) -> None:
    """Versions of ``final`` left half-written by a killed process (its pid is in the name and no longer
    runs); the published version (the symlink's target) is never touched."""
    live = final.resolve() if final.is_symlink() else None
    for d in final.parent.glob(f".{final.name}.*.*"):
        parts = d.name[len(final.name) + 2:].split(".")
        if d == live or not parts[0].isdigit() or not d.is_dir():
            continue
        try:
            os.kill(int(parts[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (PermissionError, OverflowError):
            continue


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def content_digest(*parts) -> str:
    """Fingerprint of the content of a resumable artifact's inputs (JSON-able parts: settings, texts, labels,
    file digests). Every resumable artifact keys its reuse on one of these, so a changed input is redone,
    never silently reused."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class _Lines:
    """A stream for tqdm that writes each refresh as one plain line (no carriage returns) into a log file."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def quiet_library_bars() -> None:
    """When stderr is a log (a file or a pipe), switch off the bars of huggingface_hub, transformers and datasets
    (loading weights, saving a tokenized dataset): they write carriage returns. Set before those libraries are
    imported, the environment does it; for one already imported, its own switch."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def progress(iterable=None, **kw):
    """A tqdm bar on a terminal; when stderr is a file or a pipe (a log), one plain line at most every 30 s and
    at the end, so logs hold lines, not carriage-return bars, and log messages never land on a bar's line."""
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kw)
    return tqdm(iterable, file=_Lines(sys.stderr), mininterval=30, ncols=110, **kw)
