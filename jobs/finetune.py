"""`sdfleet finetune {full,lora,dreambooth,vae,textual-inversion}`: check everything, then hand the loop to Ray Train.

    --data (a `dataset build` folder)  --base (preset, directory or URI)  --out (any fsspec store)
      -> checks before any worker starts: workers, dataset columns and rows, base model, --out, resources
      -> TorchTrainer(actors.train.loop.train_loop, ScalingConfig(num_workers=--workers, use_gpu=--gpu))
         checkpoints in --out/checkpoints through ray.train.report; a rerun into the same --out resumes
      -> --out: a diffusers model (full, dreambooth, vae), pytorch_lora_weights.safetensors (lora) or
         learned_embeds.safetensors (textual-inversion); validation/step-N/*.png, train_log.jsonl, finetune.json

Prior preservation (dreambooth; lora too): before training, the base model draws --class-images images of
--class-prompt (repeatable: the images take the prompts in turn) through `sdfleet generate` into
--out/class-images (a rerun draws only what is missing), `dataset build` turns them into --out/class-data,
and every step trains on as many class samples as instance samples, their loss weighted by
--prior-loss-weight.
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
from dataclasses import asdict

from actors.models import describe_model
from actors.train.config import TrainConfig, flag_of
from actors.train.stored import checkpoint_entries, clear_fatal, fatal_error, stored_checkpoints
from cluster.connect import (ClusterError, address_problem, alive_nodes, cluster_address, connect, disconnect,
                             library_logs_to, local_gpu_shortfall, local_resources, watch_cluster)
from jobs.console import command_log, leave, log, recorded_json, without_passwords
from jobs.errors import FinetuneError, describe_error, one_line, root_cause
from manifests.dataset import SUMMARY_FILE, check_dataset, dataset_fingerprint, folder_names
from manifests.schema import ADAPTER_NAME_RULE, first_few, is_adapter_name
from manifests.stores import (absolute_local, folder_files, is_local_fs, is_local_path, multi_node_reason,
                              require_bucket, url_to_fs)

# What must match for a rerun into the same --out to continue the run rather than clash with it.
RESUME_KEYS = ("method", "base_fingerprint", "data", "rank", "lora_layers", "token", "vectors", "train_text_encoder",
               "class_data", "class_prompts", "prior_loss_weight", "workers", "batch_size", "grad_accum", "fsdp")
# The datasets' fingerprints, by flag: a dataset rebuilt in place from other images or captions is another run's
# data. Compared where both records hold one (records before 2026-12-06 do not).
DATASET_KEYS = {"data_fingerprint": "--data", "class_data_fingerprint": "--class-data"}
# Ray Train's background watchers, off on a local Ray: a one-machine run has no node to be preempted and
# no metrics backend, and on a 2-core box their polling takes CPU from the workers. A cluster keeps them.
# Set either variable yourself to override.
# Flags a rerun may change and still resume: where and how the run goes, not what it learns. Every other flag
# (steps and lr schedule, alpha, seed, loss options...) is compared with the run in --out, so a rerun never trains
# half a model one way and half another.
RESUMABLE_FLAGS = frozenset({"out", "address", "verbose", "shared_out", "cpus_per_worker", "checkpoint_every",
                             "log_every", "max_failures", "gradient_checkpointing", "validate_every",
                             "validation_prompts", "validation_guidance", "base", "data",
                             "class_data"})  # the last three: by RESUME_KEYS
# Of those, the flags whose change a finished fine-tune's rerun has to act on: its validation images are drawn
# again (from its last checkpoint). The rest change how a run goes, not what it leaves: a finished run's rerun
# with another --verbose, --address or --log-every trains nothing.
REDRAWN_FLAGS = frozenset({"validation_prompts", "validation_guidance"})
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


def run_finetune(cfg: TrainConfig) -> dict:
    """Check, train, and return the summary written to --out/finetune.json."""
    started = time.time()
    # 1. inputs, before Ray: --address's form, the dataset (footers only), the base model (configs only), the
    # output store
    if problem := address_problem(cluster_address(cfg.address)):
        raise FinetuneError(problem)
    rows = check_dataset(cfg.data)
    base = describe_model("base", cfg.base)
    fs, root = url_to_fs(cfg.out)  # a store whose package is missing, or HDFS without Java: said (describe_error)
    try:
        require_bucket(fs, root, "--out", cfg.out, FinetuneError)
        _check_out_is_ours(fs, root, cfg)
    except FinetuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend error means the same thing here
        raise FinetuneError(f"cannot write to --out {cfg.out}: {one_line(exc)}") from exc
    resolution = cfg.resolution or base.width
    if cfg.crop >= resolution:  # the crops would be the whole image: trained on whole images without a word
        whose = "" if cfg.resolution else " (the base model's)"
        raise FinetuneError(f"--crop {cfg.crop} is not below the training size, {resolution} px{whose}; give a "
                            "smaller --crop, or leave it out to train on whole images")
    _note_upscaling(cfg.data, resolution)
    if cfg.warmup_steps >= cfg.steps:
        log(f"note: --warmup-steps {cfg.warmup_steps} is not below --steps {cfg.steps}: the learning rate never "
            "reaches its peak")
    if cfg.token:
        _check_token(cfg)  # first: a token that is already a word is refused without a note on the captions
        _check_captions_use(cfg.data, cfg.token, rows)
    class_data = cfg.class_data or (absolute_local(fs.unstrip_protocol(f"{root}/class-data")) if cfg.prior else None)
    if cfg.class_data:
        check_dataset(cfg.class_data, "--class-data")
    # what the workers read: the same config, with what was resolved here filled in (the class images are
    # read from class_data whether they were given or drawn below, so their prompts and count are not theirs)
    train = cfg.model_copy(update={
        "resolution": resolution, "class_data": class_data, "class_prompts": [],
        "class_images": TrainConfig.model_fields["class_images"].default,
        "validation_prompts": cfg.validation_prompts or _default_validation_prompts(cfg)})
    # 2. a rerun into the same --out continues that run; a different run there is refused, not mixed in
    record = run_record(cfg, base.fingerprint, class_data, data_fingerprints=(
        dataset_fingerprint(cfg.data), dataset_fingerprint(cfg.class_data, "--class-data") if cfg.class_data else None))
    # workers a local Ray could never place are refused before --out is made (not where the run there is finished:
    # its rerun trains nothing, and says so on any machine)
    if not cluster_address(cfg.address) and (local := local_resources()) and _finished(fs, root, cfg) is None:
        _scaling(cfg, local, train)
    if cfg.batch_size * cfg.workers > rows:  # (after --workers is known to fit: a refusal comes without it)
        log(f"note: a global batch of {cfg.batch_size * cfg.workers} is larger than the dataset ({rows} rows); "
            "samples repeat within a step")
    try:  # made only now: a run refused above leaves no empty folder (in an adapter store, under a refused name)
        fs.makedirs(root, exist_ok=True)
    except Exception as exc:  # noqa: BLE001 - any backend error means the same thing here
        raise FinetuneError(f"cannot write to --out {cfg.out}: {one_line(exc)}") from exc
    if _starts_afresh(fs, root, record, cfg):  # from here on --out is this fine-tune's: a rerun may use it
        try:  # its first write there (an object store makes no folders): credentials that may only read fail here
            _write_json(fs, f"{root}/finetune.json", {**record, "status": "starting", "config": cfg.model_dump()})
        except Exception as exc:  # noqa: BLE001 - any backend error means the same thing here
            raise FinetuneError(f"cannot write to --out {cfg.out}: {one_line(exc)}") from exc
    elif (finished := _finished(fs, root, cfg)) is not None:  # the same fine-tune, done: its output is there
        return {**finished, "already_finished": True}
    else:
        _refuse_retraining_a_finished_one(fs, root, cfg)
    with _status_on_the_way_out(fs, root, record, cfg):
        result = _draw_and_train(cfg, train, base, fs, root, record, rows, resolution)

    # 4. the summary
    summary = {**record, "status": "finished", "steps": cfg.steps, "rows": rows, "resolution": resolution,
               "final_metrics": result, "wall_seconds": round(time.time() - started, 3),
               "output": fs.unstrip_protocol(root), "config": cfg.model_dump(),
               "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    _write_json(fs, f"{root}/finetune.json", summary)
    return summary


def _finished(fs, root: str, cfg: TrainConfig) -> dict | None:
    """finetune.json of the same fine-tune (checked by _starts_afresh) where it finished, was given the same flags
    (new --validation-prompt or --validation-guidance draw at the end of a rerun), and what it published is there
    and whole, else None.
    A rerun of it then trains nothing: resuming from its last checkpoint drew the validation images and
    published the same files again. A published file cut short since is published again by the rerun."""
    try:
        record = json.loads(fs.cat_file(f"{root}/finetune.json"))
    except (OSError, ValueError):
        return None
    if record.get("status") != "finished" or _asks_more(record, cfg):
        return None
    return record if _published_whole(fs, root, cfg) else None


def _asks_more(record: dict, cfg: TrainConfig) -> list[str]:
    """The flags of `cfg` that ask the fine-tune recorded in `record` (the same one: _starts_afresh) for what it
    did not do: other validation images, or another setting of what it trains. A flag added since the record was
    written counts at its default (what that run had; --validation-guidance: 7.5); those that change only how a
    run goes are not compared."""
    defaults = _as_recorded({k: f.get_default(call_default_factory=True) for k, f in TrainConfig.model_fields.items()
                             if not f.is_required()})
    then = _resolved({**defaults, **(record.get("config") or {})})
    now = _resolved(_as_recorded(cfg.model_dump()))
    return [k for k, value in now.items()
            if k in then and then[k] != value and (k in REDRAWN_FLAGS or k not in RESUMABLE_FLAGS)]


def _refuse_retraining_a_finished_one(fs, root: str, cfg: TrainConfig) -> None:
    """A finished fine-tune whose checkpoints were deleted since (they are large; its output is what it is for)
    could do what its rerun asks (other validation images, a published file cut short since published again) only
    by training it all again from step 0: refused, saying what to do instead."""
    try:
        record = json.loads(fs.cat_file(f"{root}/finetune.json"))
    except (OSError, ValueError):
        return
    if not isinstance(record, dict) or record.get("status") != "finished" or checkpoint_entries(fs, root):
        return
    asked = _asks_more(record, cfg)
    if asked:
        what = f"validation images of other {' and '.join(flag_of(k) for k in asked)}"
        instead = f"draw images of its {cfg.result_name} with `sdfleet generate`"
    else:  # (what it published is not whole: nothing to draw with)
        what = f"its {cfg.result_name} published again (a file of it is missing or cut short)"
        instead = "put back a whole copy of what it published"
    raise FinetuneError(f"--out {fs.unstrip_protocol(root)} holds this fine-tune, finished, but its checkpoints are "
                        f"gone, so {what} would mean training it all again from step 0: {instead}, or train it "
                        "again into a new --out")


def _published_whole(fs, root: str, cfg: TrainConfig) -> bool:
    """Whether what the fine-tune publishes (actors.train.checkpoints.publish) is in `root`, each safetensors
    file as long as its header says."""
    from actors.adapters import EMBEDDING_FILE, LORA_FILE
    from actors.train.stored import safetensors_whole

    single = {"lora": LORA_FILE, "textual-inversion": EMBEDDING_FILE}.get(cfg.method)
    try:
        if single is not None:
            path = f"{root}/{single}"
            return fs.isfile(path) and safetensors_whole(fs, path, fs.size(path))
        if not fs.isfile(f"{root}/model_index.json"):
            return False
        model_index = json.loads(fs.cat_file(f"{root}/model_index.json"))
        parts = [name for name, value in model_index.items() if isinstance(value, list) and value[0] is not None]
        for part in parts:  # each component folder's weights (a tokenizer or scheduler has none)
            for path, info in fs.find(f"{root}/{part}", detail=True).items():
                if path.endswith(".safetensors") and not safetensors_whole(fs, path, info["size"]):
                    return False
        return True
    except Exception:  # noqa: BLE001 - a file that cannot be read or parsed: the rerun publishes it again
        return False


def _give_up(fs, root: str, record: dict, cfg: TrainConfig, reason: str) -> None:
    """The cluster is gone and Ray Train's driver waits on it until Ray ends the process with nothing said:
    record the failure, say why and end it here (cluster.connect.watch_cluster)."""
    error = f"{reason}; {resume_hint(cfg.out)}"
    _record_failure(fs, root, record, cfg, error)
    print(f"sdfleet: error: {without_passwords(error)}", file=sys.stderr)
    leave(1)


def _record_failure(fs, root: str, record: dict, cfg: TrainConfig, error: str) -> None:
    """finetune.json says `failed` and why; the store may be what failed, and the error is what to show then."""
    with contextlib.suppress(Exception):
        _write_json(fs, f"{root}/finetune.json", {**record, "status": "failed", "error": error,
                                                  "config": cfg.model_dump()})


@contextlib.contextmanager
def _status_on_the_way_out(fs, root: str, record: dict, cfg: TrainConfig):
    """Whatever stops the fine-tune once finetune.json exists is recorded there: `interrupted` for Ctrl-C (the
    CLI says how to resume), `failed` with the error for anything else (no GPU, a cluster too small, a class
    image draw that failed), so the file never says `starting` or `running` of a run that ended."""
    try:
        yield
    except KeyboardInterrupt:
        _write_json(fs, f"{root}/finetune.json", {**record, "status": "interrupted", "config": cfg.model_dump()})
        raise
    except Exception as exc:
        _record_failure(fs, root, record, cfg, describe_error(exc) or one_line(exc))
        raise


def _draw_and_train(cfg: TrainConfig, train: TrainConfig, base, fs, root: str, record: dict, rows: int,
                    resolution: int) -> dict:
    """The class images (DreamBooth's prior), then Ray and the training run; returns the final metrics."""
    class_data = train.class_data
    if cfg.class_prompts:  # before this run's Ray: generation starts and stops its own
        class_rows = draw_class_images(cfg, fs, root, resolution)
        log(f"prior preservation: {class_rows} class images of {_quoted(cfg.class_prompts)} in {class_data}")

    # 3. Ray, and workers sized to it
    if not cluster_address(cfg.address):
        for key, value in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(key, value)
    # Ray's, Ray Train's and the workers' own lines go to a log file; the progress printed here is read
    # from --out/train_log.jsonl, which rank 0 writes (TrainProgress)
    name = f"finetune-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}.log"
    with command_log(fs, root, name, "fine-tune") as log_path, \
            library_logs_to(log_path, cfg.verbose, scrub=without_passwords):
        resources = connect(cfg.address, quiet=not cfg.verbose, worker_output=True)
        try:
            nodes = alive_nodes()
            if nodes > 1 and is_local_path(cfg.out) and not cfg.shared_out:  # checkpoints come from every worker
                raise FinetuneError(multi_node_reason("--out", cfg.out, nodes, "--shared-out"))
            train, scaling = _scaling(cfg, resources, train)
            batch = cfg.batch_size * cfg.workers * cfg.grad_accum
            # with a prior, each step also trains as many class samples (actors/train/loop.py): said, not hidden
            prior = f" (+ {batch} class samples: prior preservation from {class_data})" if class_data else ""
            log(f"{cfg.method} fine-tune of {cfg.base} on {rows} samples: {cfg.workers} worker(s) on "
                f"{'GPU' if cfg.gpu else 'CPU'}, {cfg.steps} steps, global batch {batch}{prior}, {resolution} px; "
                f"out: {cfg.out}")
            _write_json(fs, f"{root}/finetune.json", {**record, "status": "running", "config": cfg.model_dump()})
            with (TrainProgress(fs, f"{root}/train_log.jsonl", cfg, follow=not cfg.verbose),
                  watch_cluster(log, give_up=functools.partial(_give_up, fs, root, record, cfg))):
                return _fit(cfg, train, base, scaling, fs, root)
        finally:
            disconnect()


class TrainProgress:
    """While open, prints what rank 0 adds to train_log.jsonl (steps, resume, the result) as sdfleet's own
    lines, polling it every `every` seconds; lines already there (an earlier run's) are not repeated.
    With `follow=False` (--verbose: the workers' own lines reach the terminal) it does nothing."""

    def __init__(self, fs, path: str, cfg: TrainConfig, follow: bool = True, every: float = 1.0):
        import threading

        self.fs, self.path, self.cfg, self.follow, self.every = fs, path, cfg, follow, every
        self.stop = threading.Event()
        self.seen = len(self._lines())
        self.stepped = False  # this command's workers logged a step: a start after it is Ray Train's restart
        self.thread = threading.Thread(target=self._run, name="train-progress", daemon=True)

    def __enter__(self):
        if self.follow:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.follow:
            self.stop.set()
            self.thread.join()
            self._show()  # the last lines, written just before the end

    def _lines(self) -> list[str]:
        try:
            self.fs.invalidate_cache()
            return self.fs.cat_file(self.path).decode().splitlines()
        except (FileNotFoundError, OSError):
            return []

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self._show()

    def _show(self) -> None:
        lines = self._lines()
        for line in lines[self.seen:]:
            try:
                text = self.describe(json.loads(line))
            except ValueError:
                break  # a line caught mid-write: read again next time
            self.seen += 1
            if text:
                log(text)

    def describe(self, record: dict) -> str | None:
        cfg, event = self.cfg, record.get("event")
        if event == "started" and self.stepped:  # the terminal went from "step 6" to "resuming" with no word why
            self.stepped = False
            return (f"a training worker stopped (its process died or its node was lost): Ray Train starts the "
                    f"workers again, up to --max-failures {cfg.max_failures} time(s)")
        skipped = "; ".join(f"{c['checkpoint']} ({c['why']})" for c in record.get("passed_over", []))
        skipped = f" (passed over {skipped}: not whole)" if skipped else ""
        if event == "started":
            return f"{cfg.method}: {record.get('trainable_parameters', 0):,} trainable parameters{skipped}"
        if event == "cached_latents":
            return f"cached the latents of {record['images']} images"
        if event == "resumed":
            return f"resuming from the checkpoint at step {record['step']}{skipped}"
        if event == "finished":
            return f"wrote the {cfg.result_name} to {cfg.out}"
        if "loss" in record:
            self.stepped = True
            evaluated = record.get("eval_loss")
            return (f"step {record['step']}/{cfg.steps} loss {record['loss']:.4f} eval "
                    f"{'-' if evaluated is None else format(evaluated, '.4f')} lr {record['lr']:.2e} "
                    f"{record['samples_per_second']:.2f} samples/s")
        return None


def _scaling(cfg: TrainConfig, resources: dict, train: TrainConfig) -> tuple[TrainConfig, "object"]:
    """Ray Train's ScalingConfig for the cluster, and the workers' config with their CPU share."""
    from ray.train import ScalingConfig

    if cfg.gpu:
        gpus = resources.get("GPU", 0)
        if gpus < cfg.workers:
            if not cluster_address(cfg.address):  # a local Ray never gains GPUs
                raise ClusterError("--gpu: " + local_gpu_shortfall("--workers", cfg.workers, gpus,
                                                                   "leave --gpu out to train on the CPU"))
            # an autoscaling cluster adds GPU nodes once the workers ask for them
            log(f"the cluster shows {gpus:g} GPU(s) for {cfg.workers} worker(s): waiting for the autoscaler")
        return train, ScalingConfig(num_workers=cfg.workers, use_gpu=True)
    cpus = resources.get("CPU", 0)
    share = cfg.cpus_per_worker or cpus // cfg.workers
    if share < 1 or share * cfg.workers > cpus:
        each = max(1, share)
        fits = int(cpus // each)
        if fits:
            lower = " (or a lower --cpus-per-worker)" if cfg.cpus_per_worker else ""
            valid = f"give --workers {fits} or fewer{lower}"
        elif cfg.cpus_per_worker and cpus >= 1:
            valid = f"give --cpus-per-worker {int(cpus)} or less"
        else:
            valid = "the cluster has no CPU to give a worker"
        raise ClusterError(f"--workers {cfg.workers} needs {each:g} CPU(s) each; the cluster has {cpus:g}: {valid}")
    train = train.model_copy(update={"cpus_per_worker": int(share)})
    return train, ScalingConfig(num_workers=cfg.workers, use_gpu=False, resources_per_worker={"CPU": share})


def _fit(cfg: TrainConfig, train: TrainConfig, base, scaling, fs, root: str) -> dict:
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from actors.train.loop import train_loop

    LocalTorchTrainer = _local_trainer_class()
    # Ray Train writes checkpoints through pyarrow; any fsspec store (s3, gs, memory) goes through an adapter.
    if is_local_fs(fs):
        storage = dict(storage_path=root)
    else:
        storage = dict(storage_path=root, storage_filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)))
    run_config = RunConfig(
        name="checkpoints", **storage,  # --out/checkpoints: the same --out finds the same run again
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(train.torch_threads),
                                         "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")}},
    )
    run = uuid.uuid4().hex[:12]  # this driver's run: an error note of another run is not this one's
    trainer = (TorchTrainer if cluster_address(cfg.address) else LocalTorchTrainer)(
        train_loop, train_loop_config={"train": train.model_dump(), "base": asdict(base), "run": run},
        scaling_config=scaling, run_config=run_config)
    try:
        clear_fatal(cfg.out)  # the last run's error in its inputs: they may have been mended since
    except Exception as exc:  # noqa: BLE001 - a store that refuses a delete would refuse the checkpoints too
        raise FinetuneError(f"cannot write to --out {cfg.out}: {one_line(exc)}") from exc
    try:
        result = trainer.fit()
    except SystemExit as exc:  # Ray Train's own Ctrl-C handler aborts the run, then exits (with 1)
        raise KeyboardInterrupt from exc
    except Exception as exc:
        noted = fatal_error(cfg.out, run)  # an error in the inputs, which every retry met again: it says what to mend
        if noted is not None:
            with contextlib.suppress(Exception):  # (the next run clears it before it starts, too)
                clear_fatal(cfg.out)
            raise FinetuneError(f"training stopped: {noted}") from exc
        cause = root_cause(exc)
        hint = memory_hint(cause, cfg)
        if hint and len(cause) > 200:  # Ray's memory monitor says a paragraph, its tips are for Ray's own tasks
            cause = "a worker ran out of memory (Ray's memory monitor stopped it: the log file has its report)"
        raise FinetuneError(f"training stopped: {cause}{hint}; {resume_hint(cfg.out)}") from exc
    _remove_unkept_checkpoints(fs, root, result)
    return dict(result.metrics or {})


