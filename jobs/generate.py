"""`sdfleet generate`: manifests in, images + ledger + run.json out, on a pool of Ray actors.

    manifests --plan tasks (validate, resolve, skip done)--> work rows, held in the object store
      invalid / skipped / failed rows --> recorded here, no actor needed
      rows to draw --sort by adapter set--> blocks of `batch_size` rows
        --ActorPoolStrategy(size=actors)--> GeneratorActor: draw (pixels out)
        --CPU tasks (finishing stage)--> watermark, read it back, encode PNG, write
      --> ledger rows streamed back here --> results/*.parquet parts + run.json

The draw stage hands each batch's pixels on and takes the next block at once; the finishing stage runs on
the CPUs the actors leave free, so a GPU never waits for CPU work. `--finish inline` does both in the
actor instead, batch after batch: the default on CPU-only actors, which hold every core (FINISH_ON_CPU).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import sys
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from actors.backends import BackendError, check_backend
from actors.batch_size import AUTO_BLOCK
from actors.crash_journal import JOURNAL_NAME, start_journal
from actors.models import describe_model
from actors.presets import PRESETS, preset_name_problem
from cluster.connect import (ClusterError, address_problem, alive_nodes, cluster_address, connect, disconnect,
                             joined_address, library_logs_to, local_gpu_shortfall, local_resources, size_actors,
                             size_finishing, stop_signal, watch_cluster)
from jobs.console import command_log, leave, log, recorded_json, ticking, without_passwords
from jobs.errors import RunFailed, describe_error, one_line, root_cause
from jobs.lease import Lease
from jobs.outputs import RESTORED_MARK, recorded_again
from jobs.recorder import LEDGER_FLUSH_ROWS, Recorder, located
from manifests.dataset import SUMMARY_FILE as DATASET_SUMMARY
from manifests.ledger import (LEDGER_COLUMNS, atomic_write, damaged_part, extra_columns, ledger_parts, ledger_row,
                              newest_ok_entries, not_a_part, read_latest_ok, remove_stale_temp_files, settled_row,
                              size_differs)
from manifests.reader import BadManifestFile, expand_manifest_paths, survey, unreadable_files
from manifests.schema import FIELDS, look_alike_columns, look_alike_warning, watermark_payload_problem
from manifests.stores import (UnreadableFile, absolute_local, folder_files, is_local_fs, is_local_path, multi_node_reason,
                              require_bucket, run_path, store_problem, stored_at, url_to_fs)

# `--finish auto` on CPU actors. On 2 cores, finishing in the actor measured faster end to end (43 against
# 47 s for 96 tiny images; `python -m benchmarks.bench_generate`, docs/generation-speed.md): the actor's two torch
# threads already hold both cores, and a finishing worker only competes with them. On GPUs the finishing
# stage always runs on its own.
FINISH_ON_CPU = "inline"
ADAPTER_READS = 4  # adapters the driver reads at once to fingerprint them (each is held in memory while hashed)
MAX_BATCH_SIZE = 256  # rows per forward pass a --batch-size may ask for


class GenerateConfig(BaseModel):
    """Everything one `generate` run is told; checked before Ray starts."""

    manifests: list[str] = Field(min_length=1, description="Parquet manifests: paths, URIs or globs")
    out: str = Field(description="output root (local path or fsspec URI): images/, results/, run.json",
                     json_schema_extra={"metavar": "URI"})
    models: dict[str, str] = Field(default_factory=dict, description="a model rows may name, as NAME=REF (a preset, "
                                   "diffusers directory or URI; repeat for more); `default` is `tiny` unless given")
    adapters: str | None = Field(default=None, description="adapter store (folder or URI) the rows' adapters are read from",
                                 json_schema_extra={"metavar": "URI"})
    actors: int = Field(default=1, ge=1, description="generation actors (one GPU each where there are GPUs)",
                        json_schema_extra={"metavar": "N"})
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] | Literal["auto"] = Field(
        default=8, description=f"rows per forward pass, 1..{MAX_BATCH_SIZE}, or auto: measured once per model, size "
        "and device, and kept in the backend cache")
    backend: Literal["eager", "compile", "onnx", "tensorrt"] = Field(
        default="eager", description="how actors run the pipeline (actors/backends/)")
    backend_cache: str | None = Field(
        default=None, description="where onnx exports, TensorRT engines and torch.compile artefacts are cached "
        "(default $SDFLEET_CACHE); a shared URI lets every actor and run start warm",
        json_schema_extra={"metavar": "URI"})
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        default="auto", description="compile backend: torch.compile's mode (auto: reduce-overhead, i.e. CUDA graphs, "
        "on GPUs; default on CPUs, where reduce-overhead is default too: no CUDA graphs)")
    watermark: str | None = Field(default="sdfleet", description="the invisible watermark's payload, in every image")
    force: bool = Field(default=False, description="redraw every row, done or not")
    address: str | None = Field(default=None, description="Ray address; default RAY_ADDRESS, else local Ray",
                                json_schema_extra={"metavar": "ADDRESS"})
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="where actors run; auto: GPUs if the "
                                                   "cluster has any")
    verbose: bool = Field(default=False, description="also show Ray's and the libraries' log lines here "
                          "(they always go to the run's log file)")
    finish: Literal["auto", "stage", "inline"] = Field(
        default="auto", description="where images are marked, encoded and written: `stage`, CPU workers of their "
        "own Ray Data stage while actors draw on; `inline`, in the actor after each batch; `auto`, stage on GPUs and "
        "inline on CPU-only actors")

    shared_out: bool = Field(default=False, description="--out is a local path every node mounts (NFS, a shared "
                             "volume): allow it on a cluster of more than one node")
    wait: bool = Field(default=False, description="if another run holds --out, wait for it to finish instead of "
                       "stopping")
    plan_only: bool = Field(default=False, description="plan every row and say how many would be drawn, skipped, "
                            "recovered or are invalid; draw and write nothing")
    report: bool = Field(default=False, description="write OUT/report/index.html when the run ends (as `sdfleet "
                         "report` does)")
    report_group_by: str | None = Field(default=None, description="the ledger column the report groups images by "
                                        "(sku, scene_id, adapters, any manifest column); implies --report",
                                        json_schema_extra={
                                            "metavar": "COLUMN"})
    rows_may_fail: bool = Field(default=False, description="exit 0 when the run finished but some rows failed or "
                                "are invalid (they stay in the ledger and run.json); for schedulers that retry "
                                "any non-zero exit on a new cluster")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size_in_range(cls, value: Any) -> Any:
        # one line for a number out of range or a word, not pydantic's two (one per member of the union)
        if isinstance(value, str) and value != "auto":
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"must be a whole number in 1..{MAX_BATCH_SIZE}, or auto; got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= MAX_BATCH_SIZE:
            raise ValueError(f"must be a whole number in 1..{MAX_BATCH_SIZE}, or auto; got {value}")
        return value

    @model_validator(mode="after")
    def _defaults_and_backend(self) -> "GenerateConfig":
        for name, ref in self.models.items():
            if problem := preset_name_problem(name, ref):
                raise ValueError(problem)
        self.models = {"default": "tiny", **self.models}
        self.report = self.report or self.report_group_by is not None  # asked how to group it: a report is wanted
        if self.watermark == "":
            raise ValueError("--watermark must not be empty (use --no-watermark to turn it off)")
        problem = watermark_payload_problem(self.watermark) if self.watermark is not None else None
        if problem:
            raise ValueError(f"--watermark {self.watermark!r} {problem}")
        if self.compile_mode != "auto" and self.backend != "compile":  # ignored without a word before
            raise ValueError(f"--compile-mode {self.compile_mode} is for --backend compile (torch.compile's mode); "
                             f"got --backend {self.backend}: give --backend compile, or leave --compile-mode out")
        stores = [("--out", self.out), ("--adapters", self.adapters), ("--backend-cache", self.backend_cache),
                  *(("a manifest", m) for m in self.manifests)]
        for flag, uri in stores[:3]:  # "" would be the working directory: a run would spill its folders there
            if uri is not None and not uri.strip():
                raise ValueError(f"{flag} must not be empty: give a folder or URI"
                                 + (", e.g. --out out/run1" if flag == "--out" else f", or leave {flag} out"))
        stores += [("--model", ref) for ref in self.models.values() if "://" in ref]
        for flag, uri in stores:  # before Ray starts: every actor and task must see the same store
            if uri and (problem := store_problem(flag, uri)):
                raise ValueError(problem)
        for field in ("out", "adapters", "backend_cache"):  # workers do not share the driver's working directory
            if getattr(self, field):
                setattr(self, field, run_path("--" + field.replace("_", "-"), getattr(self, field)))
        # a model folder as the actors can open it (a preset's or a hub id's name, not a folder here, as given)
        self.models = {name: absolute_local(ref) if "://" in ref or os.path.isdir(os.path.expanduser(ref)) else ref
                       for name, ref in self.models.items()}
        return self


# What the actors do before their first images, by backend, for the progress line said while nothing comes back
FIRST_WAIT = {
    "compile": "actors starting, loading the model, then compiling it: minutes where --backend-cache holds no "
               "graphs for it yet",
    "onnx": "actors starting, loading the model, then exporting it to ONNX: minutes where --backend-cache holds "
            "no export of it yet",
    "tensorrt": "actors starting, loading the model, then building TensorRT engines: minutes where --backend-cache "
                "holds none for it yet",
}

# Files that say a folder is another command's output, which a run must not write into.
OTHER_OUTPUTS = {"finetune.json": "a fine-tune's output", "model_index.json": "a model's folder",
                 DATASET_SUMMARY: "a training dataset"}


def not_a_run_summary(fs, path: str) -> str | None:
    """Why the JSON at `path` is not a run.json sdfleet wrote, or None (no file, or one of sdfleet's; a file cut
    short is rewritten by the run)."""
    try:
        found = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(found, dict):
        return f"a JSON {type(found).__name__}, not an object"
    if not isinstance(found.get("run_id"), str):
        return "it has no run_id"
    return None


def run_generate(cfg: GenerateConfig, *, actor_cls=None) -> dict:
    """Run one generation job; returns the run summary written to run.json.

    `actor_cls` replaces the draw stage's actor (a subclass of actors.actor.GeneratorActor): benchmarks pass
    a stand-in for an accelerator.
    """
    started = time.time()
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]

    # 1. an --address of the wrong form, then the output store, reachable and writable, before anything is drawn
    address = cluster_address(cfg.address)
    if problem := address_problem(address):
        raise RunFailed(problem)
    if not address:  # a local Ray's workers are this machine's:
        if not cfg.plan_only:  # without OpenCV's system libraries they could finish no image (one line)
            from actors import opencv

            opencv.load()
        _check_local_devices(cfg)  # a dry run too: it would start Ray and plan, then refuse
    fs, root = url_to_fs(cfg.out)  # a store whose package is missing, or HDFS without Java: said (describe_error)
    try:
        require_bucket(fs, root, "--out", cfg.out, RunFailed)
        if fs.isfile(root):  # an object store would take `file/results/...` keys beside it: refused as a disk does
            raise RunFailed(f"--out {cfg.out} is a file; give a folder for the run's images and ledger (a new one, "
                            "or an earlier run's to add to it)")
        for marker, what in OTHER_OUTPUTS.items():  # its images and ledger would mix with them, and a fine-tune
            if fs.isfile(f"{root}/{marker}"):  # there would no longer resume (it refuses a run's output)
                raise RunFailed(f"--out {cfg.out} is {what} ({marker}); give the run a folder of its own")
        if foreign := not_a_run_summary(fs, f"{root}/run.json"):  # another tool's run.json: it would be replaced
            raise RunFailed(f"--out {cfg.out} holds a run.json that sdfleet did not write ({foreign}): another "
                            "tool's output, whose files a run would write over; give the run a folder of its own")
        if cfg.backend_cache and (cfg.backend != "eager" or cfg.batch_size == "auto"):  # (else it is never read)
            check_backend_cache(cfg.backend_cache, make=not cfg.plan_only, here=not address)
        made = not cfg.plan_only and is_local_fs(fs) and not fs.exists(root)  # (an object store's folders are names)
        if cfg.plan_only:  # writes nothing: reachable is enough
            fs.exists(root)
        else:
            fs.makedirs(f"{root}/results", exist_ok=True)
    except RunFailed:
        raise
    except Exception as exc:  # any backend error means the same thing here
        raise RunFailed(f"cannot write to --out {cfg.out}: {exc}") from exc
    # ... and this run's alone until it ends: a second run into it refuses, or waits with --wait
    try:
        with contextlib.nullcontext() if cfg.plan_only else Lease(fs, root, run_id, wait=cfg.wait) as lease:
            return _plan_and_run(cfg, fs, root, run_id, started, actor_cls, lease)
    except BaseException:
        if made:  # a run refused before it wrote anything (a mistyped manifest) leaves no empty output behind
            for folder in (f"{root}/results", root):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # (only an empty folder goes)
        raise


def _check_local_devices(cfg: GenerateConfig) -> None:
    """A local Ray has this machine's devices for good: a GPU it lacks (--device cuda), or a backend that cannot
    run on what it has, is refused before Ray starts and before OUT is made (a cluster's, which an autoscaler
    may add to, is checked once joined: _on_cluster)."""
    local = local_resources()
    if local is None:  # this Ray cannot say: _on_cluster checks what the started Ray found
        return
    try:
        device = size_actors(cfg.actors, local, cfg.device).device
        if device == "cuda" and (short := local_gpu_shortfall("--actors", cfg.actors, local["GPU"],
                                                              "leave --device out to draw on the CPU")):
            raise RunFailed(f"--device cuda: {short}")
        check_backend(cfg.backend, device)
    except (BackendError, ClusterError) as exc:
        raise RunFailed(str(exc)) from exc
    _say_compile_mode(cfg, device)


def _say_compile_mode(cfg: GenerateConfig, device: str) -> None:
    """A compile mode whose only addition is CUDA graphs, asked for on a CPU: said (the actors compile in the
    default mode: CompileSettings.for_device)."""
    if cfg.backend == "compile" and cfg.compile_mode == "reduce-overhead" and device == "cpu":
        log("warning: --compile-mode reduce-overhead adds CUDA graphs, which actors on a CPU have not: there it is "
            "torch.compile's default mode (what --compile-mode auto picks on a CPU); the run goes on")


def check_backend_cache(uri: str, make: bool, here: bool) -> None:
    """Refuse a --backend-cache the actors could not use, before anything starts: a file, a folder that cannot be
    made, a bucket that does not exist or no credentials. Found by the actors instead, it failed every row to draw
    (onnx: exit 0 under --rows-may-fail, with nothing drawn), stopped the run with a bare OS error (compile) or
    with Ray's "UDF failed" (--batch-size auto). A local path is checked only where the actors' disk is this one
    (`here`: a local Ray; a cluster's workers may mount a volume this pod does not); one they cannot write (a
    read-only cache filled beforehand) is said, not refused. `make`: create a local folder (not for --plan-only,
    which writes nothing)."""
    try:
        fs, root = url_to_fs(uri)
        require_bucket(fs, root, "--backend-cache", uri, RunFailed)
        if is_local_fs(fs) and not here:
            return
        if fs.isfile(root):
            raise RunFailed(f"--backend-cache {uri} is a file; give a folder (a new one, or the cache of earlier runs)")
        if not is_local_fs(fs):
            return
        folder = root
        while not os.path.exists(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)  # (the nearest place that exists: where the cache would be made)
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"{folder} is a file, not a folder")
        if make:
            os.makedirs(root, exist_ok=True)
    except RunFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - any store error means the same thing here
        raise RunFailed(f"--backend-cache {uri} cannot be used ({describe_error(exc) or one_line(exc)}); give a "
                        "folder or URI the actors can write, or leave --backend-cache out (default $SDFLEET_CACHE)") \
            from exc
    if not os.access(root if make else folder, os.W_OK | os.X_OK):
        log(f"warning: --backend-cache {uri} cannot be written here: what it does not hold yet is built by each "
            "actor and not kept for the next run")


def _plan_and_run(cfg: GenerateConfig, fs, root: str, run_id: str, started: float, actor_cls,
                  lease: Lease | None) -> dict:
    # 2. manifests: files, row count, duplicate ids (before any row is drawn)
    uris = expand_manifest_paths(cfg.manifests)
    ledger = [uri for uri in uris if _under(fs, f"{root.rstrip('/')}/results", uri)]
    if ledger:  # a manifest folder that holds --out: its ledger parts are .parquet files too, but not manifests
        uris = [uri for uri in uris if uri not in ledger]
        if not uris:
            raise RunFailed(f"every manifest given is a ledger part of --out {cfg.out} (its results/); name the "
                            "manifests")
        log(f"left out {len(ledger)} ledger part(s) of --out (its results/): not manifests")
    try:
        manifests = survey(uris)  # each file read once: footers, ids, adapter names
    except BadManifestFile as exc:  # name every file that cannot be read, as `manifest validate` does
        # (this one first: a file whose footer opens and whose ids do not is not among those that fail to open)
        bad = list(dict.fromkeys([str(exc), *(unreadable_files(uris).values() if len(uris) > 1 else ())]))
        if len(bad) > 1:
            raise BadManifestFile(f"{len(bad)} of the {len(uris)} manifests cannot be read: "
                                  + "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")) from exc
        raise
    if not manifests.total:  # an export that wrote empty files: a night with nothing to do, every earlier row
        # counted as no longer asked for (the report's "not asked for"), and exit 0 for the scheduler
        named = ", ".join(uris[:3]) + (f" and {len(uris) - 3} more" if len(uris) > 3 else "")
        raise RunFailed(f"the manifests hold no rows ({named}): nothing was drawn; check what wrote them")
    for uri, columns in manifests.file_columns.items():
        for column, field in look_alike_columns(columns).items():
            log(f"warning: {look_alike_warning(uri, column, field, columns)}")
    for line in unused_models(cfg.models, manifests.model_names):
        log(f"warning: {line}")
    duplicates = {i: n for i, n in manifests.id_counts.items() if n > 1}
    clashes = case_clashes(manifests.id_counts, fs, root)
    asked, manifests.id_counts = manifests.id_counts, None  # one entry per row: gone before the run (below)

    # 3. models and adapters: defaults and fingerprints, from configs and file hashes only
    # rows may name a preset without a --model for it, as `manifest validate` allows (no --model takes its name)
    refs = {**{name: name for name in PRESETS}, **cfg.models}
    models = {name: describe_model(name, ref).defaults() for name, ref in refs.items()}
    embedding_tokens: dict[str, str] = {}  # token -> the embedding that adds it
    adapter_widths: dict[str, dict] = {}  # name -> the widths it needs of a model
    adapter_fingerprints, adapter_errors = resolve_adapters(cfg.adapters, manifests.adapter_names, embedding_tokens,
                                                            manifests.loaded_adapter_names, adapter_widths)
    word_tokens = words_of_models(embedding_tokens, models) if embedding_tokens else {}

    # 4. what is already done: newest ok hash per id, and which images exist
    from jobs.plan import PlanState

    remove_stale_temp_files(fs, root)
    try:
        finished: dict[str, tuple[str, int | None]] = {}
        superseded: set[str] = set()  # ids whose newest entry is a failure after their newest ok one
        labels: dict[str, str] = {}  # id -> the passthrough_hash its newest ok entry has
        done = {} if cfg.force else read_latest_ok(fs, root, finished, superseded, labels)
    except UnreadableFile as exc:
        if foreign := not_a_part(exc):
            raise RunFailed(f"{foreign}; nothing was drawn") from exc
        if exc.damaged:
            raise RunFailed(damaged_part(exc)) from exc
        raise RunFailed(f"cannot read the ledger from {fs.unstrip_protocol(root)}/results: {exc.path}: "
                        f"{one_line(exc.cause)}; nothing was drawn, rerun once the store answers") from exc
    # rows done before that no manifest asks for any more (a product dropped from the catalogue)
    dropped = {rid for rid in done if rid not in asked}
    del asked
    if cfg.report_group_by and (problem := report_group_by_problem(cfg.report_group_by, manifests.columns, fs, root)):
        log(f"warning: {problem}; the run goes on, its report will not be grouped")  # a report never fails a run
    existing = set()  # images a killed run wrote without recording them are in here too: the plan reads those
    changed = set()
    if not cfg.force and fs.exists(f"{root}/images"):
        images = {p.rsplit("/", 1)[-1][:-4]: info for p, info in folder_files(fs, f"{root}/images", ".png").items()}
        existing = set(images)
        changed = changed_since_recorded(images, finished)
        del images  # the listing's details: ~800 MB for a million images, not needed past this point
        if changed:  # its ledger entry no longer vouches for it: read, as an unrecorded image is, before it counts
            done = {rid: phash for rid, phash in done.items() if rid not in changed}
    del finished
    # rows failed since their last ok entry, whose image that entry still vouches for: recorded ok again from it
    restored = newest_ok_entries(fs, root, superseded & done.keys()) if superseded and done else {}
    # ... whose images are kept, and counted (not one whose image is gone since)
    not_asked = sorted(rid for rid in dropped if rid in existing)
    manifests.not_in_manifests, manifests.not_in_manifests_count = not_asked[:NOT_ASKED_LISTED], len(not_asked)
    state = PlanState(models=models, duplicates=duplicates, case_clashes=clashes, done=done, existing=existing,
                      watermark=cfg.watermark, force=cfg.force, out=cfg.out,
                      adapter_fingerprints=adapter_fingerprints, adapter_errors=adapter_errors,
                      adapter_widths=adapter_widths,
                      embedding_tokens=embedding_tokens, word_tokens=word_tokens, restored=restored, labels=labels)
    # (of the rows these manifests ask for: done ids of dropped rows are counted as not_in_manifests)
    # (drawn before, not done: which of them changed since is what the plan is about to find)
    before = ("--force: every row is drawn again" if cfg.force else
              f"{len(done.keys() - dropped)} drawn before (the plan draws again those that changed)")
    log(f"{manifests.total} rows in {len(uris)} manifest(s); {before}; out: {cfg.out}")
    if changed:  # (these after the line above, which says what the run is about)
        log(f"{len(changed)} image(s) written after their ledger entry, or of another size than it records "
            "(another run, a copy, an edit, a file damaged in place): each is checked before it counts as done")
    if not_asked:
        log(f"{len(not_asked)} image(s) in --out are of rows no manifest of this run asks for (dropped, renamed): "
            "kept; run.json counts them (not_in_manifests) and the report lists them")

    # 5. Ray, and actors sized to it; Ray's and the libraries' own messages go to the run's log file
    with command_log(fs, root, f"sdfleet-{run_id}.log", "run", in_out=not cfg.plan_only) as log_path, \
            library_logs_to(log_path, cfg.verbose, scrub=without_passwords):
        return _run_on_ray(cfg, fs, root, run_id, manifests, models, state, started, actor_cls, lease)


def unused_models(given: dict[str, str], named: set[str] | None) -> list[str]:
    """A line for each --model NAME=REF that no row names in its `model` column (a typo, or a manifest without
    the column: every row then drew with `default`), the implied default=tiny aside; none where the names the
    rows give are not known (`Survey.model_names`)."""
    if not named:
        return []
    said = ", ".join(sorted(named)[:10]) + (f" and {len(named) - 10} more" if len(named) > 10 else "")
    fallback = f"; a row without one draws with default={given.get('default', 'tiny')}" if "default" in named else ""
    return [f"--model {name}={ref}: no row of these manifests names it in its `model` column (they name: {said})"
            + ("" if name == "default" else fallback)
            for name, ref in given.items() if name not in named and (name, ref) != ("default", "tiny")]


def case_clashes(id_counts: dict[str, int], fs, root: str) -> dict[str, list[str]]:
    """id -> the other ids of the run that differ from it only in case, where --out is a local disk that does
    not tell case apart (macOS and Windows by default): `SKU-1.png` and `sku-1.png` would be one file, each row
    overwriting the other's image. {} elsewhere (object stores and Linux disks keep both)."""
    folded: dict[str, list[str]] = {}
    for row_id in id_counts:
        folded.setdefault(row_id.casefold(), []).append(row_id)
    groups = [ids for ids in folded.values() if len(ids) > 1]
    if not groups or not is_local_fs(fs) or not _ignores_case(root):
        return {}
    return {i: sorted(set(ids) - {i}) for ids in groups for i in ids}


