"""Text normalisation shared by every loader: mojibake, typographic quotes, whitespace."""

from __future__ import annotations

import re

import ftfy

_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Repair cp1252/latin-1 mojibake (``\\x92``, ``Â``, ``â€™``), straighten quotes, collapse whitespace.

    >>> normalize_text("You must\\x92ve  had\\n it")
    "You must've had it"
    """
    fixed = ftfy.fix_text(text, uncurl_quotes=True, normalization="NFKC")
    return _SPACE.sub(" ", fixed).strip()


def normalize_speaker(name: str) -> str:
    return normalize_text(name)
