"""The rows that flow between the stages of `generate`, as Arrow schemas: the contract between the
driver's plan, the draw stage (accelerator actors) and the finishing stage (CPU workers).

    plan --WORK_SCHEMA--> draw --DRAWN_SCHEMA (pixels)--> finish --RESULT_SCHEMA--> driver: ledger

A drawn row keeps every work field (the finishing stage writes them into the PNG's parameters) and adds
its pixels, or `status` "failed" with the `error` that stopped it. A row the plan already settled
(`invalid`, `skipped`, `failed`, or `ok` for an image recovered from a killed run) passes through both stages untouched when a run sends every planned row
to the actors (a run into a fresh output: see jobs.generate).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from manifests.ledger import LEDGER_SCHEMA

ADAPTER_WITH_FINGERPRINT = pa.list_(pa.struct([("name", pa.string()), ("scale", pa.float64()),
                                               ("fingerprint", pa.string())]))

WORK_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("seed", pa.int64()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("steps", pa.int64()),
    ("guidance_scale", pa.float64()),
    ("scheduler", pa.string()),
    ("model", pa.string()),
    ("model_fingerprint", pa.string()),
    ("adapters", ADAPTER_WITH_FINGERPRINT),
    ("watermark", pa.string()),
    ("params_hash", pa.string()),
    ("status", pa.string()),  # null: to draw; "invalid", "skipped", "failed" or "ok" (recovered): settled by the plan
    ("error", pa.string()),
    ("warning", pa.string()),
    ("uri", pa.string()),  # a recovered row: the image an earlier run drew and did not record
    ("sha256", pa.string()),
    ("png_bytes", pa.int64()),
    ("watermark_bits", pa.float64()),  # ... and what its mark read back (a restored or relabelled row: from its entry)
    ("source", pa.string()),
    ("row", pa.int64()),
    ("passthrough_hash", pa.string()),
    ("extra", pa.string()),
    ("relabel", pa.bool_()),  # a skipped row whose pass-through columns changed: recorded again (jobs.plan)
    ("affinity", pa.string()),  # sort key of rows to draw (jobs.plan.affinity); "" for the others
    ("planned_at", pa.float64()),  # wall clock when its plan task finished: run.json's startup.plan_done
])

# What an actor reports with every row: its running adapter-swap counters and its backend's counters
# (JSON, with the actor's start-up times), which the driver keeps per actor for run.json.
ACTOR_FIELDS = [
    pa.field("actor", pa.string()),
    pa.field("adapter_swaps", pa.int64()),
    pa.field("adapter_swap_seconds", pa.float64()),
    pa.field("backend_stats", pa.string()),
]

DRAWN_SCHEMA = pa.schema([
    *(f for f in WORK_SCHEMA if f.name != "affinity"),
    pa.field("pixels", pa.binary()),  # height x width x 3 uint8 RGB, row-major; null when status is failed
    pa.field("seconds", pa.float64()),  # draw time per row of its batch
    *ACTOR_FIELDS,
])

RESULT_SCHEMA = pa.schema([*LEDGER_SCHEMA, *(f for f in ACTOR_FIELDS if f.name != "actor"),
                           pa.field("planned_at", pa.float64())])
# What the finishing stage hands on from a drawn row besides the ledger columns.
PASS_THROUGH = tuple(name for name in RESULT_SCHEMA.names if name not in LEDGER_SCHEMA.names)
# Statuses a row can carry into the finishing stage instead of pixels; "ok" is a row whose image an earlier,
# killed run wrote but did not record (jobs.plan.recovered).
SETTLED = ("invalid", "skipped", "failed", "ok")


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows as a table of `schema` (missing fields are null, fields outside it are dropped)."""
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