def _remove_unkept_checkpoints(fs, root: str, result) -> None:
    """Remove the checkpoint folders Ray Train does not keep: one uploaded just before a stop, never entered in
    its record (the rerun resumed from it: actors.train.loop.resume_from), is not pruned by Ray, and a full
    model's is gigabytes."""
    kept = [c for c, _ in (result.best_checkpoints or [])] + ([result.checkpoint] if result.checkpoint else [])
    kept_names = {c.path.rstrip("/").rsplit("/", 1)[-1] for c in kept}
    if not kept_names:  # Ray kept none: nothing tells the stale from the rest
        return
    for entry in checkpoint_entries(fs, root):
        if entry.get("type") == "directory" and entry["name"].rstrip("/").rsplit("/", 1)[-1] not in kept_names:
            with contextlib.suppress(OSError):
                fs.rm(entry["name"], recursive=True)


# What torch (CUDA and CPU allocators) and Ray's memory monitor say when a worker runs out of memory.
OUT_OF_MEMORY = ("out of memory", "outofmemoryerror", "can't allocate memory", "running low on memory")


def resume_hint(out: str) -> str:
    """What a rerun of a fine-tune that stopped does: resume from the newest checkpoint in `out`, or, with none
    written yet, start training again (class images already drawn are kept)."""
    try:
        fs, root = url_to_fs(out)  # only a disk is asked: this runs on the way out (Ctrl-C, SIGTERM), where a
        written = bool(stored_checkpoints(out)) if is_local_fs(fs) else True  # slow store would hold it
    except Exception:  # noqa: BLE001 - say what a rerun would do if it had one
        written = True
    if written:
        return f"checkpoints are in {out}/checkpoints, rerun the same command to resume from the newest"
    try:  # DreamBooth's class images drawn before the stop: a rerun draws only the rest
        drawn = any(name.endswith(".png") for name in os.listdir(f"{root}/class-images/images"))
    except OSError:
        drawn = False
    kept = " (the class images drawn so far are kept)" if drawn else ""
    return f"no checkpoint was written yet, so rerunning the same command starts training again{kept}"


