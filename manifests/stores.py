"""Which stores every process of a run can reach.

Actors, finishing tasks and Ray Train workers write and read in their own processes, often on other
machines. A `memory://` store lives in one process's memory, so what each of them writes there is lost;
a local path is only shared on one machine, or where the user says it is a mount every node shares."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import error_line

PROCESS_LOCAL = ("memory",)  # fsspec protocols whose files exist in one process only
FETCH_CHUNK = 128  # files `read_parquet_files` fetches together ...
FETCH_BYTES = 64 * 2**20  # ... as long as their bytes, held in memory until parsed, stay under this


# A password in a URI (`https://user:secret@host/...`, `ftp://...`): what sdfleet says and records shows it as ***.
_URI_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]*:)[^/\s@]+@")


def without_passwords(text: str) -> str:
    """`text` with the password of every URI in it replaced by ***: secrets belong in the environment, and what
    sdfleet prints or records ends up in CI logs, terminals' scrollback and files that travel with the outputs."""
    return _URI_PASSWORD.sub(r"\1***@", text)


class UnreadableFile(Exception):
    """A file of a store that cannot be read; `path` names it. `damaged`: it was fetched but is not what it
    should be (cut short, not Parquet); otherwise the store did not give it (unreachable, refused, gone)."""

    def __init__(self, path: str, cause: BaseException, damaged: bool):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause, self.damaged = path, cause, damaged


class MissingColumns(ValueError):
    """A Parquet file without a column it must have (read_parquet_files' `required`)."""


class StoreUnreachable(Exception):
    """A store whose client connects as it is made (ftp://, sftp://, smb://) did not answer."""


def url_to_fs(uri: str, **options):
    """(filesystem, path) for a path or URL the user gave, as fsspec reads it, except for `::`.

    fsspec reads `a::b` as a chain of URLs (`simplecache::s3://bucket/key`), so a folder named `/data/run::2`
    became `/data/run`, silently, and a relative `out::x` failed with "Protocol not known: out". Here `::`
    chains only where every link names a protocol (`simplecache::s3://...`, `zip://f.csv::s3://b/a.zip`);
    anywhere else it is part of the name, on this disk or in the store the URL names.

    A store that connects as its client is made and does not answer (a host name that does not resolve, a
    refused or timed-out connection) raises StoreUnreachable naming the URI: it was a traceback wherever a
    command opened one (`--out ftp://...`)."""
    import socket

    try:
        links = uri.split("::")
        if len(links) == 1 or all(_names_protocol(link) for link in links):
            return fsspec.core.url_to_fs(uri, **options)
        protocol = fsspec.core.split_protocol(uri)[0] or "file"
        cls = fsspec.get_filesystem_class(protocol)
        fs = cls(**{**cls._get_kwargs_from_urls(uri), **options})
        return fs, fs._strip_protocol(uri)
    except (socket.gaierror, ConnectionError, TimeoutError) as exc:
        raise StoreUnreachable(f"cannot reach {without_passwords(uri)}: {error_line(exc)} (check the URI, and that "
                               "the store answers from this machine)") from exc


def _names_protocol(link: str) -> bool:
    """True for a link of an fsspec chain: a protocol's name alone (`simplecache`) or a URL (`s3://b/k`)."""
    name = link if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", link) else fsspec.core.split_protocol(link)[0]
    return name is not None and (name in fsspec.available_protocols() or name in fsspec.registry)


def unknown_protocol(uri: str) -> str | None:
    """The protocol `uri` names (`foo` of `foo://x`) where fsspec has no store of that name, else None."""
    protocol = fsspec.core.split_protocol(uri.split("::")[-1] if _names_protocol(uri.split("::")[0]) else uri)[0]
    if protocol is None or protocol in fsspec.available_protocols() or protocol in fsspec.registry:
        return None
    return protocol