def _ignores_case(root: str) -> bool:
    """Whether the local folder `root` (or, before it exists, the nearest folder above it) names files without
    telling case apart: a probe file is made and looked for under another case."""
    folder = root
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    probe = os.path.join(folder, f".sdfleet-case-{uuid.uuid4().hex[:8]}-Aa")
    try:
        with open(probe, "w"):
            pass
        return os.path.exists(probe[:-2] + "aA")
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


NOT_ASKED_LISTED = 1000  # ids run.json lists of the rows no manifest asks for any more (all are counted)

# How much later than its ledger entry an image may have been written and still be the one the entry
# recorded: images are written before their entry, so only clock differences between the store and the
# workers; a run that rewrote the image later (a killed run that drew the row another way) is minutes away.
RECORDED_SLACK_SECONDS = 5.0


def changed_since_recorded(images: dict[str, dict], finished: dict[str, tuple[str, int | None]]) -> set[str]:
    """Ids whose image no longer matches the newest `ok` ledger entry of the id, by the store's listing: written
    after it (a run killed before it recorded another version of the row, a copy that reset the times, a file
    edited or replaced) or of another size (damaged in place, its time kept: a copy cut short, a disk error).
    Where the store gives no time or size, or the entry records none, the entry is trusted on that count."""
    changed = set()
    for rid, (when, size) in finished.items():
        info = images.get(rid)
        if info and size_differs(info.get("size"), size):
            changed.add(rid)
            continue
        written = stored_at(info) if info else None
        if written is None or not when:
            continue
        try:
            recorded = dt.datetime.fromisoformat(when).timestamp()
        except ValueError:
            continue
        if written > recorded + RECORDED_SLACK_SECONDS:
            changed.add(rid)
    return changed