def memory_hint(cause: str, cfg: TrainConfig) -> str:
    """For a worker that ran out of memory: the flags that need less of it. Gradient checkpointing changes no
    result, so a rerun with it resumes; the others change the run (RESUME_KEYS), so they start a new --out."""
    if not any(text in cause.lower() for text in OUT_OF_MEMORY):
        return ""
    fresh = []
    if cfg.batch_size > 1:
        fresh.append(f"a lower --batch-size (now {cfg.batch_size}) with a higher --grad-accum (now {cfg.grad_accum}) "
                     "for the same global batch")
    if cfg.method in ("full", "dreambooth") and cfg.workers > 1 and not cfg.fsdp:
        fresh.append("--fsdp, which shards the weights and optimizer state across the workers")
    fresh.append("a lower --resolution")
    again = f"start again in a new --out with {', or '.join(fresh)}"
    if cfg.gradient_checkpointing:
        return f" (out of memory: {again})"
    return f" (out of memory: add --gradient-checkpointing to the same command; or {again})"


def _local_trainer_class():
    from ray.train.torch import TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        """TorchTrainer without Ray Train's placement-group cleaner, for a local Ray.

        The cleaner asks the State API once a second whether the controller is alive. The State API is
        served by the dashboard, which `ray[data,train]` runs in minimal mode without it, so on a local
        Ray every query fails and is retried, forever: the answer never comes and the polling takes CPU
        from the workers (7% of a core, measured). On a local Ray the placement group dies with the
        Ray instance anyway. Ray 2.60 has no switch for it; `_create_default_callbacks` is where it adds it.
        """

        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return LocalTorchTrainer


