"""What sdfleet itself says while a command runs: one line each, on stderr, so stdout stays for results."""

from __future__ import annotations

import contextlib
import os
import sys

from manifests.stores import without_passwords  # noqa: F401 - what sdfleet says and records goes through it
from manifests.text import terminal_line  # every line that quotes a name from the user goes through it


def recorded_json(data) -> str:
    """`data` as the JSON files a command writes hold it (run.json, finetune.json, eval.json, `_dataset.json`):
    indented, non-ASCII as it is, less any password in a URI (`https://user:***@host/...`): those files
    travel with the images and models, and secrets belong in the environment."""
    import json

    return without_passwords(json.dumps(data, indent=2, ensure_ascii=False, default=str)) + "\n"


def log(message: str) -> None:
    """Say `message` on stderr. A terminal that is gone (closed, an ssh session dropped: EIO) or a pipe whose
    reader left (EPIPE) loses the line, not the run: what a run says is never what stops it."""
    with contextlib.suppress(OSError):
        print(f"[sdfleet] {terminal_line(without_passwords(message))}", file=sys.stderr, flush=True)


def leave(code: int):
    """End the process now with `code`, after what it printed and logged is out: no interpreter teardown, which
    can abort a process whose Arrow threads still hold buffers (jobs.cli.run), and no waiting on threads held
    in Ray calls (a lost cluster)."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    logging.shutdown()  # the run's log files
    os._exit(code)


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



@contextlib.contextmanager
def in_background(loop, name: str):
    """While the body runs, `loop(stop)` on a thread of its own; `stop`, a threading.Event, is set when the body
    ends (the loop waits on it between rounds), and the thread is joined."""
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=loop, args=(stop,), name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def ticking(line, seconds: float = 15.0):
    """While the body runs, `log(line())` every `seconds`: a long wait (a plan of a million rows) does not look
    hung."""

    def tick(stop):
        while not stop.wait(seconds):
            log(line())

    return in_background(tick, "sdfleet-ticking")


@contextlib.contextmanager
def command_log(fs, root: str, name: str, ends: str, in_out: bool = True):
    """The path of the command's log file `name` (see `log_file`), said once. On an object-store OUT the file
    is copied to OUT/logs/ when the command (`ends`: "run", "fine-tune") ends, finished or failed, so the
    messages of a job whose pod is gone stay with its output. A command that writes nothing into OUT
    (`in_out` False: `--plan-only`) has its log in the temporary folder, removed when it succeeds (a nightly
    dry run left one there every night) and kept, as said, when it does not. A run that finds OUT taken by
    another run that started in the same instant (OutputTaken) removes its log: OUT is the other run's."""
    from manifests.stores import is_local_fs

    path = log_file(fs, root, name, in_out)
    copied = in_out and not is_local_fs(fs)
    where = f"{fs.unstrip_protocol(root.rstrip('/'))}/logs/"
    after = (f" (copied to {where} when the {ends} ends)" if copied else
             "" if in_out else " (removed if it succeeds)")
    log(f"Ray's and the libraries' messages: {path}{after}")
    from jobs.errors import OutputTaken

    try:
        yield path
    except OutputTaken:  # the output is another run's, which started in the same instant: no log of ours there
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    except BaseException:
        if not in_out:
            log(f"Ray's and the libraries' messages are kept in {path}")
        raise
    else:
        if not in_out:
            with contextlib.suppress(OSError):
                os.remove(path)
    finally:
        if copied:
            _keep_log(fs, root, path)


def _keep_log(fs, root: str, path: str) -> None:
    """Move the log file `path` to OUT/logs/: copied, then the local file removed (a nightly job's head pod
    kept one in its temporary folder every night). Best effort: a store that refuses is said in one line,
    the local file is kept, and the command's own outcome stands."""
    if not os.path.exists(path):
        return
    target = f"{root.rstrip('/')}/logs/{os.path.basename(path)}"
    try:
        fs.put_file(path, target)
    except Exception as exc:  # noqa: BLE001 - the run's result matters more than its log
        from jobs.errors import one_line

        log(f"warning: the log {path} was not copied to {fs.unstrip_protocol(target)}: {one_line(exc)}")
        return
    with contextlib.suppress(OSError):
        os.remove(path)
