"""A results folder's files, loose or packed into one ``record.json``.

    python eval/records.py pack eval/results/NAME [...]     # fold each folder's files into NAME/record.json
    python eval/records.py unpack eval/results/NAME [...]   # write them back as loose files
    python eval/records.py budget                           # files and bytes under eval/results/, against the limits

A headline row keeps its files loose (``metrics.json``, ``report.md``, the full ``log.jsonl`` ...), so a reader
clicks through them; every other row is one ``record.json`` per folder: ``{"files": {"test_predicted/metrics.json":
{...}, "report.md": "...", "log.jsonl": "..."}}`` (JSON files as objects, everything else as its text), which
keeps the repository small without losing a number. The readers of results
(``eval/seeds.py``, ``eval/seeds_table.py``, ``eval/tables.py``, ``eval/baseline_table.py``) go through
:func:`read_json` / :func:`read_text` / :func:`exists`, so they take either form.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from erc_llm.io import atomic_write_json, atomic_write_text

RECORD = "record.json"
RESULTS = Path(__file__).resolve().parent / "results"
MAX_FILES, MAX_BYTES = 400, 8 * 1024 * 1024
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".yaml", ".txt")


class RecordError(ValueError):
    pass


def _packed(folder: Path) -> dict | None:
    """The files held by ``folder/record.json``, or None when the folder keeps them loose."""
    path = folder / RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise RecordError(f"{path}: expected {{\"files\": {{relative path: content}}}}, as eval/records.py pack "
                          "writes it")
    return record["files"]


def exists(folder: Path, rel: str) -> bool:
    """Whether ``folder`` holds ``rel`` (``test_predicted/metrics.json``), loose or packed."""
    if (folder / rel).is_file():
        return True
    files = _packed(folder)
    return files is not None and rel in files


def read_text(folder: Path, rel: str) -> str:
    """The text of ``rel`` in ``folder``, loose or packed (a packed JSON file comes back as JSON text)."""
    if (folder / rel).is_file():
        return (folder / rel).read_text(encoding="utf-8")
    files = _packed(folder)
    if files is None or rel not in files:
        held = sorted(files) if files else sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        raise RecordError(f"{folder}: no {rel}; the folder holds {held or 'nothing'}")
    value = files[rel]
    return value if isinstance(value, str) else json.dumps(value, indent=2) + "\n"


def read_json(folder: Path, rel: str):
    """The parsed JSON of ``rel`` in ``folder``, loose or packed."""
    if (folder / rel).is_file():
        return json.loads((folder / rel).read_text(encoding="utf-8"))
    files = _packed(folder)
    if files is not None and rel in files and not isinstance(files[rel], str):
        return files[rel]
    return json.loads(read_text(folder, rel))


def _content(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return text  # JSON lines stay one line per row


def pack(folder: Path) -> int:
    """Fold the text files under ``folder`` into ``folder/record.json`` and remove them; returns how many were
    folded. The folder's own ``README.md`` (what a browser shows for the folder) and files that are not text
    (plots, ``.jsonl.gz`` predictions) stay loose beside it."""
    if not folder.is_dir():
        raise RecordError(f"{folder}: not a results folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                   and p.relative_to(folder).as_posix() not in (RECORD, "README.md"))
    if not files:
        return 0
    held = _packed(folder) or {}
    held.update({p.relative_to(folder).as_posix(): _content(p) for p in files})
    atomic_write_json(folder / RECORD, {"files": dict(sorted(held.items()))})
    for p in files:
        p.unlink()
    for d in sorted((d for d in folder.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    return len(files)


def unpack(folder: Path) -> int:
    """Write the files of ``folder/record.json`` back as loose files and remove it; returns how many."""
    files = _packed(folder)
    if files is None:
        raise RecordError(f"{folder}: no {RECORD} to unpack")
    for rel in files:
        atomic_write_text(folder / rel, read_text(folder, rel))
    (folder / RECORD).unlink()
    return len(files)


def budget(root: Path = RESULTS) -> tuple[int, int]:
    """(files, bytes) under ``root``."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("pack", "unpack"):
        sub.add_parser(name).add_argument("folders", nargs="+", type=Path)
    sub.add_parser("budget")
    args = p.parse_args(argv)
    try:
        if args.command == "budget":
            n, size = budget()
            print(f"{RESULTS}: {n} files (limit {MAX_FILES}), {size / 2**20:.2f} MB (limit {MAX_BYTES / 2**20:.0f} MB)")
            return 0 if n <= MAX_FILES and size <= MAX_BYTES else 1
        for folder in args.folders:
            n = (pack if args.command == "pack" else unpack)(folder)
            print(f"{folder}: {n} files {'packed into ' + RECORD if args.command == 'pack' else 'unpacked'}")
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