def run_record(cfg: TrainConfig, base_fingerprint: str, class_data: str | None,
               data_fingerprints: tuple[str | None, str | None] = (None, None)) -> dict:
    """What identifies a fine-tune in its --out (finetune.json): a rerun must match it on RESUME_KEYS, and on
    DATASET_KEYS (manifests.dataset.dataset_fingerprint of --data and a given --class-data) where both have them."""
    lora = cfg.method == "lora"
    return {"method": cfg.method, "base": cfg.base, "base_fingerprint": base_fingerprint, "data": cfg.data,
            "data_fingerprint": data_fingerprints[0], "class_data_fingerprint": data_fingerprints[1],
            "rank": cfg.rank if lora else None, "lora_layers": cfg.lora_layer_set if lora else None,
            "token": cfg.token, "vectors": cfg.token_vectors if cfg.token else None,
            "train_text_encoder": cfg.train_text_encoder,
            "class_data": class_data, "class_prompts": cfg.class_prompts or None,
            "prior_loss_weight": cfg.prior_loss_weight if cfg.prior else None,
            "workers": cfg.workers, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "fsdp": cfg.fsdp}


def _check_out_is_ours(fs, root: str, cfg: TrainConfig) -> None:
    """--out is new, empty, or an earlier fine-tune's (finetune.json): a folder of other files (photos, the base
    model itself) is refused, not written into. A LoRA's or embedding's folder name is its adapter name."""
    shown = fs.unstrip_protocol(root)
    if fs.isfile(root):
        raise FinetuneError(f"--out {shown} is a file; give a folder: a new or empty one, or an earlier fine-tune's "
                            "--out to resume it")
    if fs.exists(f"{root}/run.json") or fs.exists(f"{root}/results"):  # a model's files would mix with its images
        raise FinetuneError(f"--out {shown} holds a `generate` run's output (run.json, "
                            "results/); give the fine-tune a folder of its own")
    if fs.isdir(root) and not fs.exists(f"{root}/finetune.json"):
        held = folder_names(fs, root)
        if held:
            raise FinetuneError(f"--out {shown} holds files ({first_few(held, 3)}) and is not a fine-tune's output (no "
                                "finetune.json); give a new or empty folder, or an earlier fine-tune's --out to resume it")
    for flag, uri in (("--data", cfg.data), ("--class-data", cfg.class_data)):
        if uri and _inside(fs, root, uri):  # (--out that is the dataset itself is refused above: it holds files)
            raise FinetuneError(f"--out {cfg.out} is inside {flag} {uri}: the dataset's folder would hold the "
                                "fine-tune's output too (and, as an --adapters store, list it); give --out a folder "
                                "outside it")
    name = root.rstrip("/").rsplit("/", 1)[-1]
    if cfg.method in ("lora", "textual-inversion") and not is_adapter_name(name):
        raise FinetuneError(f"--out {shown}: {name!r} will be the adapter's name in `generate --adapters`, which "
                            f"takes {ADAPTER_NAME_RULE.partition(';')[0]}; name the folder so")
    if cfg.method in ("lora", "textual-inversion") and fs.isfile(f"{root.rstrip('/')}.safetensors"):
        # the store would hold two adapters of one name, and generate fails every row naming it
        raise FinetuneError(f"--out {shown}: the adapter store beside it already holds {name}.safetensors, an "
                            f"adapter named {name!r}; give the fine-tune another name, or move that file aside")