def unknown_protocol_reason(protocol: str) -> str:
    """Why a URI of `protocol` (see unknown_protocol) cannot be opened, and what would do."""
    if protocol.lower() != protocol and unknown_protocol(f"{protocol.lower()}://") is None:
        return f"{protocol}:// is not a store fsspec knows: protocols are lower case ({protocol.lower()}://)"
    return (f"{protocol}:// is not a store fsspec knows (s3://, gs://, az://, hdfs://, http(s):// and file:// are; "
            "fsspec.available_protocols() lists every one): check the URI, or give a local path")


def fs_protocols(fs) -> tuple[str, ...]:
    """A filesystem's protocol names (fsspec gives a string or a tuple)."""
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local_fs(fs) -> bool:
    """True for this machine's disk: files there can be renamed, listed with os, and reached by links."""
    return any(p in ("file", "local") for p in fs_protocols(fs))


BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs")


def missing(fs, path: str) -> bool:
    """Whether the store says `path` is not there. fsspec's HTTP store answers `exists` with False when the
    host does not answer at all (it catches the connection error), which the user was then told as "does not
    exist": here a byte is read to ask again, so that error is raised for the caller to put in words."""
    if fs.exists(path):
        return False
    try:
        fs.cat_file(path, start=0, end=1)
    except (FileNotFoundError, IsADirectoryError):
        return True
    return False  # it reads after all: the caller goes on and reads it


def require_bucket(fs, root: str, flag: str, uri: str, error: type[Exception]) -> None:
    """Raise `error` when `root` is on an object store whose bucket does not exist (or these credentials
    cannot see): s3fs and gcsfs create a missing bucket when a folder is made in it, so a typo in a bucket
    name would make a new bucket. `flag` and `uri` name what the user gave."""
    if not set(fs_protocols(fs)) & set(BUCKET_PROTOCOLS):
        return
    bucket = root.strip("/").split("/", 1)[0]
    if unresolved := _endpoint_unresolved(fs):
        raise error(_not_answering(flag, uri, unresolved))
    try:
        if fs.exists(bucket):  # (gcsfs raises what s3fs turns into False)
            return
        # asked again: s3fs's `exists` answers False for every error, a store that does not answer among them
        fs.ls(bucket)
    except FileNotFoundError:
        raise error(f"{flag} {uri}: bucket {bucket!r} does not exist (or these credentials cannot see it); sdfleet "
                    "does not create buckets: create it, or fix the name") from None
    except PermissionError as exc:  # a wrong secret key (SignatureDoesNotMatch), or no right to this bucket
        raise error(f"{flag} {uri}: the store refused these credentials for bucket {bucket!r} ({error_line(exc)}); "
                    "check the credentials in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a "
                    "profile; GOOGLE_APPLICATION_CREDENTIALS for gs://), that they may use the bucket, and its "
                    "name") from None
    except Exception as exc:  # noqa: BLE001 - the store's own error types (botocore's, aiohttp's) name the cause
        if _credentials_missing(exc):  # no credentials found: the store was never asked
            raise error(f"{flag} {uri}: no credentials for the store ({error_line(exc)}); give them in the "
                        "environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or the node's "
                        "workload identity; GOOGLE_APPLICATION_CREDENTIALS for gs://)") from exc
        raise error(_not_answering(flag, uri, error_line(exc))) from exc


def _not_answering(flag: str, uri: str, cause: str) -> str:
    return (f"{flag} {uri}: the store does not answer ({cause}); check its endpoint (AWS_ENDPOINT_URL for "
            "S3-compatible stores, STORAGE_EMULATOR_HOST for a GCS emulator) and the network")


def _endpoint_unresolved(fs) -> str | None:
    """Why the host of gcsfs's endpoint has no address (a typo in STORAGE_EMULATOR_HOST, a machine without
    DNS), or None: gcsfs retries a name that does not resolve as any other failure, twice over for one bucket,
    and a command waited over a minute to say so. (s3fs's retries end in seconds.)"""
    import socket
    from urllib.parse import urlsplit

    location = getattr(fs, "_location", None) if "gcs" in fs_protocols(fs) else None
    if not isinstance(location, str):
        return None
    try:
        parts = urlsplit(location)
        socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        return f"cannot resolve the host of {location}: {exc}"
    return None


