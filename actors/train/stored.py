"""What a fine-tune's --out/checkpoints holds, read without torch: the driver asks it too (what a rerun
resumes from, which folders to remove once a run is done), and the driver must not import torch."""

from __future__ import annotations

import json
import struct

from manifests.stores import url_to_fs

CHECKPOINT_PREFIX = "checkpoint_"  # how Ray Train names its checkpoint folders, and its record file
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")  # what save_checkpoint writes


def stored_checkpoints(out: str, passed_over: list[tuple[str, str]] | None = None) -> list[tuple[int, str]]:
    """(step, folder) of each whole checkpoint under --out/checkpoints, newest step first: every file
    save_checkpoint writes is there, each safetensors file as long as its header says (`_whole`). Each one that
    is not (and holds any of them) is added to `passed_over` as (its folder's name, why).

    Ray Train resumes from the newest checkpoint its own record (checkpoint_manager_snapshot.json) lists, and
    a checkpoint uploaded just before a Ctrl-C can be whole on the store but not in that record yet: the rerun
    trained up to --checkpoint-every steps again. Whole is told from the store's listing and the files' heads,
    the same for every worker, so they all resume from the same one (`resume_from`)."""
    fs, root = url_to_fs(out)
    found = []
    for entry in checkpoint_entries(fs, root):
        folder = entry["name"].rstrip("/")
        if entry.get("type") != "directory":
            continue
        try:
            step, why = _whole(fs, folder)
        except OSError as exc:  # the store, not the files (a retry may read it): said as such, not as damaged
            step, why = None, f"could not be read now ({type(exc).__name__}: {exc})"
        if step is not None:
            found.append((step, fs.unstrip_protocol(folder)))
        elif passed_over is not None and why:
            passed_over.append((folder.rsplit("/", 1)[-1], why))
    return sorted(found, reverse=True)


def _whole(fs, folder: str) -> tuple[int | None, str | None]:
    """(the step of the checkpoint in `folder`, None) if all its files are there and whole, else (None, why)."""
    sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in fs.ls(folder, detail=True)}
    if missing := [name for name in CHECKPOINT_FILES if name not in sizes]:  # (none of them: not one, unsaid)
        return None, f"{', '.join(missing)} missing" if len(missing) < len(CHECKPOINT_FILES) else None
    try:
        meta = json.loads(fs.cat_file(f"{folder}/state.json"))
        step = int(meta["step"])
    except (ValueError, KeyError, TypeError) as exc:  # cut short, or not the JSON save_checkpoint writes
        return None, f"state.json does not read ({type(exc).__name__})"
    tensors = [name for name in CHECKPOINT_FILES if name.endswith(".safetensors")]
    if "ema" in meta:
        tensors.append("ema.safetensors")
    for name in tensors:
        if sizes.get(name) is None:
            return None, f"{name} missing"
        try:
            whole = safetensors_whole(fs, f"{folder}/{name}", sizes[name])
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, struct.error) as exc:  # not safetensors'
            return None, f"{name} damaged (its header does not read: {type(exc).__name__})"
        if not whole:
            return None, f"{name} cut short (or longer than its header says)"
    return step, None


def safetensors_whole(fs, path: str, size: int) -> bool:
    """Whether the safetensors file at `path`, `size` bytes on the store, is as long as its header says: an
    8-byte header length, a JSON header, then the tensors' data (a file cut short, or bytes that are not one,
    is not). Reads only the header."""
    if size < 8:  # (an empty file, a crash before the header was out)
        return False
    with fs.open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size:
            return False
        header = json.loads(f.read(length))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return size == 8 + length + end


def checkpoint_entries(fs, root: str) -> list[dict]:
    """The store's listing (fs.ls detail) of what Ray Train wrote under `root`/checkpoints: its checkpoint
    folders and its record file; [] when there is no such folder."""
    try:
        entries = fs.ls(f"{root.rstrip('/')}/checkpoints", detail=True)
    except FileNotFoundError:
        return []
    return [e for e in entries if e["name"].rstrip("/").rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX)]


FATAL_FILE = "fatal_error.json"  # under --out/checkpoints: the error a retry of the run would meet again


class RepeatsOnRetry(Exception):
    """An error in the run's inputs (a dataset image that does not decode, a checkpoint that does not load): Ray
    Train retries a failed worker group from the newest checkpoint up to --max-failures times, and each retry
    would meet it again after loading the model. The worker that meets it writes it down (`note_fatal`), so
    every later attempt of the run stops before loading anything, and the driver says the error itself."""


def _fatal_path(out: str) -> tuple:
    fs, root = url_to_fs(out)
    return fs, f"{root}/checkpoints/{FATAL_FILE}"


def note_fatal(out: str, message: str, run: str) -> None:
    """Write `message` down for the later attempts of the driver's run `run` (best effort: a store that refuses
    the write only costs the retries)."""
    from manifests.ledger import atomic_write

    fs, path = _fatal_path(out)
    try:
        atomic_write(fs, path, json.dumps({"error": message, "run": run}).encode())
    except Exception:  # noqa: BLE001 - the error being noted is the one to say, not this
        pass


def fatal_error(out: str, run: str) -> str | None:
    """The error an earlier attempt of the driver's run `run` noted (`note_fatal`), or None. A note of another
    run (left where the driver could not clear it: a worker's own disk) is not this run's."""
    fs, path = _fatal_path(out)
    try:
        note = json.loads(fs.cat_file(path))
        return str(note["error"]) if note.get("run") == run else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none (FileNotFoundError), or unreadable
        return None


def clear_fatal(out: str) -> None:
    """A new run of the driver starts without the last one's error: its inputs may have been mended since."""
    fs, path = _fatal_path(out)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