def _inside(fs, root: str, uri: str) -> bool:
    """Whether the folder `root` of store `fs` lies inside the folder `uri` (links resolved on a disk)."""
    try:
        other, folder = url_to_fs(uri)
    except Exception:  # noqa: BLE001 - a store that cannot be had: said as --data's or --class-data's own problem
        return False
    if type(other) is not type(fs):
        return False
    if is_local_fs(fs):
        root, folder = os.path.realpath(root), os.path.realpath(folder)
    return root.startswith(folder.rstrip("/") + "/")


def _note_upscaling(data: str, resolution: int) -> None:
    """A dataset built smaller than the training size is upscaled in every step: said once, before training."""
    fs, root = url_to_fs(data)
    try:
        built = json.loads(fs.cat_file(f"{root.rstrip('/')}/{SUMMARY_FILE}")).get("resolution")
    except (OSError, ValueError):  # a dataset made by other means: no summary to read
        return
    if isinstance(built, int) and built < resolution:
        log(f"note: {data} was built at {built} px and this trains at {resolution} px, so every image is upscaled "
            f"{resolution / built:g}x: rebuild it with `dataset build --resolution {resolution}`, or pass "
            f"--resolution {built}")


def _starts_afresh(fs, root: str, record: dict, cfg: TrainConfig) -> bool:
    """Whether this fine-tune starts --out afresh: True where --out holds none, or one that failed before its
    first checkpoint (a refusal after finetune.json was written, such as --gpu on a machine without one, must
    not hold the corrected command to the flags it gave); False where it resumes the one there. A different
    fine-tune there is refused."""
    path = f"{root}/finetune.json"
    if not fs.exists(path):
        return True
    try:
        before = json.loads(fs.cat_file(path))
    except ValueError as exc:
        before = exc
    if not isinstance(before, dict):  # damaged, or written by something else
        raise FinetuneError(f"--out {fs.unstrip_protocol(root)} holds a finetune.json that is not a fine-tune's record "
                            f"({one_line(before) if isinstance(before, Exception) else type(before).__name__}): move "
                            "it aside to resume from the checkpoints there, or use a new --out")
    if before.get("status") == "failed" and not checkpoint_entries(fs, root):  # (a folder, or Ray's record)
        return True
    before = _as_recorded(before)  # written before 2026-12-06, it may hold a URI's password: compare without
    if "class_prompt" in before:  # written before --class-prompt could repeat: one prompt or none
        legacy = before.pop("class_prompt")
        before["class_prompts"] = [legacy] if legacy else None
    before["class_prompts"] = before.get("class_prompts") or None  # none is recorded as null, never []
    record = _as_recorded(record)  # finetune.json holds no password: compare what it would hold
    for key in ("data", "class_data"):  # recorded before `file:///x` was kept as `/x`: one folder, one spelling
        for side in (before, record):
            if isinstance(side.get(key), str):
                side[key] = absolute_local(side[key])
    # another method: what follows from it (a LoRA's rank, an embedding's token) would only repeat the difference
    keys = ("method",) if before.get("method") != record["method"] else RESUME_KEYS
    clashes = [f"{_flag_of(k)} {before.get(k)!r} there, {record[k]!r} now" for k in keys if before.get(k) != record[k]]
    # a dataset built again at the same path: another path, or another method, is said above as that
    path_of = {"data_fingerprint": "data", "class_data_fingerprint": "class_data"}
    clashes += [f"the dataset at {flag} was built again since, from other images or captions"
                for k, flag in DATASET_KEYS.items() if keys == RESUME_KEYS and before.get(k) and record.get(k)
                and before[k] != record[k] and before.get(path_of[k]) == record.get(path_of[k])]
    if clashes:
        raise FinetuneError(f"--out {fs.unstrip_protocol(root)} holds another fine-tune ({'; '.join(clashes)}); "
                            "use a new --out, or the same flags to resume that one")
    # records before 2026-12-05 lack some flags: those are not compared
    then, now = _resolved(before.get("config") or {}), _resolved(_as_recorded(cfg.model_dump()))

    def shown(value) -> str:
        return "the default" if value is None else repr(value)

    changed = [f"{flag_of(k)} {shown(then[k])} there, {shown(now[k])} now" for k in now
               if k not in RESUMABLE_FLAGS and k in then and then[k] != now[k]]
    if changed:
        raise FinetuneError(f"--out {fs.unstrip_protocol(root)} holds a fine-tune with other settings "
                            f"({'; '.join(changed)}); resuming it would train the rest of it differently: use its "
                            "flags to resume it, or a new --out")
    return False


