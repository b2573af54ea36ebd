"""The generation actor: holds one pipeline on one device and draws the batches Ray Data hands it.

Thin on purpose: the work is `actors.generate.draw_rows` (and, with `finish_inline`, `actors.finish`),
which tests call without Ray. By default it returns pixels, and the finishing stage on CPU workers marks
and writes them while this actor draws the next batch.
"""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from actors.adapters import AdapterStore
from actors.backends import make_backend
from actors.batch_size import AUTO_BLOCK, BatchSizes
from actors.crash_journal import check_start, kill_if_asked
from actors import opencv
from actors.finish import finish_rows
from actors.models import ModelError, ModelInfo, load_pipeline
from actors import metrics
from manifests.rows import DRAWN_SCHEMA, RESULT_SCHEMA, to_table
from manifests.stores import url_to_fs

if TYPE_CHECKING:
    from actors.backends.base import Backend


class GeneratorActor:
    """One per GPU (or CPU share). Ray Data calls it with tables of work rows (manifests.rows.WORK_SCHEMA);
    it returns drawn rows (DRAWN_SCHEMA), or ledger rows (RESULT_SCHEMA) when it finishes them itself."""

    def __init__(self, models: dict[str, dict[str, Any]], out_uri: str, batch_size: int | str,
                 device: str = "cpu", torch_threads: int = 1, adapters_uri: str | None = None,
                 backend: str = "eager", backend_cache: str | None = None, compile_mode: str = "auto",
                 finish_inline: bool = False, journal: str | None = None):
        started = time.time()
        # Environment for torch, which loads later (in `load`): set here, not through a Ray runtime env, since
        # any runtime env makes Ray start a fresh worker process for the actor instead of taking one it
        # prestarted. Ray set OMP_NUM_THREADS to the actor's CPU share (1 for a fraction); size OpenMP for
        # the torch threads this actor really runs. transformers warns at import about image processors
        # that no SD pipeline uses.
        os.environ["OMP_NUM_THREADS"] = str(torch_threads)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        self.device, self.torch_threads = device, torch_threads
        self.models = {name: ModelInfo(**info) for name, info in models.items()}
        self.first_model = "default" if "default" in self.models else next(iter(self.models))  # loaded at start
        self.fs, self.root = url_to_fs(out_uri)
        self.batch_size = batch_size  # or "auto": chosen per model and size (actors.batch_size)
        self.auto = BatchSizes(backend_cache) if batch_size == "auto" else None
        self.block = AUTO_BLOCK if batch_size == "auto" else batch_size  # the most rows one call brings
        self.fits: dict[tuple, int] = {}  # (model, width, height, guided) -> a batch drawn after one ran out of memory
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._loaded: tuple[str, Any] | None = None
        self._unloadable: dict[str, ModelError] = {}  # models that did not load: their rows fail without a reload
        self.store = AdapterStore(adapters_uri) if adapters_uri else None
        self.backend_name, self.backend_cache, self.compile_mode = backend, backend_cache, compile_mode
        self.backend: Backend | None = None  # around the loaded pipeline
        self.swaps_before = (0, 0.0)  # swap counters of backends of pipelines no longer loaded
        self.calls = 0
        self.swaps_reported = (0, 0.0)  # what the metrics have been told so far
        self.finish_inline = finish_inline
        if finish_inline:  # an actor that cannot finish its images fails as it starts, saying what to install
            opencv.load()
        self.journal, started_key = None, None
        if journal:  # the run's crash journal (actors.crash_journal), found by name
            import ray

            self.journal = ray.get_actor(journal)
            started_key = check_start(self.journal, ray.get_runtime_context().get_actor_id(),
                                      f"loading model {self.first_model} on {device}")
        # Every torch call runs on this one thread. Ray Data calls the actor from another thread than the
        # one that ran __init__, and drawing on a thread other than the one that loaded the model and set
        # torch's threads measured 1.5x slower on CPU (2.0 s against 3.1-3.9 s for a batch of 8 of tiny): each
        # thread that runs torch ops starts its own OpenMP team, and libgomp throttles its spin-waits once a
        # process holds more OpenMP threads than CPUs (docs/generation-speed.md).
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.startup = {"actor_started_at": started}  # wall clock, for run.json
        self._torch.submit(self.load).result()
        self.startup["model_loaded_at"] = time.time()
        if started_key:
            self.journal.end.remote(started_key)

    def load(self) -> None:
        """Set torch up and load the default model now: a model that does not load stops the run at start,
        not row by row."""
        import torch

        if self.device == "cpu":
            torch.set_num_threads(self.torch_threads)
        self.threads = torch.get_num_threads()  # what this actor's draws really run on, for run.json
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.pipeline(self.first_model)

    def pipeline(self, name: str) -> Backend:
        """The backend around model `name`'s pipeline; one model is held at a time (the planner groups rows by model)."""
        if name in self._unloadable:  # a batch that failed is drawn again row by row: one load failure is enough
            raise self._unloadable[name]
        if self._loaded is None or self._loaded[0] != name:
            if self.backend is not None:
                self.swaps_before = (self.swaps_before[0] + self.backend.swaps,
                                     self.swaps_before[1] + self.backend.swap_seconds)
            self._loaded, self.backend = None, None  # free the old pipeline before loading the next ...
            self._free_memory()  # ... now: the graph backends hold it in reference cycles
            info = self.models[name]
            try:
                pipe = load_pipeline(info, self.device, self.dtype)
            except ModelError as exc:
                self._unloadable[name] = exc
                raise
            self.backend = make_backend(self.backend_name, pipe, self.store, cache_uri=self.backend_cache,
                                        fingerprint=info.fingerprint, max_batch=self.block,
                                        compile_mode=self.compile_mode)
            self._loaded = (name, pipe)
        return self.backend

    def _free_memory(self) -> None:
        """Free what nothing refers to any more. The compile, onnx and tensorrt backends and their pipeline
        refer to each other (the pipeline's forward is the backend's, hooks hold the backend), so a dropped
        backend waits for Python's cycle collector, which GPU memory pressure never calls: the old model's
        weights, graphs and sessions stayed on the GPU beside the next model."""
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def ready_for(self, row: dict[str, Any]):
        """The pipeline for `row`'s model with exactly `row`'s adapters active (none: the base model)."""
        backend = self.pipeline(row["model"])
        backend.activate(row["adapters"] or [])
        return backend.pipe

    def swap_counters(self) -> tuple[int, float]:
        swaps, seconds = self.swaps_before
        if self.backend is not None:
            swaps, seconds = swaps + self.backend.swaps, seconds + self.backend.swap_seconds
        return swaps, seconds

    def draw(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drawn rows (manifests.rows.DRAWN_SCHEMA, without the actor fields) for a block of work rows."""
        from actors.generate import draw_rows  # torch and diffusers: loaded in the actor, not in the driver

        kill_if_asked(rows)
        drawn = draw_rows(self.ready_for, rows, max_batch=self.batch_for if self.auto else self.batch_size,
                          fits=self.fits)
        metrics.images_drawn(drawn)
        metrics.row_failures("draw", sum(1 for row in drawn if row["status"] == "failed"))
        return drawn

    def batch_for(self, row: dict[str, Any]) -> int:
        """`--batch-size auto`: the batch for `row`'s model and size, measured once per device (actors.batch_size)."""
        # compile's mode is part of the key: CUDA graphs hold memory of their own, so a batch that fits one mode
        # may not fit another
        backend = f"compile/{self.compile_mode}" if self.backend_name == "compile" else self.backend_name
        return self.auto.get(row, self.models[row["model"]].fingerprint, backend, self.ready_for)

    def draw_guarded(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`draw`, except for a block an actor died drawing: then row by row, and a row that killed an actor
        on its own is `failed` instead of drawn again (see actors.crash_journal)."""
        if self.journal is None or not rows:
            return self.draw(rows)
        import ray

        block = "block:" + ",".join(sorted(row["id"] for row in rows))  # ids are unique in a run
        if ray.get(self.journal.begin.remote(block)) == 0:
            drawn = self.draw(rows)
        else:
            drawn = []
            for row in rows:
                key = f"row:{row['id']}"
                if ray.get(self.journal.begin.remote(key)) > 0:
                    metrics.row_failures("actor_died")
                    drawn.append({**row, "status": "failed", "pixels": None, "error": (
                        f"{row['source']} row {row['row']} (`{row['id']}`): the actor drawing it died twice (a "
                        "crash in native code or out of memory; Ray's worker logs say which), so it is not "
                        "drawn again")})
                    continue
                drawn += self.draw([row])
                self.journal.end.remote(key)
        self.journal.end.remote(block)
        return drawn

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._torch.submit(self._call, batch).result()

    def _call(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        settled = [r for r in rows if r["status"] is not None]  # the plan decided them: passed on, not drawn
        drawn = self.draw_guarded([r for r in rows if r["status"] is None])
        swaps, seconds = self.swap_counters()
        metrics.adapter_swaps(swaps - self.swaps_reported[0], seconds - self.swaps_reported[1])
        self.swaps_reported = (swaps, seconds)
        self.calls += 1
        auto = {"auto_batch_size": self.auto.chosen, "auto_batch_probed": self.auto.probed} if self.auto else {}
        if self.fits:  # batches that ran out of device memory, and the size drawn since
            auto["batch_size_after_out_of_memory"] = {f"{m} {w}x{h}" + ("" if guided else " unguided"): n
                                                      for (m, w, h, guided), n in self.fits.items()}
        stats = json.dumps({**(self.backend.stats() if self.backend else {}), **self.startup,
                            "torch_threads": self.threads, "calls": self.calls, **auto})
        for row in drawn:
            row.update(actor=self.name, adapter_swaps=swaps, adapter_swap_seconds=seconds, backend_stats=stats)
        drawn += settled
        if self.finish_inline:
            return to_table(finish_rows(drawn, fs=self.fs, out_root=self.root), RESULT_SCHEMA)
        return to_table(drawn, DRAWN_SCHEMA)