def report_group_by_problem(column: str, manifest_columns: set[str], fs, root: str) -> str | None:
    """Why `--report-group-by` cannot group this run's report, told before drawing rather than after; None when
    the ledger will have the column (an output with earlier ledger parts may have it from an earlier run's
    manifests: the report says then)."""
    from jobs.outputs import BOOKKEEPING, not_a_group

    own = [c for c in sorted(manifest_columns) if c not in FIELDS]  # kept in the ledger, as extra_columns names them
    columns = [c for c in LEDGER_COLUMNS if c not in (*BOOKKEEPING, "extra")] + list(extra_columns(own).values())
    if column in BOOKKEEPING or (column not in columns and not ledger_parts(fs, root)):
        why = not_a_group(column, "") if column in BOOKKEEPING else "this run's ledger will have no such column"
        return f"--report-group-by {column!r}: {why}; group by one of {', '.join(columns)}"
    return None


def _run_on_ray(cfg, fs, root, run_id, manifests, models, state, started, actor_cls, lease) -> dict:
    try:  # (connect within: a stop the moment it returns still leaves Ray)
        resources = connect(cfg.address, quiet=not cfg.verbose)
        startup = {"ray_connected": round(time.time() - started, 3)}
        if lease is not None:  # Ray's start-up covered the settle time; only the log file is written before this
            lease.confirm()
        summary = _on_cluster(cfg, fs, root, run_id, manifests, models, state, started, startup, resources, actor_cls)
    except BaseException:
        disconnect()
        raise
    try:
        disconnect()
    except KeyboardInterrupt:  # a Ctrl-C in the second Ray takes to stop made a finished run "interrupted", exit 130
        signum = stop_signal()
        log(f"{'stopped by ' + signum.name if signum else 'interrupted'} while leaving Ray, after the run finished "
            "(run.json is written): leaving it again" + ("" if signum else "; Ctrl-C again to stop at once"))
        disconnect()
        if signum:  # a pod being stopped (SIGTERM) or a closed terminal: nothing more is done (no --report)
            raise
    return summary