def _flag_of(key: str) -> str:
    """How a key of finetune.json is given on the command line: `--rank`, `the method`, `the base model`."""
    return {"method": "the method", "base_fingerprint": "the base model (its fingerprint)"}.get(key) or flag_of(key)


def _resolved(config: dict) -> dict:
    """A recorded config with the flags whose default depends on others spelled out as the run reads them (an
    unset --alpha is the rank, --lr the method's): a rerun that gives the default by value is the same run."""
    from actors.train.config import DEFAULT_LR

    config = dict(config)
    defaults = {"alpha": config.get("rank"), "lora_layers": "attention", "vectors": 1,
                "lr": DEFAULT_LR.get(config.get("method"))}
    for key, default in defaults.items():
        if key in config and config[key] is None:
            config[key] = default
    return config


def _captions(uri: str):
    """The dataset's captions, file by file (a caller that needs only the first few stops early)."""
    from manifests.dataset import dataset_files

    from manifests.stores import read_parquet

    fs, files = dataset_files(uri)
    for path in files:
        yield from read_parquet(fs, path, columns=["caption"]).column("caption").to_pylist()


def _check_captions_use(uri: str, token: str, rows: int) -> None:
    """textual-inversion: the token must appear in the captions (in any case, as the tokenizer reads it), or no
    vector would ever get a gradient."""
    using = sum(token.lower() in (c or "").lower() for c in _captions(uri))
    if not using:
        raise FinetuneError(f"no caption in {uri} mentions --token {token!r}; textual-inversion learns the token "
                            f"from captions that use it, such as 'a photo of {token}' (dataset build reads the "
                            "captions from the .txt files beside the images)")
    if using < rows:
        log(f"note: {rows - using} of {rows} captions do not mention {token}; they train nothing for it")