def _credentials_missing(exc: BaseException) -> bool:
    """Whether `exc`, or what it was raised from, is a client's "no credentials found" (botocore's
    NoCredentialsError; google.auth's DefaultCredentialsError), by name: neither library is imported here."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in ("NoCredentialsError", "DefaultCredentialsError"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def folder_files(fs, folder: str, suffix: str = "") -> dict[str, dict]:
    """The files directly in `folder` whose names end in `suffix`, each with its details, found by listing
    the folder, not by globbing: an output's name may hold glob characters (`run[1]`, `shots*`) that fs.glob
    reads as a pattern, matching other folders or none. {} when the folder does not exist. The store is asked
    now: s3fs and gcsfs keep a listing and answer from it later, and other processes (the actors) write here in
    between, so the report written at the end of a run listed the images it had redrawn as missing."""
    folder = folder.rstrip("/")
    fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"]: e for e in entries
            if e.get("type") == "file" and e["name"].rstrip("/") != folder and e["name"].endswith(suffix)}


def stored_at(info: dict) -> float | None:
    """When a file was last written, in seconds since the epoch, from a listing's details (local `mtime`,
    s3fs `LastModified`, gcsfs `updated`, memory `created`); None where the store does not say."""
    for key in ("mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and value:
            try:
                value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
    return None


# The fields in which object stores give a version tag that changes whenever a file's bytes do (s3fs: ETag;
# gcsfs: generation; adlfs: etag). HTTP's ETags may be weak ("W/..."): not used.
VERSION_FIELDS = ("ETag", "etag", "generation")


def version_tag(info: dict) -> tuple[str, str] | None:
    """(field, tag) of the store's version tag in a file's details, or None where it gives none to trust."""
    return next(((f, str(info[f])) for f in VERSION_FIELDS if info.get(f) and not str(info[f]).startswith("W/")), None)


def file_stamp(fs, path: str) -> str:
    """What identifies the version of a file now: its size and the store's version tag, or its last write time
    where there is no tag (a local disk). Read past fsspec's listing cache. Equal stamps: the same file, as far
    as the store can say without reading it."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        fs.invalidate_cache(path)
    info = fs.info(path)
    tag = version_tag(info)
    if tag:
        return f"size={info.get('size')}; tag={tag[1]}"
    inode = f"; inode={info['ino']}" if info.get("ino") else ""  # a local file replaced by a rename
    return f"size={info.get('size')}; written={stored_at(info)}{inode}"


def is_folder(fs, path: str) -> bool:
    """Whether `path` is a folder to list. Asked before `isfile`: over HTTP a folder's listing page is a file
    too, and was read as one Parquet file. A folder named `x.parquet` (as Spark writes) is a folder unless
    the store says it is a file as well (over HTTP it does: there name the parts, or the folder's URL
    without `.parquet`)."""
    return fs.isdir(path) and not (path.lower().endswith(".parquet") and fs.isfile(path))


def tree_files(fs, root: str) -> list[str]:
    """Every file below the folder `root`, sorted. On this machine's disk, folders reached by a symbolic link
    are searched too (fsspec's find lists such a link as one file and goes no further), each real folder
    once, so a link back up the tree does not loop."""
    if not is_local_fs(fs):
        return sorted(fs.find(root))
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        found += [os.path.join(folder, name) for name in files]
    return sorted(found)


