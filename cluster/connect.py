"""Connecting to Ray and sizing actors to what the cluster has.

Local Ray is the default, so the embedded example runs anywhere; `--address` or `RAY_ADDRESS` points
the same command at a cluster (a KubeRay head, `ray start --head`, or `auto` inside a Ray job).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

# Environment variables an actor needs to behave like the driver. Only names: values are read from the
# environment at run time, so a secret never lands in a manifest, a log line or a job spec.
FORWARDED_ENV = ("SDFLEET_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

# Logical CPU left free for Ray Data's own tasks: the plan tasks (0.25 each) and the streaming
# repartition that cuts batches, which always asks for a whole CPU. If the actors reserve more, the
# pipeline waits forever for a slot. Logical, not physical: CPU actors still run one torch thread per core.
READ_CPU_RESERVE = 1.0
MIN_CPU_SHARE = 0.05  # the least of a CPU a CPU actor is given


class ClusterError(Exception):
    """Ray cannot be reached or cannot host the requested actors."""


_SIGTERM_RECEIVED = threading.Event()  # SIGTERM or SIGHUP: a signal that stops a command as Ctrl-C does
_RECEIVED: list[int] = []  # which of them came first
# Set while ray.init runs: one of them then is acted on as it returns (connect), not raised within it, where a
# KeyboardInterrupt between two of its steps left a half-made core worker that ray.shutdown() crashed on
_DEFERRED = threading.Event()
_INTERRUPTED = threading.Event()  # a Ctrl-C that came while a local Ray started: acted on the same way
_HANGUP = getattr(signal, "SIGHUP", None)  # (not on Windows)


def stopped_by_sigterm() -> bool:
    """Whether this process received SIGTERM (or SIGHUP) while a command ran: a library that catches the
    KeyboardInterrupt and exits in its own way (Ray Train aborts the run, then calls sys.exit) loses which signal
    it was."""
    return _SIGTERM_RECEIVED.is_set()


def stop_signal() -> signal.Signals | None:
    """The signal that stopped the command (SIGTERM or SIGHUP), or None (none did, or it was Ctrl-C)."""
    return signal.Signals(_RECEIVED[0]) if _SIGTERM_RECEIVED.is_set() and _RECEIVED else None


# How long the cluster's GCS may refuse connections before a command gives up on it. Ray's driver gives up after
# 60 s (gcs_rpc_server_reconnect_timeout_s) by ending the process from C++, its message in the log file only; a
# GCS that restarts (KubeRay's GCS fault tolerance) is waited for as long as Ray is told to wait for it.
GCS_LOST_SECONDS = 15.0
RAY_GCS_WAIT = "RAY_gcs_rpc_server_reconnect_timeout_s"


def gcs_lost_seconds() -> float:
    """GCS_LOST_SECONDS, or where Ray is told to wait longer than its default 60 s for a GCS to come back, all
    but the last 10 s of that."""
    try:
        ray_waits = float(os.environ.get(RAY_GCS_WAIT, "60"))
    except ValueError:
        ray_waits = 60.0
    return max(GCS_LOST_SECONDS, ray_waits - 10) if ray_waits > 60 else GCS_LOST_SECONDS


_LOST: list[str] = []  # why the cluster was given up on, once it has been


def cluster_lost() -> str | None:
    """Why this process gave up on its Ray cluster (`watch_cluster`) or on its output (`stop_main`), or None."""
    return _LOST[0] if _LOST else None


def stop_main(reason: str) -> None:
    """From a watching thread: stop the command's main thread as Ctrl-C would, and have it end saying `reason`
    (exit 1), as when its cluster is lost. jobs.lease calls it when another run took the output over."""
    import _thread

    _LOST.append(reason)
    _thread.interrupt_main()


@contextlib.contextmanager
def watch_cluster(say, give_up=None, seconds: float | None = None, every: float = 2.0, grace: float = 10.0):
    """While the body runs, try the cluster's GCS port every `every` seconds. Once it has refused connections
    for `seconds` (the head pod gone, the GCS killed), `say` so at once and interrupt the main thread as Ctrl-C
    would, so the command keeps what finished and ends with one line (`cluster_lost` says why). A main thread
    held in a Ray call that waits out Ray's own timeout (its driver then ends the process from C++, 60 s after
    the GCS went, saying so only in the log file) is not interrupted: after `grace` seconds `give_up(reason)`
    runs on the watch's thread, to keep what finished, say the last line and end the process."""
    import socket

    import ray

    seconds = seconds or gcs_lost_seconds()
    address = ray.get_runtime_context().gcs_address
    host, _, port = address.rpartition(":")
    stop = threading.Event()
    _LOST.clear()

    def answers() -> bool:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=every):
                return True
        except OSError:
            return False

    def watch():
        refused_since = None
        while not stop.wait(every):
            if answers():
                refused_since = None
                continue
            refused_since = refused_since or time.time()
            if time.time() - refused_since >= seconds:
                reason = (f"lost the Ray cluster: its GCS at {address} has not answered for {seconds:.0f} s (the "
                          "head node or its GCS process is gone)")
                say(f"{reason}; stopping")
                stop_main(reason)
                if not stop.wait(grace) and give_up is not None:
                    give_up(_LOST[0])
                return

    thread = threading.Thread(target=watch, name="sdfleet-cluster-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def stop_on_sigterm() -> None:
    """Take SIGTERM back from Ray, whose driver handler calls sys.exit(15): that skipped every `except
    KeyboardInterrupt`, so rows back at the driver went unrecorded, and the command ended with no word. SIGTERM
    (Kubernetes stopping a pod, `ray job stop`) now raises KeyboardInterrupt, so a command stops as Ctrl-C stops
    it, and `stopped_by_sigterm` says which it was. A second SIGTERM while the first is handled ends the process
    at once, unless it comes within REPEAT_GRACE of the first (the same signal, passed on by a `timeout`).
    sdfleet's CLI sets it as it starts, and again once Ray's start-up has taken it.

    SIGHUP (the terminal closed, an ssh session dropped) ended the process at once, the rows back at the driver
    unrecorded and the lease left behind: it stops a command the same way, unless it was ignored when the command
    started (`nohup` and the like, which ask to run on)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (a test's thread; Ray kept its own)
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:  # first set, or set again after one fired
        _SIGTERM_RECEIVED.clear()
        _RECEIVED.clear()
    signal.signal(signal.SIGTERM, _on_sigterm)  # always: ray.init's C++ sets one that Python does not see
    if _HANGUP is not None and signal.getsignal(_HANGUP) in (signal.SIG_DFL, _on_sigterm, _on_repeated_stop):
        signal.signal(_HANGUP, _on_sigterm)


def _on_sigterm(signum, frame):
    _FIRST_STOP[:] = [time.monotonic()]
    signal.signal(signal.SIGTERM, _on_repeated_stop)  # a second of either: the same stop, or one to end at once
    if _HANGUP is not None and signal.getsignal(_HANGUP) is _on_sigterm:
        signal.signal(_HANGUP, _on_repeated_stop)
    _RECEIVED.append(signum)
    _SIGTERM_RECEIVED.set()
    if not _DEFERRED.is_set():
        raise KeyboardInterrupt


# Seconds within which a second SIGTERM or SIGHUP is the first stop delivered again, not a second one: a group's
# SIGTERM reaches a command under `timeout` twice (from the kill, and from `timeout` passing it on), and ended it
# at once, nothing recorded and its lease left.
REPEAT_GRACE = 5.0
_FIRST_STOP: list[float] = []  # when the first came (time.monotonic)


def _on_repeated_stop(signum, frame):
    """A SIGTERM or SIGHUP after the first: within REPEAT_GRACE the same stop (ignored, the first is acted on),
    later a second one, which ends the process at once (by the signal's default action)."""
    if _FIRST_STOP and time.monotonic() - _FIRST_STOP[0] < REPEAT_GRACE:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _on_interrupt_in_start(signum, frame):
    """Ctrl-C while a local Ray starts: noted, and acted on as ray.init returns (seconds later); a second one
    stops it at once (Python's own handler again), for a start-up that does not come back."""
    _INTERRUPTED.set()
    _interrupt_to_default()


def _interrupt_to_default() -> None:
    if signal.getsignal(signal.SIGINT) is _on_interrupt_in_start:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _hangup_to_default() -> None:
    """SIGHUP back to ending the process, where sdfleet's handler has it (one ignored, under nohup, stays so)."""
    if _HANGUP is not None and signal.getsignal(_HANGUP) in (_on_sigterm, _on_repeated_stop):
        signal.signal(_HANGUP, signal.SIG_DFL)


def _keep_sigterm_through_ray_init(local: bool):
    """`ray.init` sets a SIGTERM handler of its own for its start-up (sys.exit(15)): a SIGTERM then ended the
    command half a minute later with exit 15 and no word, or was dropped where Python ignores what a handler
    raises and the run went on. This driver keeps sdfleet's (stop_on_sigterm) instead. Starting a `local` Ray, the
    handler only notes the signal (_DEFERRED) and connect stops the command as ray.init returns, seconds later:
    raised between two of its steps, the KeyboardInterrupt left a half-made core worker that ray.shutdown()
    crashed on (SIGSEGV). A first Ctrl-C there is noted the same way (_INTERRUPTED), a second stops it at once.
    Joining a cluster can take minutes (a GCS that does not answer), so there the start-up is stopped at once, by
    either. Ray's workers set theirs in their own processes, untouched. Returns what to call once `ray.init` is
    done, to put Ray's settings back."""
    if _SIGTERM_RECEIVED.is_set() and signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        raise KeyboardInterrupt  # one came and its KeyboardInterrupt was lost (Python drops it in some places)
    stop_on_sigterm()
    undo = []
    try:
        import ray._private.utils as ray_utils

        original = ray_utils.set_sigterm_handler
        ray_utils.set_sigterm_handler = lambda handler: None
        undo.append(lambda: setattr(ray_utils, "set_sigterm_handler", original))
    except (ImportError, AttributeError):  # another Ray: nothing to keep
        pass
    try:
        # The driver's core worker, made within ray.init, sets Abseil's crash handler on SIGTERM too (C++, unseen
        # by Python): a SIGTERM in the half second before ray.init returned aborted the command (exit 134, no
        # word, lease left). Not in this process (Ray's workers keep theirs): a crash here still gets Python's
        # faulthandler trace, which Ray turns on in the driver.
        from ray._private import ray_constants

        crash_handler = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        undo.append(lambda: setattr(ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", crash_handler))
    except (ImportError, AttributeError):
        pass
    if local and sys.platform.startswith("linux"):
        # A local Ray's processes (GCS, raylet, and the workers the raylet starts) shared the command's process
        # group: a SIGTERM to the group (`timeout -s TERM`, `kill -- -PGID`) reached them with the command's, the
        # raylet died first, and the driver's core worker ended the process (exit 1, no word, lease left). They
        # start in a session of their own. They still end with the command: the GCS and the raylet by Linux's
        # parent-death signal (Ray sets it where the kernel has it; where not, Ray reaps them through this process
        # group, so they stay in it), the raylet's workers and agents as the raylet goes (the agents within a
        # minute: their last report to a GCS that is gone waits 60 s).
        try:
            import ray._private.utils as ray_utils
            from ray._private import services

            if ray_utils.detect_fate_sharing_support():
                popen = services.ConsolePopen
                services.ConsolePopen = functools.partial(popen, start_new_session=True)
                undo.append(lambda: setattr(services, "ConsolePopen", popen))
        except (ImportError, AttributeError):  # another Ray: as it starts them
            pass
    if local:
        _DEFERRED.set()  # (cleared by connect once it has acted on what was noted)
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            signal.signal(signal.SIGINT, _on_interrupt_in_start)
            undo.append(_interrupt_to_default)

    def put_back():
        for step in undo:
            step()

    return put_back


@contextlib.contextmanager
def _hangup_held_from_what_starts():
    """A local Ray's processes (GCS, raylet, and the workers the raylet starts) shared the command's process group
    (they still do where Ray reaps them through it: not Linux), so a closed terminal's SIGHUP reached them with
    the command's: they died while the command was still
    recording what had come back and leaving Ray. They are started with SIGHUP blocked (a signal mask is what
    the programs a process starts inherit), so a hang-up never reaches them and the command stops them as it
    leaves. The command blocks it only for Ray's start-up: a hang-up within it was ignored (and the run went on
    with nobody watching). The mask is this thread's: a thread started before (Arrow's) may still take the
    signal at once, so it is _DEFERRED, not the mask, that keeps the handler from raising within ray.init."""
    if _HANGUP is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {_HANGUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # one that came meanwhile is delivered now


@dataclass(frozen=True)
class ActorResources:
    """What each generation actor asks Ray for, and how it uses it."""

    num_cpus: float
    num_gpus: float
    torch_threads: int
    device: str


def runtime_env() -> dict:
    """The runtime environment for actors: forwarded env vars that are set (none are secrets)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # Empty when there is nothing to forward: any runtime env makes Ray start fresh workers instead of
    # using the ones it prestarted, a second or more on every task's first run.
    return {"env_vars": env} if env else {}


@contextlib.contextmanager
def library_logs_to(path: str, verbose: bool, *, scrub: Callable[[str], str]):
    """While open, Python log records of Ray, Ray Data and the libraries go to the file `path`, each line as
    `scrub` leaves it (the caller's: URI passwords out; a library may log a URL or put it in an exception);
    with `verbose` they also stay on the terminal. Open it before Ray starts: its start-up notices are logged."""
    import ray.data  # noqa: F401 - Ray Data configures its logger on import; this must come after

    root, ray_logger, data = logging.getLogger(), logging.getLogger("ray"), logging.getLogger("ray.data")
    saved = (root.level, ray_logger.propagate, list(data.handlers))
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(_Scrubbed("%(asctime)s %(levelname)s %(name)s: %(message)s", scrub))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # Ray's logger does not propagate by default, and `ray.init(configure_logging=False)` empties its
    # handlers: its records would reach Python's last-resort handler, which prints them here.
    ray_logger.propagate = True
    if not verbose:  # Ray Data's own console handler; its file handler (Ray's session logs) stays
        for h in list(data.handlers):
            if not isinstance(h, logging.FileHandler):
                data.removeHandler(h)
    if not data.propagate:
        data.addHandler(handler)
    # (a logger of sdfleet's own: under --verbose, Ray's logger prints to the terminal, where `echo` already has)
    saved_print = _route_cluster_notices(logging.getLogger("sdfleet.cluster"), echo=scrub if verbose else None)
    native = contextlib.nullcontext() if verbose else _native_stderr_to(path)
    logging.captureWarnings(not verbose)  # the libraries' Python warnings (Ray Data's UserWarnings) go there too
    try:
        with native:
            yield
    finally:
        logging.captureWarnings(False)
        if saved_print is not None:
            import ray._private.worker as ray_worker

            ray_worker.print_to_stdstream = saved_print
        root.removeHandler(handler)
        root.setLevel(saved[0])
        ray_logger.propagate = saved[1]
        data.handlers[:] = saved[2]
        handler.close()


class _Scrubbed(logging.Formatter):
    """A formatter whose every line, the traceback included, passes through `scrub`."""

    def __init__(self, fmt: str, scrub: Callable[[str], str]):
        super().__init__(fmt)
        self.scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        return self.scrub(super().format(record))


@contextlib.contextmanager
def _native_stderr_to(path: str):
    """While open, what C and C++ code writes to file descriptor 2 goes to the file `path`: Ray's core worker
    logs there from the driver process ("... has constructor arguments in the object store ..."), past any
    Python logging setting, and so do the processes started meanwhile. Python's `sys.stderr` keeps the
    terminal, so sdfleet's own lines (and a traceback) still show."""
    try:
        terminal = os.dup(2)
    except OSError:  # no standard error at all
        yield
        return
    swap = _writes_to_fd(sys.stderr, 2)
    saved = sys.stderr
    saved.flush()
    if swap:
        sys.stderr = open(terminal, "w", buffering=1, encoding=saved.encoding or "utf-8",
                          errors=saved.errors or "backslashreplace", closefd=False)
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        if swap:
            sys.stderr.close()
            sys.stderr = saved
        os.close(terminal)


def _writes_to_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # e.g. pytest's capsys: no descriptor behind it
        return False


def _route_cluster_notices(logger: logging.Logger, echo: Callable[[str], str] | None = None):
    """Send the cluster's notices to the driver ("(raylet) Task ... will be retried", "A worker died") to
    `logger` instead of stdout. Ray prints them from a background thread of the driver whatever
    `log_to_driver` says, through `ray._private.worker.print_to_stdstream`; sdfleet reports what they mean
    for the run (a row retried or failed) itself. The workers' own output, which Ray streams only with
    `log_to_driver` (connect's `worker_output`, and Ray's default under --verbose), goes there too. With
    `echo` (--verbose) Ray also prints each line as it would, passed through `echo` (which takes a URI's
    password out). Returns the function replaced, or None if this Ray has none."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None:
        return None

    def to_log(data, ignore_prefix: bool = False):
        pid = data.get("pid")
        if pid == "autoscaler":
            return original(data, ignore_prefix)
        if pid == "raylet":
            for line in data.get("lines", ()):
                logger.warning("(raylet) %s", line)
        else:  # a worker's own output (connect(worker_output=True)): its prints and tracebacks, named as Ray does
            who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={pid})"
            for line in data.get("lines", ()):
                logger.log(logging.WARNING if data.get("is_err") else logging.INFO, "%s %s", who, line)
        if echo is not None:
            return original({**data, "lines": [echo(line) for line in data.get("lines", ())]}, ignore_prefix)

    ray_worker.print_to_stdstream = to_log
    return original


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster a command joins: `address`, else RAY_ADDRESS; None when it starts a local Ray, which
    has this machine's cores and GPUs for good."""
    return address or os.environ.get("RAY_ADDRESS") or None


def local_gpu_shortfall(count_flag: str, wanted: int, gpus: float, cpu_instead: str) -> str | None:
    """Why a local Ray cannot start `wanted` processes of one GPU each (generation actors, training workers;
    `count_flag` asks for them): it has this machine's GPUs for good, and what it cannot place waits forever.
    `cpu_instead` says how to run on the CPU instead. None when it can."""
    if not gpus:
        return (f"this machine has no GPU Ray can use (Ray found none; check nvidia-smi and CUDA_VISIBLE_DEVICES): "
                f"{cpu_instead}")
    if wanted > gpus:
        return (f"{count_flag} {wanted} needs {wanted} GPUs (one each); this machine has {gpus:g}: give {count_flag} "
                f"{int(gpus)}, or --address a cluster that has or can add them")
    return None


def local_resources(num_cpus: int | None = None) -> dict[str, float] | None:
    """What `connect` will find in a local Ray before starting one: its CPUs and the GPUs Ray detects (and
    CUDA_VISIBLE_DEVICES leaves it), so a command can refuse what the local Ray could never place before
    spending minutes on work that comes first. None if this Ray version cannot say."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        gpus = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
    except Exception:  # noqa: BLE001 - a private API: without it the check waits for Ray's own count
        return None
    if visible is not None:
        gpus = min(gpus, len(visible))
    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def connect(address: str | None = None, num_cpus: int | None = None, quiet: bool = False,
            worker_output: bool = False) -> dict[str, float]:
    """Start local Ray or join a cluster; returns the cluster's total resources.

    `address` wins over RAY_ADDRESS; with neither, a local Ray with this machine's cores starts. `quiet`
    leaves Ray's logger to the handlers the caller set (see `library_logs_to`) and does not stream the
    workers' output to this terminal: it stays in Ray's session logs, or, with `worker_output`, goes to the
    caller's log file through `library_logs_to` (a fine-tune's workers: their tracebacks are its story).
    """
    import ray

    address = cluster_address(address)
    if address:
        _check_reachable(address)
    kwargs = dict(logging_level=logging.WARNING, runtime_env=runtime_env() or None)
    if quiet:
        kwargs.update(configure_logging=False, log_to_driver=worker_output)
    put_back = _keep_sigterm_through_ray_init(local=not address)
    try:
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                # "local": always a new Ray of our own, never one a `ray start` left on this machine (which a bare
                # ray.init() would join through /tmp/ray/ray_current_cluster, even when it is dead)
                with _hangup_held_from_what_starts():
                    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                             **kwargs)
        except KeyboardInterrupt:  # a stop while joining a cluster, or a second Ctrl-C: what it started goes too
            with contextlib.suppress(Exception):
                disconnect()
            raise
        except (ray.exceptions.AuthenticationError, ConnectionError, RuntimeError, ValueError) as exc:
            if not (_SIGTERM_RECEIVED.is_set() or _INTERRUPTED.is_set()):  # (a stop noted meanwhile: said below)
                raise _start_failed(exc, address) from (None if isinstance(exc, ray.exceptions.AuthenticationError)
                                                        else exc)
        finally:
            put_back()
        if _SIGTERM_RECEIVED.is_set() or _INTERRUPTED.is_set():  # one that came while Ray started (_DEFERRED;
            # the start may have failed since), or where Python drops what a handler raises (a logging lock): the
            # stop is what is said
            with contextlib.suppress(Exception):
                disconnect()
            raise KeyboardInterrupt
        stop_on_sigterm()
    finally:
        _DEFERRED.clear()
        _INTERRUPTED.clear()
    resources = dict(ray.cluster_resources())
    if address:
        # A joined cluster may be running other jobs: CPU actors are sized from the CPUs free now, so two runs
        # on one CPU cluster do not each take all of it and wait for each other forever.
        resources["CPU"] = min(resources.get("CPU", 0), ray.available_resources().get("CPU", 0))
    return resources


def _start_failed(exc: Exception, address: str | None) -> ClusterError:
    """The one line for a Ray that would not start (local) or let this driver join (`address`)."""
    import ray

    if isinstance(exc, ray.exceptions.AuthenticationError):  # its own words run on for a paragraph of Ray's help
        return ClusterError(f"cannot connect to {address or 'a local Ray'}: {exc.message}; "
                            f"{_token_hint(exc.message)}")
    if not address:
        return ClusterError(f"cannot start a local Ray: {exc}")
    hint = " (check --address / RAY_ADDRESS)"
    if not os.environ.get("RAY_AUTH_MODE"):
        hint = ("; if the cluster uses token authentication (what `ray start` turns on where a token exists), "
                "set RAY_AUTH_MODE=token with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN" + hint)
    return ClusterError(f"cannot connect to {address}: {exc}{hint}")


def _token_hint(message: str) -> str:
    """What to do about a token Ray refused or could not find. Ray 2.60's `ray start` turns token
    authentication on only where a token already exists (~/.ray/auth_token, which any local run writes, or
    RAY_AUTH_TOKEN), so RAY_AUTH_MODE=token against a cluster started without one finds none to send."""
    if "no authentication token was found" in message:
        return ("give the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on its head "
                "prints it); a cluster `ray start` began where no token existed has token authentication off: "
                "unset RAY_AUTH_MODE")
    return ("RAY_AUTH_TOKEN, or else ~/.ray/auth_token, must hold the cluster's own token (`ray get-auth-token` on its "
            "head prints it)")


def joined_address() -> str | None:
    """The GCS address of the cluster this process joined (for the run's first line), or None."""
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - older Ray, or not connected: the line goes without it
        return None


def disconnect() -> None:
    """Leave Ray; a local Ray that `connect` started stops with it.

    `ray.shutdown()` stops a local Ray's processes one after another, each given a second to exit on
    SIGTERM. The autoscaler monitor never makes it (its SIGTERM handler first reports to the GCS, already
    stopped by then), so every local run ended with a second of waiting before Ray killed it anyway. It is
    killed first here. Ray's own order follows for the rest: the raylet, which stops the workers, then the
    GCS. Joined clusters are left as they are: this process started nothing there.
    """
    import subprocess

    import ray
    from ray._private import ray_constants, worker  # no public handle on the local node's processes

    _let_ray_data_threads_end()
    node = getattr(worker, "_global_node", None)
    kind = getattr(ray_constants, "PROCESS_TYPE_MONITOR", "monitor")
    for info in getattr(node, "all_processes", {}).get(kind, []):
        process = getattr(info, "process", None)
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=5)
    ray.shutdown()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Ray's handler or ours: neither applies once Ray is left
        _hangup_to_default()


# Ray Data's driver threads that call into Ray: its executor's, and the workers fetching the blocks of an
# iterator (`iter_threaded`). A run stopped by Ctrl-C closes its iterator and shuts its executor down, which
# gives the executor's thread 2 s and the fetching workers none; one that returns into Ray after ray.shutdown()
# has taken the core worker away ends the whole process from C++ ("The core worker has already been shutdown
# ... The process will exit"), before the command can say it stopped (seen once in 11 Ctrl-C's). A finished
# run has none of them left. Its `Prefetcher` and `ray-data-metadata-prefetch` threads are not waited for: once
# idle they park for good (waiting for the latter added the whole 10 s to 2 of 5 Ctrl-C's).
RAY_DATA_THREADS = ("StreamingExecutor", "iter_threaded")
THREADS_END_SECONDS = 10.0


def _let_ray_data_threads_end(seconds: float = THREADS_END_SECONDS) -> None:
    """Before Ray goes: wait up to `seconds` for Ray Data's executor threads, and log the threads still alive
    (so a process that Ray's C++ side ends after all can be traced to the thread that called it)."""
    start = time.monotonic()
    try:
        for thread in threading.enumerate():
            if thread.name.startswith(RAY_DATA_THREADS) and thread is not threading.current_thread():
                thread.join(max(0.0, start + seconds - time.monotonic()))
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, but still leave Ray (its processes go with it)
        pass
    alive = [f"{t.name} ({t.native_id})" for t in threading.enumerate() if t is not threading.current_thread()]
    logging.getLogger("sdfleet").info("leaving Ray after %.1f s for Ray Data's threads; other threads: %s",
                                      time.monotonic() - start, ", ".join(alive) or "none")


def address_problem(address: str | None) -> str | None:
    """What is wrong with the form of a Ray address given to --address (or RAY_ADDRESS), told without a
    network call, so a command can say it before it reads any store; None for a GCS address or Ray's own
    `auto` and `local`."""
    if not address:
        return None
    if address.startswith("ray://"):
        return (f"--address {_ADDRESS_SECRET.sub('***@', address)} is a Ray Client address, on which Ray Data "
                "cannot run (it fails mid-run); give the GCS address, HEAD:6379, from a machine in the cluster's "
                "network, or submit the command with `ray job submit`")
    if address.startswith(("http://", "https://")):
        return (f"--address {_ADDRESS_SECRET.sub('***@', address)} is an HTTP address: that is the dashboard and "
                "job-submission address (what `ray job submit --address` takes); --address takes the GCS address, "
                "HEAD:6379")
    if "@" in address and "://" not in address:  # user:secret@host:6379: said without what comes before the @
        return f"--address ***@{address.rpartition('@')[2]} holds a user or password: a Ray GCS address is " \
               "HEAD:PORT and takes neither"
    return None


_ADDRESS_SECRET = re.compile(r"(?<=://)[^/@]*@")  # http://user:pw@host: what precedes the @ is never echoed


def _check_reachable(address: str, seconds: float = 10.0) -> None:
    """A HOST:PORT nothing answers on fails here in seconds: ray.init retries it for many minutes. So does the
    dashboard's port (8265, which `ray job submit` takes), which answers HTTP where the GCS speaks gRPC; and a
    Ray Client address (ray://), on which Ray Data cannot run."""
    import socket

    problem = address_problem(address)
    if problem:
        raise ClusterError(problem)
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # auto, local: Ray's own forms, checked by Ray
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds) as conn:  # [::1]:6379 too
            conn.settimeout(2.0)
            conn.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            answer = conn.recv(16)
    except socket.timeout:
        return  # connected, and no HTTP answer: a GCS waits for gRPC's own preface
    except OSError as exc:
        raise ClusterError(f"cannot connect to {address}: nothing answers there ({exc.strerror or exc}); is the Ray "
                           "head running, and is this its GCS port (6379 unless `ray start --port` said otherwise)? "
                           "(check --address / RAY_ADDRESS)") from exc
    if answer.startswith(b"HTTP/"):
        raise ClusterError(f"--address {address} answers HTTP: that is the dashboard and job-submission address "
                           "(what `ray job submit --address` takes); --address takes the GCS address, HEAD:6379")


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


@dataclass(frozen=True)
class FinishResources:
    """What the finishing stage (watermark, PNG, write: CPU work) asks Ray for."""

    num_cpus: float  # per finishing task
    workers: int  # finishing tasks at once


# Finishing tasks per GPU actor on a cluster not yet scaled up: a batch of 8 at 768 px takes ~0.7 s of one
# core to finish against ~3.8 s to draw on an H200 (docs/generation-speed.md), so two keep well ahead.
FINISH_PER_GPU_ACTOR = 2


def size_finishing(resources: dict[str, float], actors: ActorResources, num_actors: int) -> FinishResources:
    """The CPUs the generation actors and the read reserve leave free, one finishing task per whole CPU.

    Where the actors hold every CPU (a CPU-only machine) one finishing task runs without reserving a
    CPU: reserving one there would wait for a CPU that never frees up.

    A cluster that scales from zero shows only its head (often 0 CPUs) until the actors ask for GPUs, so
    what it shows says nothing of the nodes to come: there each GPU actor gets FINISH_PER_GPU_ACTOR tasks
    of one CPU, which wait for the GPU nodes' CPUs rather than crowd onto the head.
    """
    if actors.device == "cuda" and resources.get("GPU", 0) < num_actors:
        return FinishResources(num_cpus=1, workers=FINISH_PER_GPU_ACTOR * num_actors)
    free = resources.get("CPU", 0) - actors.num_cpus * num_actors - READ_CPU_RESERVE
    if free >= 1:
        return FinishResources(num_cpus=1, workers=int(free))
    return FinishResources(num_cpus=0, workers=1)


def size_actors(num_actors: int, resources: dict[str, float], device: str = "auto") -> ActorResources:
    """One GPU per actor where the cluster has GPUs (or `device="cuda"`); else a fair share of the CPUs.

    CPU actors get a fractional share (leaving READ_CPU_RESERVE for read tasks) and one torch thread per
    core of their share, so one actor on 2 cores uses both. An autoscaling cluster may show no GPU until
    an actor asks for one: pass `device="cuda"` there.
    """
    if num_actors < 1:
        raise ClusterError(f"--actors must be at least 1, got {num_actors}")
    gpus = resources.get("GPU", 0)
    cpus = resources.get("CPU", 0)
    if device == "cuda" or (device == "auto" and gpus >= 1):
        if device == "auto" and num_actors > gpus:
            raise ClusterError(f"--actors {num_actors} needs {num_actors} GPUs; the cluster has {gpus:g}")
        return ActorResources(num_cpus=1, num_gpus=1, torch_threads=1, device="cuda")
    share = (cpus - READ_CPU_RESERVE) / num_actors
    if share < MIN_CPU_SHARE - 1e-9:  # (float error: 1.3 CPUs / 26 is 0.04999...)
        most = math.floor((cpus - READ_CPU_RESERVE) / MIN_CPU_SHARE + 1e-9)
        raise ClusterError(f"--actors {num_actors} is too many for {cpus:g} CPUs (and no GPU): at most {most}, "
                           f"each with {MIN_CPU_SHARE:g} of a CPU, {READ_CPU_RESERVE:g} kept for reading"
                           if most >= 1 else f"--actors {num_actors}: {cpus:g} CPUs (and no GPU) leave none for an "
                           f"actor once {READ_CPU_RESERVE:g} is kept for reading")
    return ActorResources(num_cpus=round(share, 3), num_gpus=0, torch_threads=max(1, int(cpus // num_actors)), device="cpu")