def _check_token(cfg: TrainConfig) -> None:
    """textual-inversion: a token the tokenizer already has, or a long init word, fails here rather than in
    every worker. Reads the tokenizer of a preset or a local model; a remote base is checked by the workers."""
    from pathlib import Path

    from actors.presets import PRESETS, TOKENIZER_DIR
    from actors.textual_inversion import TextualInversionError, check_placeholder
    from actors.tokenizer import load_tokenizer

    if cfg.base in PRESETS:
        tokenizer = load_tokenizer(TOKENIZER_DIR)
    elif (Path(cfg.base.removeprefix("file://")) / "tokenizer").is_dir():
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(Path(cfg.base.removeprefix("file://")) / "tokenizer")
    else:
        return
    try:
        check_placeholder(tokenizer, cfg.token, cfg.init_word, cfg.token_vectors)
    except TextualInversionError as exc:
        raise FinetuneError(str(exc)) from exc


def draw_class_images(cfg: TrainConfig, fs, root: str, resolution: int) -> int:
    """Prior preservation: the base model draws --class-images of the --class-prompt(s), taking the prompts
    in turn, through `sdfleet generate` (the actors' own code; incremental, so a rerun draws only what is
    missing), and `dataset build` makes them --out/class-data. Returns the number of class images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.dataset import DatasetError, build_dataset
    from jobs.errors import RunFailed
    from jobs.generate import GenerateConfig, run_generate

    folder = f"{root}/class-images"
    fs.makedirs(folder, exist_ok=True)
    ids = [f"class-{i:05d}" for i in range(cfg.class_images)]
    prompts = [cfg.class_prompts[i % len(cfg.class_prompts)] for i in range(len(ids))]
    manifest = pa.table({"id": ids, "prompt": prompts,
                         "seed": [(cfg.seed * 1_000_003 + i) % 2**63 for i in range(len(ids))],  # a row's range
                         "width": [resolution] * len(ids), "height": [resolution] * len(ids)})
    with fs.open(f"{folder}/manifest.parquet", "wb") as f:
        pq.write_table(manifest, f)
    # Unwatermarked: the model trains on these pixels, and should not learn a watermark's pattern.
    gen = GenerateConfig(manifests=[fs.unstrip_protocol(f"{folder}/manifest.parquet")], out=fs.unstrip_protocol(folder),
                         models={"default": cfg.base}, watermark=None, address=cfg.address,
                         actors=cfg.workers if cfg.gpu else 1, device="cuda" if cfg.gpu else "auto")
    log(f"prior preservation: drawing {len(ids)} class images of {_quoted(cfg.class_prompts)} with {cfg.base}")
    try:
        run_generate(gen)
    except RunFailed as exc:
        raise FinetuneError(f"could not draw the class images: {exc}") from exc
    existing = {p.rsplit("/", 1)[-1][:-4] for p in folder_files(fs, f"{folder}/images", ".png")}  # one listing
    drawn = current_class_images(fs, folder, {i: prompt for i, prompt in zip(ids, prompts) if i in existing})
    if not drawn:
        raise FinetuneError(f"no class image was drawn from {_quoted(cfg.class_prompts)} (see "
                            f"{fs.unstrip_protocol(folder)}/results)")
    if len(drawn) < len(ids):
        log(f"note: {len(ids) - len(drawn)} of {len(ids)} class images failed; training uses the {len(drawn)} drawn")
    captions = "".join(json.dumps({"file": f"{i}.png", "caption": prompt}) + "\n" for i, prompt in drawn.items())
    _write_text(fs, f"{folder}/captions.jsonl", captions)
    try:
        summary = build_dataset(fs.unstrip_protocol(f"{folder}/images"), fs.unstrip_protocol(f"{root}/class-data"),
                                captions=fs.unstrip_protocol(f"{folder}/captions.jsonl"), resolution=resolution,
                                log=lambda line: None)
    except DatasetError as exc:
        raise FinetuneError(f"could not build the class dataset: {exc}") from exc
    return summary["rows"]


def current_class_images(fs, folder: str, wanted: dict[str, str]) -> dict[str, str]:
    """The class images (id -> prompt) that were drawn from the prompt this run wants, read from each PNG's own
    parameters. An image left from an earlier draw with another prompt (its redraw failed) is left out, so it
    is never trained on under a caption it was not drawn from."""
    from actors.png import read_png_parameters

    drawn_from = {i: read_png_parameters(fs.cat_file(f"{folder}/images/{i}.png")).get("prompt") for i in wanted}
    stale = [i for i in wanted if drawn_from[i] != wanted[i]]
    if stale:
        log(f"note: {len(stale)} class image(s) were drawn from another prompt and are left out, such as {stale[0]} "
            f"({drawn_from[stale[0]]!r}, not {wanted[stale[0]]!r})")
    return {i: prompt for i, prompt in wanted.items() if i not in stale}


def _default_validation_prompts(cfg: TrainConfig) -> list[str]:
    """The first two captions; with prior preservation, the first caption and the class, so the validation
    images show both the subject and whether the class is still drawn as the base drew it."""
    if cfg.prior:
        return _first_captions(cfg.data, 1) + (
            cfg.class_prompts[:1] if cfg.class_prompts else _first_captions(cfg.class_data, 1))
    return _first_captions(cfg.data, 2)


def _quoted(prompts: list[str]) -> str:
    return repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} prompts ({prompts[0]!r}, ...)"


def _first_captions(uri: str, n: int) -> list[str]:
    import itertools

    return list(itertools.islice((c for c in _captions(uri) if c), n))


def _write_json(fs, path: str, data: dict) -> None:
    """`data` as JSON, less any password in a URI it names: finetune.json travels with the model."""
    _write_text(fs, path, recorded_json(data))


def _as_recorded(data: dict) -> dict:
    """`data` as `_write_json` records it, to compare with what an earlier run recorded."""
    return json.loads(recorded_json(data))


def _write_text(fs, path: str, text: str) -> None:
    from manifests.ledger import atomic_write

    atomic_write(fs, path, text.encode())