def read_parquet(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file from any fsspec store, read entirely in the calling thread.

    Given a Python file object, `pq.read_table` hands reads to Arrow's thread pool by default, and some of
    that work can still be running after it returns. If the process exits then, an Arrow thread asks a
    finished interpreter for the GIL and the process aborts (SIGABRT) after all its work is done: apache/arrow
    #33975 and #50482. A rerun with nothing to draw exits within a second of reading the ledger and hit it.
    Read in this thread, nothing outlives the call (tests/test_identity_and_stores.py runs the exit many times);
    and since Arrow is handed the file's bytes, not a Python file object, none of its threads ever calls back into
    Python (with the file object, one such exit in a loaded CI run still aborted: "terminate called without an
    active exception"). The files read whole are small: a caption list, the report's index.
    """
    with fs.open(path, "rb") as f:
        data = f.read()
    return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False, pre_buffer=False)


def read_parquet_files(fs, paths: list[str], columns: list[str] | None = None,
                       sizes: dict[str, int | None] | None = None,
                       optional: tuple[str, ...] = (),
                       required: tuple[str, ...] = ()) -> Iterator[tuple[str, pa.Table]]:
    """(path, table) for many small Parquet files of one store, in the order given.

    A ledger gains a part every 256 rows or 10 s and is never rewritten, so a nightly job's output holds
    thousands. Read one by one from an object store, each costs its own round trips; `cat_ranges` fetches
    up to FETCH_CHUNK of them at once, concurrently on async stores (s3fs, gcsfs, adlfs) and as plain reads
    elsewhere. `sizes` (from a detailed listing) keeps each fetch under FETCH_BYTES. Tables are parsed in
    this thread (see `read_parquet`). Of `columns`, those in `optional` may be missing from a file (a ledger
    part written before a column was added); those in `required` must be in every file even where it is read
    whole (`columns` None). A file that cannot be fetched or parsed, or lacks a column it must have, raises
    UnreadableFile naming it (by its URI on an object store, as a user would move it aside).
    """
    def named(path: str) -> str:
        return path if is_local_fs(fs) else fs.unstrip_protocol(path)

    for chunk in _fetch_chunks(paths, sizes or {}):
        fetched = fs.cat_ranges(chunk, None, None, on_error="return")
        for i, path in enumerate(chunk):
            data, fetched[i] = fetched[i], None  # each file's bytes go as soon as it is parsed
            if isinstance(data, BaseException):
                raise UnreadableFile(named(path), data, damaged=False) from data
            try:
                table = _parquet_table(data, columns, optional, required)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise UnreadableFile(named(path), exc, damaged=True) from exc
            yield path, table


def _parquet_table(data: bytes, columns: list[str] | None, optional: tuple[str, ...],
                   required: tuple[str, ...]) -> pa.Table:
    needed = dict.fromkeys([*required, *(c for c in columns or () if c not in optional)])

    def check(names) -> None:
        if lacking := [c for c in needed if c not in names]:
            raise MissingColumns(f"it has no column {', '.join(lacking)}")

    if columns is not None and (optional or required):  # (the footer is read once more only here)
        names = set(pq.read_schema(pa.BufferReader(data)).names)
        check(names)
        columns = [c for c in columns if c in names or c not in optional]
    table = pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False, pre_buffer=False)
    if columns is None:
        check(table.column_names)
    return table


def _fetch_chunks(paths: list[str], sizes: dict[str, int | None]) -> Iterator[list[str]]:
    chunk, held = [], 0
    for path in paths:
        size = sizes.get(path) or 0
        if chunk and (len(chunk) == FETCH_CHUNK or held + size > FETCH_BYTES):
            yield chunk
            chunk, held = [], 0
        chunk.append(path)
        held += size
    if chunk:
        yield chunk


def process_local(uri: str) -> bool:
    """True for a store only the process that opened it can see (memory://). Read from the URI alone: a check of
    flags imports no store's package (gcsfs, s3fs) and opens no client."""
    return any(fsspec.core.split_protocol(link)[0] in PROCESS_LOCAL for link in uri.split("::"))


def missing_package(exc: ImportError) -> list[str]:
    """The protocols whose store package `exc` says is not installed (fsspec raises the `err` text its registry
    keeps for them: `gcs` and `gs` share gcsfs's), sorted; [] for any other ImportError."""
    from fsspec.registry import known_implementations

    return sorted(p for p, spec in known_implementations.items() if spec.get("err") == str(exc))


def store_problem(flag: str, uri: str) -> str | None:
    """Why `uri`, given for `flag`, cannot be a store that every process of a run reaches, or None: a protocol
    fsspec does not know (a typo), one whose package is not installed, or memory:// (each process has its own)."""
    protocol = unknown_protocol(uri)
    if protocol:
        return f"{flag} {uri}: {unknown_protocol_reason(protocol)}"
    for link in uri.split("::"):  # a store whose package is not installed (gcsfs, adlfs): said before any work
        named = fsspec.core.split_protocol(link)[0]
        if not named:
            continue
        try:
            fsspec.get_filesystem_class(named)  # (its package imported; no client made, nothing opened)
        except ImportError as exc:  # every protocol of that package, as describe_error says it (gcs:// or gs://)
            which = " or ".join(f"{p}://" for p in missing_package(exc) or [named])
            return f"{flag} {uri}: {which} cannot be opened: {exc}"
    return unshared_reason(flag, uri) if process_local(uri) else None


def is_local_path(uri: str) -> bool:
    """True for a path on this machine's disk (a plain path or file://)."""
    return is_local_fs(url_to_fs(uri)[0])


def absolute_local(uri: str) -> str:
    """`uri` as another process of the run can open it: a plain local path made absolute, `~` expanded (Ray
    starts its workers in folders of its own, not in the driver's working directory, and with `--out=~/x` no
    shell expands it); `file:///x` as `/x` (one folder, one spelling: a rerun given the other spelling is the same
    run); a URI without trailing slashes (gcsfs keeps one: OUT/run.json became OUT//run.json)."""
    if uri.startswith("file:///"):
        uri = uri.removeprefix("file://")
    if "://" not in uri and is_local_path(uri):
        return os.path.abspath(os.path.expanduser(uri))
    head, sep, rest = uri.partition("://")
    return f"{head}://{rest.rstrip('/') or rest}" if sep else uri


def run_path(flag: str, uri: str) -> str:
    """`uri`, given for `flag`, as every process of the run opens it (`absolute_local`). In a command that runs as
    a Ray job (`ray job submit`) a relative local path is refused (ValueError): the job's working directory is
    Ray's unpacked copy of its --working-dir (under the session's runtime_resources, removed with the package)
    or the folder `ray start` ran in, so an output there is lost, and the next run, with another package, would
    not find it."""
    in_job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if in_job and "://" not in uri and not os.path.isabs(os.path.expanduser(uri)) and is_local_path(uri):
        raise ValueError(f"{flag} {uri} is a relative path, and this command runs as a Ray job, whose working "
                         f"directory is {os.getcwd()} (Ray's copy of the job's --working-dir, or where `ray start` "
                         "ran): give an absolute path or a URI (s3://, gs://)")
    return absolute_local(uri)


def unshared_reason(flag: str, uri: str) -> str:
    """Why a `memory://` store cannot be used for `flag`, and what to use instead."""
    return (f"{flag} {uri} is the memory of one process: the workers would each write into their own and "
            "nothing would be kept; use a local path on one machine, or an object store every node reaches "
            "(s3://, gs://)")


def gone_at_exit_reason(flag: str, uri: str, what: str) -> str:
    """Why a command's own output (`what`: "the sheet") cannot go to `memory://`: it ends with the command."""
    return (f"{flag} {uri}: memory:// lives in this process only, and {what} would be gone when it ends; give a "
            "path or a shared store (s3://, gs://)")


def multi_node_reason(flag: str, uri: str, nodes: int, shared_flag: str) -> str:
    return (f"{flag} {uri} is a local path, and the cluster has {nodes} nodes: each would write to its own disk "
            f"and the run's output would be scattered; use an object store every node reaches (s3://, gs://), "
            f"or pass {shared_flag} if {uri} is a mount every node shares (NFS, a shared volume)")
