"""What sdfleet itself says while a command runs: one line each, on stderr, so stdout stays for results."""

from __future__ import annotations

import os
import sys


def log(message: str) -> None:
    print(f"[sdfleet] {message}", file=sys.stderr, flush=True)


def log_file(fs, root: str, name: str, in_out: bool = True) -> str:
    """Where a command's log file `name` goes: OUT/logs/ on a local output, else (an object store cannot be
    appended to line by line, and a command that writes nothing into OUT must not start to) a local
    temporary folder."""
    from manifests.stores import is_local_fs

    if in_out and is_local_fs(fs):
        folder = os.path.join(root, "logs")
        os.makedirs(folder, exist_ok=True)
    else:
        import tempfile

        folder = tempfile.gettempdir()
    return os.path.join(folder, name)
