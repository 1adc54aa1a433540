"""Atomic file writes: a reader never sees a half-written file or directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


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
    if final.exists() and not final.is_symlink():  # a plain directory from elsewhere: move it aside first
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
