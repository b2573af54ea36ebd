"""What sdfleet itself says while a command runs: one line each, on stderr, so stdout stays for results."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    print(f"[sdfleet] {message}", file=sys.stderr, flush=True)