def _on_cluster(cfg, fs, root, run_id, manifests, models, state, started, startup, resources, actor_cls) -> dict:
    nodes = alive_nodes()
    if nodes > 1 and is_local_path(cfg.out) and not cfg.shared_out:
        raise RunFailed(multi_node_reason("--out", cfg.out, nodes, "--shared-out"))
    sizing = size_actors(cfg.actors, resources, cfg.device)
    if sizing.device == "cuda":
        short = None if cluster_address(cfg.address) else local_gpu_shortfall(
            "--actors", cfg.actors, resources.get("GPU", 0), "leave --device out to draw on the CPU")
        if short:
            raise RunFailed(f"--device cuda: {short}")
        if not resources.get("GPU"):
            log(f"the cluster has no GPU yet: the actors wait for the autoscaler to add {cfg.actors} (Ctrl-C stops)")
    finish_inline = (cfg.finish if cfg.finish != "auto" else "stage" if sizing.device == "cuda" else FINISH_ON_CPU) == "inline"
    finishing = size_finishing(resources, sizing, cfg.actors)
    joined = f"joined {joined_address() or cluster_address(cfg.address)}, " if cluster_address(cfg.address) else ""
    log(f"ray: {joined}{resources.get('CPU', 0):g} CPU{' free' if joined else ''}, {resources.get('GPU', 0):g} GPU; "
        f"rows to draw go to {cfg.actors} actor(s) on {sizing.device} ({sizing.num_cpus:g} CPU, {sizing.num_gpus:g} GPU, "
        f"{sizing.torch_threads} threads each), backend {cfg.backend}; images finished "
        + ("in the actors" if finish_inline else f"by {finishing.workers} CPU worker(s)"))
    if cluster_address(cfg.address) or local_resources() is None:  # (else said before a local Ray started)
        _say_compile_mode(cfg, sizing.device)
    try:
        check_backend(cfg.backend, sizing.device)  # before any actor starts
        summary = _execute(cfg, fs, root, run_id, manifests, models, state, sizing, started, startup,
                           finish=None if finish_inline else finishing, actor_cls=actor_cls)
    except BackendError as exc:
        raise RunFailed(str(exc)) from exc
    return summary


