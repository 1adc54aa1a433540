"""One error path for every entry point (``erc-llm``, ``erc_llm/train.py``, the chat REPL).

Expected failures — bad configuration, bad data, a missing or unreadable file, a path that is a folder,
no permission, a full disk — become one line naming what was wrong and what to do; the command exits
with status 2 and a REPL keeps its session. Anything else is a bug and keeps its traceback. ``--debug``
shows the traceback of expected failures too.
"""

from __future__ import annotations

import sys
from typing import Callable

from erc_llm.io import quiet_library_bars

# ValueError covers ConfigError, DataError, ModelNotFound and UnicodeDecodeError; OSError covers missing
# files, folders given for files, permissions and full disks.
EXPECTED = (ValueError, OSError, KeyError)
EXIT_USER_ERROR = 2


def describe(e: BaseException) -> str:
    """One line for an expected failure; OS errors name their file (``[Errno 21] Is a directory: 'x'``)."""
    if isinstance(e, UnicodeDecodeError):
        return f"not valid UTF-8 text at byte {e.start} ({e.reason}); expected a UTF-8 text file"
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None:
        what = e.strerror or type(e).__name__
        return f"{e.filename}: {what}" + (f" -> {e.filename2}" if e.filename2 else "")
    return str(e) or type(e).__name__


def run_command(fn: Callable[[], object], prog: str, debug: bool = False) -> int:
    """Run ``fn``; an expected failure prints ``prog: error: ...`` and returns 2 (re-raised with ``debug``)."""
    quiet_library_bars()
    try:
        result = fn()
    except EXPECTED as e:
        if debug:
            raise
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return result if isinstance(result, int) else 0
