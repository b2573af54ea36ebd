"""The errors that stop a command (exit 1), and the one line each is said in, with what to do about it.

The drivers' own errors are defined here, so the CLI can name every kind without importing the drivers
(which import this module for `root_cause`)."""

from __future__ import annotations

import re

from manifests.schema import error_line


class RunFailed(Exception):
    """`generate` could not start or could not finish."""


class OutputTaken(RunFailed):
    """Another run started into the same --out in the same instant and kept it (`Lease.confirm`): what this
    run had begun to write there (its log file) is not kept in the other run's output."""


class FinetuneError(Exception):
    """The fine-tune cannot start or did not finish."""


class EvalError(ValueError):
    """The run cannot be scored."""


class ReportError(ValueError):
    """A run's output cannot be read back for a report or a contact sheet."""


class GroupByError(ReportError):
    """The column a report was asked to group by is not one its rows can be grouped by."""


def describe_error(exc: BaseException) -> str | None:
    """The message for a known error type, or None for a bug (which should show its traceback)."""
    from actors.models import ModelError
    from actors.opencv import OpenCVUnavailable
    from actors.watermark import WatermarkError
    from cluster.connect import ClusterError
    from manifests.dataset import DatasetError
    from manifests.expand import ExpandError
    from manifests.reader import BadManifestFile, ManifestError
    from manifests.stores import StoreUnreachable

    hints = {
        BadManifestFile: None,  # its message says what to do; the paths were right
        ManifestError: "check the manifest paths (local paths, URIs or globs of .parquet files)",
        ModelError: None,  # its messages name the model and what a reference may be; generate, finetune --base
        # and model export all raise it, so a hint naming one command's flag would mislead the others
        ClusterError: None,  # each names its flag (--address, --actors, --workers) and what would do
        ExpandError: None,
        WatermarkError: None,
        OpenCVUnavailable: None,  # it says what to install
        RunFailed: None,
        DatasetError: None,
        FinetuneError: None,
        EvalError: None,
        ReportError: None,
        StoreUnreachable: None,  # it names the URI
    }
    for kind, hint in hints.items():
        if isinstance(exc, kind):
            return f"{exc}" + (f" ({hint})" if hint else "")
    store = _store_unavailable(exc) or _store_refused(exc)
    if store:
        return store
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return str(exc)
    return None


# The client libraries behind fsspec's stores: an error of theirs that no call site put in words is the store
# refusing (credentials) or not answering, not a bug of sdfleet's.
STORE_LIBRARIES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google.auth", "google.api_core", "google.cloud",
                   "aiohttp", "adlfs", "azure")


def _store_refused(exc: BaseException) -> str | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        module = type(exc).__module__
        if any(module == name or module.startswith(name + ".") for name in STORE_LIBRARIES):
            return (f"a store refused or did not answer: {error_line(exc)} (check the URIs given, and the store's "
                    "credentials in the environment)")
        exc = exc.__cause__  # raised `from` one of theirs (s3fs turns botocore's errors into OSErrors)
    return None


def _store_unavailable(exc: BaseException) -> str | None:
    """A store whose fsspec implementation cannot be loaded on this machine (gs://, az://, hdfs://...), said with
    its protocol and what to install, or that fsspec does not know (a typo); None for any other error."""
    from manifests.stores import missing_package, unknown_protocol_reason

    if isinstance(exc, ImportError):
        # fsspec raises its registry's `err` text from the failed import; that text names the package. Any other
        # ImportError is a bug of ours and keeps its traceback.
        protocols = missing_package(exc)
        if protocols:
            cause = f" ({exc.__cause__})" if isinstance(exc.__cause__, ImportError) else ""  # No module named 'gcsfs'
            return f"{' or '.join(p + '://' for p in protocols)} cannot be opened: {exc}{cause}"
    if isinstance(exc, ValueError) and str(exc).startswith("Protocol not known: "):  # fsspec's, for `foo://x`
        return unknown_protocol_reason(str(exc).removeprefix("Protocol not known: "))
    if isinstance(exc, OSError) and str(exc).startswith(("Unable to load libjvm", "Unable to load libhdfs")):
        # pyarrow's HadoopFileSystem loads a JVM and libhdfs when it connects; its message goes on to list every
        # dlopen it tried (some 90 lines), so only the first line is kept.
        return (f"hdfs:// cannot be opened: {str(exc).splitlines()[0]} (HDFS needs Java and Hadoop on this machine: "
                "JAVA_HOME, HADOOP_HOME and CLASSPATH, see pyarrow's HadoopFileSystem)")
    return None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type where the message alone would not say what failed."""
    return error_line(exc, limit, typed=(RunFailed, FinetuneError, EvalError, ReportError))


def root_cause(exc: BaseException) -> str:
    """Ray wraps actor errors several times; the innermost message is the one a user can act on. Ray Data
    marks its own errors with an empty `SystemException` as their cause: that says nothing, the one it marks does
    (an actor that died in its constructor carries the constructor's error, ModelError included, as its last line)."""
    said = exc
    while exc.__cause__ is not None:
        exc = exc.__cause__
        if str(exc).strip():
            said = exc
    text = str(said).strip().splitlines()
    # Ray Data appends its retry notice to an error raised in its tasks ("Failed to ... after 1/1 attempts
    # (total backoff 0.0s)." and a tip on configuring retries): the error is the line before it
    retried = [i for i, line in enumerate(text) if RAY_DATA_RETRY_NOTICE.match(line)]
    if retried and retried[-1] > 0:
        text = text[:retried[-1]]
    return text[-1] if text else type(said).__name__


RAY_DATA_RETRY_NOTICE = re.compile(r"Failed to .* after \d+/\d+ attempts \(total backoff [\d.]+s\)\.$")