def _under(fs, root: str, uri: str) -> bool:
    """Whether the file `uri` lies inside the folder `root` of store `fs`."""
    other, path = url_to_fs(uri)
    return type(other) is type(fs) and path.startswith(root.rstrip("/") + "/")


def _local_folder(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return fs.isdir(path)


def resolve_adapters(store_uri: str | None, names: set[str], tokens: dict[str, str] | None = None,
                     loaded: set[str] | None = None,
                     widths: dict[str, dict] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Fingerprint every adapter the manifests name: ({name: fingerprint}, {name: why it is unusable}).
    `tokens` receives {token: embedding} of the embeddings among `loaded` (those a row lists at a scale other
    than 0; default all): one named only at scale 0 is never loaded, so its token is no word of any actor's.
    `widths` receives {name: the widths it needs of a model} (`actors.adapters.needed_widths`).

    A bad adapter is a row-level matter (its rows fail, the rest are drawn), so errors are collected,
    not raised. An adapter store that cannot be reached at all stops the run. Each adapter is read whole
    (its fingerprint is the hash of its bytes), ADAPTER_READS at a time: from an object store each read is
    mostly waiting.
    """
    if not names:
        if store_uri and is_local_path(store_uri) and not _local_folder(store_uri):
            log(f"warning: --adapters {store_uri} is not a folder here (no row of these manifests names an adapter, "
                "so the run goes on)")  # a typo in a nightly job's flags, said before a night that needs it
        return {}, {}
    if store_uri is None:
        return {}, {n: f"adapter {n!r}: no adapter store given (pass --adapters URI)" for n in names}
    from concurrent.futures import ThreadPoolExecutor

    from actors.adapters import AdapterError, AdapterStore

    try:
        store = AdapterStore(store_uri)
        there = store.fs.exists(store.root)
    except Exception as exc:  # noqa: BLE001 - credentials refused, an unknown protocol: the store cannot be read
        raise RunFailed(f"--adapters {store_uri} cannot be read ({one_line(exc)})") from exc
    if not there:
        try:  # asked again: `exists` answers False for every error (an http store that does not answer among them)
            store.fs.ls(store.root)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - the store's own error names the cause
            raise RunFailed(f"--adapters {store_uri} cannot be read ({describe_error(exc) or one_line(exc)})") from exc
        raise RunFailed(f"--adapters {store_uri} does not exist")
    if store.fs.isfile(store.root):  # every row failed, each saying "not in the store ...; the store holds: NAME"
        raise RunFailed(f"--adapters {store_uri} is a file; give the folder (or URI) that holds the adapters, such as "
                        "its parent, and name each adapter in the rows' `adapters` by its file name without "
                        ".safetensors")

    def describe(name: str):
        try:  # a store of its own per read: a store keeps its last read for the load that follows it
            return name, AdapterStore(store_uri).describe(name), None
        except AdapterError as exc:
            return name, None, str(exc)

    fingerprints, errors, adders = {}, {}, {}
    with ThreadPoolExecutor(max_workers=min(ADAPTER_READS, len(names))) as pool:
        for name, info, error in pool.map(describe, sorted(names)):
            if error is None:
                fingerprints[name] = info.fingerprint
                if widths is not None:
                    widths[name] = {"text_width": info.text_width, "context_width": info.context_width}
                if info.kind == "embedding" and info.token and (loaded is None or name in loaded):
                    # CLIP reads tokens in lower case: one in any case
                    adders.setdefault(info.token.lower(), []).append((name, info.token))
            else:
                errors[name] = error
    for named in adders.values():
        if len(named) > 1:  # an actor holds one embedding per token: which one a row got would depend on order
            for name, token in named:
                others = ", ".join(repr(n) for n, _ in named if n != name)
                errors[name] = (f"adapter {name!r}: its token {token!r} is also the token of {others}, named in this "
                                "run (tokens are read in lower case); an actor holds one embedding per token, so rows "
                                "would draw with whichever it loaded first: draw them in separate runs, or save one "
                                "under another token")
        elif tokens is not None:
            tokens[named[0][1]] = named[0][0]
    return fingerprints, errors


def words_of_models(tokens: dict[str, str], models: dict[str, dict]) -> dict[str, frozenset[str]]:
    """For each model, the embedding tokens that are already words of its tokenizer. An actor refuses such an
    embedding on that model (it would change every prompt using the word), so a row of the model may use the
    word without listing the embedding: without this, one embedding named `red` made every row saying "red"
    invalid. Each model's own tokenizer is read (a store's `tokenizer/` folder only, as `manifest validate`
    does); one that cannot be read leaves its rows checked against every token."""
    from actors.models import ModelError, ModelInfo
    from actors.tokenizer import known_word
    from jobs.tokenizers import tokenizer_lookup

    lookup = tokenizer_lookup({name: ModelInfo(**info) for name, info in models.items()})
    words = {}
    for name in models:
        try:
            tokenizer = lookup(name)
        except ModelError:  # the model would not load either: its rows fail there, named
            tokenizer = None
        if tokenizer is not None:
            words[name] = frozenset(t for t in tokens if known_word(tokenizer, t))
    return words


def _execute(cfg, fs, root, run_id, manifests, models, state, sizing, started, startup, finish, actor_cls) -> dict:
    import ray
    import ray.data

    from jobs.plan import plan_batch

    total = manifests.total
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line says more, in fewer lines
    ctx.print_on_execution_start = False

    # 6. plan: every manifest row becomes one work row. Work rows are small (prompts and parameters, no
    # pixels), so the plan is held whole in the object store; that lets the rows to draw be sorted by
    # adapter set (long runs per actor, few swaps) and lets a run with nothing to draw skip the actors.
    # Into an output with nothing done yet (or with --force) nearly every row is drawn, so the plan streams
    # straight into the actors instead: they start and load their model while the plan tasks run, and the
    # rows the plan settles ride through both stages untouched.
    parts = [vars(p) for p in manifests.parts]
    planned = ray.data.from_items(parts, override_num_blocks=max(1, len(parts)))
    # The plan state (the done-ledger and image listing) can be large: one copy in the object store,
    # not one pickled into every plan task.
    planned = planned.map_batches(plan_batch, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                                  fn_kwargs={"state": ray.put(state)})

    if cfg.plan_only:
        return _plan_only(cfg, planned, total, started)

    # 7. record results as they come: ledger parts, progress, identity checks; the crash journal lets a
    #    row that kills its actor fail alone
    results = Recorder(fs, root, run_id, total, started)
    results.first_wait = FIRST_WAIT.get(cfg.backend, results.first_wait)  # (compile: 5 minutes said as "loading")
    journal_actor = start_journal(run_id)  # held here for the run's length
    journal = JOURNAL_NAME.format(run_id=run_id)
    try:
        with results.heartbeat(), watch_cluster(log, give_up=functools.partial(_give_up, results)):
            actors = _record_the_run(cfg, planned, state, total, models, sizing, finish, journal, actor_cls, results,
                                     started, startup)
    except (RunFailed, KeyboardInterrupt):  # Ctrl-C: what finished is in the ledger, as the CLI then says
        results.keep_what_finished()
        raise
    except Exception as exc:
        results.keep_what_finished()  # whatever finished is kept, even when the run stops
        raise RunFailed(f"the run stopped: {root_cause(exc)}") from exc
    results.flush()
    ray.kill(journal_actor)

    if len(results.seen) != total:
        raise RunFailed(f"{total} rows went in but {len(results.seen)} came out; the ledger holds what finished")

    # 8. the run summary
    wall = time.time() - started
    summary = {
        "run_id": run_id,
        "rows": total,
        **results.counts,
        "wall_seconds": round(wall, 3),
        "recovered": results.recovered,
        "restored": results.restored,
        "relabelled": results.relabelled,
        "not_in_manifests": manifests.not_in_manifests_count,
        "not_in_manifests_ids": manifests.not_in_manifests,  # the first NOT_ASKED_LISTED, by id
        # images drawn in this run: recovered ones were drawn by an earlier run
        "images_per_second": round(results.drawn() / wall, 4) if wall > 0 else 0.0,
        "actors": actors,  # started: 0 where every row was settled by the plan
        "images_per_actor": results.per_actor,
        "adapter_swaps": results.adapter_swaps(),
        "startup": results.startup_stamps(startup),
        "batch_size": cfg.batch_size,
        "finish": "inline" if finish is None else "stage",
        "backend": cfg.backend,
        "backend_stats": results.backend_stats,
        "device": sizing.device,
        "watermark": cfg.watermark,
        "models": {n: {"ref": m["ref"], "fingerprint": m["fingerprint"]} for n, m in models.items()},
        # each adapter the manifests name, as the store held it: which version drew a row, beside the ledger's name
        "adapters": dict(sorted(state.adapter_fingerprints.items())),
        "manifests": manifests.uris,
        "ledger_parts": results.parts,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_summary(fs, root, run_id, summary)
    return summary


def write_summary(fs, root: str, run_id: str, summary: dict) -> None:
    """run.json, and its copy under runs/. The manifests' and models' URIs are as given, less any password in
    them (`https://user:***@host/...`): run.json travels with the images, and secrets belong in the environment."""
    data = recorded_json(summary).encode()
    try:
        atomic_write(fs, f"{root}/runs/{run_id}.json", data)
        atomic_write(fs, f"{root}/run.json", data)
    except Exception as exc:  # the ledger holds every row already; only the summary is missing
        raise RunFailed(f"cannot write run.json to {fs.unstrip_protocol(root)}: {one_line(exc)}; every row is "
                        "in the ledger") from exc


# What a stopped run leaves, and what to do: the CLI says it after Ctrl-C, SIGTERM and a lost cluster.
STOPPED_HINT = ("finished rows are in the ledger or, written since its last part, are recovered from their images "
                "by the rerun; rerun to continue")


def _give_up(results: Recorder, reason: str) -> None:
    """The cluster is gone and the main thread is held in a Ray call until Ray's driver ends the process with
    nothing said: keep what finished, say why, and end it here (cluster.connect.watch_cluster)."""
    results.keep_what_finished()
    print(f"sdfleet: error: {reason}; {STOPPED_HINT}", file=sys.stderr)
    leave(1)


def _record_the_run(cfg, planned, state, total, models, sizing, finish, journal, actor_cls, results, started,
                    startup) -> int:
    """Plan and draw, recording every row as it comes back: into a fresh output the actors start while the plan
    runs; otherwise the plan is settled first and only the rows to draw go to the actors. Returns how many
    actors were started (0 where nothing was left to draw)."""
    from ray.data.expressions import col, lit

    if total and not state.done and not state.existing:
        log("planning while the actors start (" + ("--force" if cfg.force else "nothing done before in this output")
            + ")")
        drawn = _draw(planned, cfg, models, sizing, finish, journal, actor_cls)
        for batch in drawn.iter_batches(batch_size=None, batch_format="pyarrow"):
            results.record(batch.to_pylist())
        if results.planned_at:
            startup["plan_done"] = round(results.planned_at - started, 3)
    else:
        results.waiting_for = "planning (each row against the ledger and the images in --out)"
        planned = planned.materialize()
        results.waiting_for = None
        startup["plan_done"] = round(time.time() - started, 3)
        settled = planned.filter(expr=col("status").is_not_null())  # invalid, skipped, failed: no actor needed
        todo = planned.filter(expr=col("status").is_null()).materialize()
        relabel: set[str] = set()  # done rows whose pass-through columns changed: recorded again, below
        for batch in settled.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = batch.to_pylist()
            relabel.update(r["id"] for r in rows if r["relabel"])
            results.record([settled_row(r) for r in rows if not r["relabel"]])
        if relabel:
            _record_relabelled(planned.filter(expr=col("relabel") == lit(True)), relabel, results)
        to_draw = todo.count()
        if to_draw:
            log(f"{to_draw} row(s) to draw")
            drawn = _draw(todo, cfg, models, sizing, finish, journal, actor_cls)
            for batch in drawn.iter_batches(batch_size=None, batch_format="pyarrow"):
                results.record(batch.to_pylist())
        else:
            log("nothing to draw: no actors started")
            return 0
    return cfg.actors


def _record_relabelled(rows, ids: set[str], results: Recorder) -> None:
    """Done rows whose pass-through columns changed since their newest `ok` entry (jobs.plan `relabel`): each is
    recorded again from that entry (its image, hash, mark read back), with the manifest's columns as they are now,
    so the ledger and the report do not keep a renamed SKU or category until the row is drawn again. Counted as
    skipped (nothing was drawn) and as relabelled. One more read of the ledger, for these ids only."""
    from jobs.plan import RELABELLED

    try:
        entries = newest_ok_entries(results.fs, results.root, ids)
        log(f"{len(ids)} done row(s) whose manifest columns changed (not what they draw): recorded again, not drawn")
    except Exception as exc:  # noqa: BLE001 - a store that fails this read: the rows stay as they were, skipped
        entries = {}
        log(f"warning: {len(ids)} done row(s) whose manifest columns changed are not recorded again: the ledger "
            f"could not be read ({one_line(exc)}); the next run records them")
    # (a column added to a catalogue relabels all of it: in ledger parts of many rows, not hundreds of small ones
    # every later run must read; a time's worth of rows is still written as it goes)
    results.flush_rows = RELABEL_FLUSH_ROWS
    try:
        for batch in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
            records = []
            for row in batch.to_pylist():
                entry = entries.get(row["id"])
                if entry is None:  # the read failed, or the ledger changed since it was read a moment ago
                    records.append(settled_row(row))  # skipped, as it was: the entry that vouched for it is kept
                    continue
                warning = recorded_again(RELABELLED, entry["warning"])
                records.append(ledger_row(row, "ok", **{**entry, "warning": warning}))
            results.record(records)
    finally:
        results.flush_rows = LEDGER_FLUSH_ROWS


RELABEL_FLUSH_ROWS = 65_536  # ledger rows per part while relabelled rows are recorded (see _record_relabelled)


PLAN_PROBLEMS_SHOWN = 20  # rows --plan-only names, of those it would not draw


def _plan_only(cfg: GenerateConfig, planned, total: int, started: float) -> dict:
    """--plan-only: the plan's verdict on every row, counted; nothing drawn, nothing written."""
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = {"to_draw": 0, "skipped": 0, "ok": 0, "failed": 0, "invalid": 0}
    said = restored = relabelled = 0

    def progress() -> str:  # (the plan's rows come back once all are planned, where it sorts: no 0/N till then)
        done = sum(counts.values())
        return f"planning: {f'{done:,}/' if done else ''}{total:,} rows, {time.time() - started:.0f} s in"

    with ticking(progress):
        columns = ["status", "error", "warning", "source", "row", "id", "relabel"]
        for batch in planned.select_columns(columns).iter_batches(batch_size=None, batch_format="pyarrow"):
            for status, n in zip(*batch.column("status").value_counts().flatten()):
                counts["to_draw" if status.as_py() is None else status.as_py()] += n.as_py()
            restored += pc.sum(pc.starts_with(batch.column("warning").fill_null(""), RESTORED_MARK)).as_py() or 0
            relabelled += pc.sum(batch.column("relabel").fill_null(False)).as_py() or 0
            if said < PLAN_PROBLEMS_SHOWN:  # where each row is, then why (a bad adapter's reason names no row)
                bad = batch.filter(pc.is_in(batch.column("status"), pa.array(["failed", "invalid"])))
                for row in bad.slice(0, PLAN_PROBLEMS_SHOWN - said).to_pylist():
                    said += 1
                    log(f"{'would fail' if row['status'] == 'failed' else 'invalid'}: {located(row, row['error'])}")
    if counts["failed"] + counts["invalid"] > said:
        log(f"... and {counts['failed'] + counts['invalid'] - said} more: a run names every one in its ledger, and "
            "`sdfleet manifest validate` every one, without Ray (with --adapters URI, the adapters that fail rows, "
            "with their counts)")
    if sum(counts.values()) != total:
        raise RunFailed(f"{total} rows went in but the plan gave {sum(counts.values())}")
    return {"plan_only": True, "rows": total, **counts, "recovered": counts.pop("ok") - restored, "restored": restored,
            "relabelled": relabelled,
            "wall_seconds": round(time.time() - started, 3), "out": cfg.out}


def _draw(rows, cfg: GenerateConfig, models, sizing, finish, journal: str, actor_cls=None):
    """Work rows, sorted by adapter set, cut into blocks of batch_size, through the actor pool and, unless
    `finish` is None (the actors finish their own images), the finishing stage. `journal` names the run's
    crash journal (actors.crash_journal)."""
    import ray.data

    from actors.actor import GeneratorActor
    from actors.finish import finish_table

    block = AUTO_BLOCK if cfg.batch_size == "auto" else cfg.batch_size  # rows per actor call
    drawn = rows.sort("affinity").repartition(target_num_rows_per_block=block).map_batches(
        actor_cls or GeneratorActor,
        fn_constructor_kwargs=dict(models=models, out_uri=cfg.out, batch_size=cfg.batch_size,
                                   device=sizing.device, torch_threads=sizing.torch_threads,
                                   adapters_uri=cfg.adapters, backend=cfg.backend,
                                   backend_cache=cfg.backend_cache, compile_mode=cfg.compile_mode,
                                   finish_inline=finish is None, journal=journal),
        # A second block waits at each actor, so it starts drawing the moment it hands a batch on.
        compute=ray.data.ActorPoolStrategy(size=cfg.actors, max_tasks_in_flight_per_actor=2),
        batch_size=block,
        batch_format="pyarrow",
        num_cpus=sizing.num_cpus,
        num_gpus=sizing.num_gpus,  # no runtime env: the actor sets its own (GeneratorActor.__init__)
    )
    if finish is None:
        return drawn
    return drawn.map_batches(
        finish_table,
        fn_kwargs={"out_uri": cfg.out},
        batch_size=None,  # one drawn block (one actor call) per task
        batch_format="pyarrow",
        num_cpus=finish.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=finish.workers),
    )
