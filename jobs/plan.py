"""The read-and-plan stage of `generate`: manifest parts in, work rows out. Runs in Ray Data tasks.

Each row leaves this stage exactly once, as one of:
- `invalid`: a reason naming the row, field and value (drawn by nobody, recorded in the ledger);
- `skipped`: its `params_hash` already has an `ok` ledger entry and an image (not redrawn); `relabel` is set where
  the row's pass-through columns (`sku`, `category`, ...) changed since that entry: the driver records it again
  with them, from that entry, so the ledger and the report show what the manifest says now;
- `failed`: it needs an adapter that cannot be used (unknown, corrupt, a pickle file);
- `ok`: no ledger entry covers it, but its image is there with its `params_hash` (a killed run wrote the
  image and stopped before recording it), or its newest entry is a failure since an `ok` entry that still
  vouches for its image (an adapter upload cut short, then mended): recorded, with a note, instead of drawn;
- to draw: resolved (defaults filled from its model) with its `params_hash` and its `affinity`.

`affinity` is the row's batching key as a string, model and adapter set first. The driver sorts the rows
to draw by it, so the blocks handed to the actors come in long runs of one adapter set: each actor loads
an adapter about once per run instead of once per block.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
from PIL import Image

from actors.adapters import AdapterError, embedding_scale_problem, word_token_cause
from actors.png import read_parameters_from
from jobs.console import without_passwords
from jobs.outputs import RECOVERED_MARK, RELABELLED_MARK, RESTORED_MARK, recorded_again
from manifests.reader import ManifestPart, Unreadable, read_part
from manifests.rows import WORK_SCHEMA, to_table
from manifests.schema import (adapter_entries, coerced_id, group_key, resolve_row, row_errors, row_location,
                              too_small_for_the_mark, validate_row)
from manifests.stores import url_to_fs



@dataclass
class PlanState:
    """What every plan task must know, computed once on the driver."""

    models: dict[str, dict[str, Any]]  # name -> ModelInfo.defaults()
    duplicates: dict[str, int] = field(default_factory=dict)  # id -> how many rows carry it
    case_clashes: dict[str, list[str]] = field(default_factory=dict)  # id -> ids one file name away on this disk
    done: dict[str, str] = field(default_factory=dict)  # id -> params_hash of its newest ok entry
    # ids of `done` whose newest entry is a later failure -> that ok entry's fields (ledger.KEPT_FROM_OK)
    restored: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # id -> passthrough_hash of its newest ok entry, if any
    existing: set[str] = field(default_factory=set)  # ids with an image in the output store
    watermark: str | None = None
    force: bool = False
    adapter_fingerprints: dict[str, str] = field(default_factory=dict)  # name -> file hash
    adapter_errors: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be used
    adapter_widths: dict[str, dict] = field(default_factory=dict)  # name -> the widths it needs of a model
    embedding_tokens: dict[str, str] = field(default_factory=dict)  # token -> the embedding (of this run) adding it
    # model name -> those tokens that are words of its tokenizer: no actor adds them to it (it refuses the embedding)
    word_tokens: dict[str, frozenset[str]] = field(default_factory=dict)
    out: str | None = None  # the output root's URI: where images that no ledger entry covers are read


def plan_row(raw: dict[str, Any], *, source: str, row: int, state: PlanState) -> dict[str, Any]:
    """Turn one raw manifest row into one work row (see the module docstring)."""
    parsed, errors, extras = validate_row(raw, source=source, row=row, models=set(state.models))
    base = {"source": source, "row": row, "passthrough_hash": passthrough_hash(extras),
            "extra": json.dumps(extras, default=_as_json, ensure_ascii=False) if extras else None}
    raw_id = coerced_id(raw.get("id"))
    if errors:
        return {**base, "id": raw_id, "status": "invalid", "error": row_errors(errors),
                "adapters": listed_adapters(raw.get("adapters"), state.adapter_fingerprints)}
    # an invalid row keeps its adapters in the ledger (the report groups by them), as resolve_row spells them
    base["adapters"] = adapter_entries(((a.name, a.scale) for a in parsed.adapters), state.adapter_fingerprints)
    if parsed.id in state.duplicates:
        reason = (f"{row_location(source, row, parsed.id)}: `id` appears in {state.duplicates[parsed.id]} rows of this "
                  f"run; ids must be unique, so none of those rows is drawn")
        return {**base, "id": parsed.id, "status": "invalid", "error": reason}
    if parsed.id in state.case_clashes:
        reason = (f"{row_location(source, row, parsed.id)}: `id` differs only in case from "
                  f"{', '.join(repr(i) for i in state.case_clashes[parsed.id])}, and --out is on a disk that does not "
                  "tell case apart: their images would be one file, so none of those rows is drawn; make the ids "
                  "differ in more than case, or write to a case-sensitive store")
        return {**base, "id": parsed.id, "status": "invalid", "error": reason}
    unlisted = unlisted_embedding(parsed, state.embedding_tokens, state.word_tokens.get(parsed.model, frozenset()))
    if unlisted:
        error = f"{row_location(source, row, parsed.id)}: {unlisted}"
        return {**base, "id": parsed.id, "status": "invalid", "error": error}
    resolved = resolve_row(parsed, state.models[parsed.model], watermark=state.watermark,
                           adapter_fingerprints=state.adapter_fingerprints)
    work = {**base, **resolved, "status": None}
    broken = adapter_failures(parsed, state.adapter_errors, state.embedding_tokens,
                              state.word_tokens.get(parsed.model, frozenset()), state.adapter_widths,
                              state.models[parsed.model])
    if broken:  # a bad adapter fails the rows that need it (the plan says it, before an actor refuses it too)
        return {**work, "status": "failed", "error": "; ".join(broken)}
    too_small = too_small_for_the_mark(work["width"], work["height"]) if state.watermark else None
    if too_small:
        error = f"{row_location(source, row, parsed.id)}: {too_small}"
        return {**base, "id": parsed.id, "status": "invalid", "error": error}
    if not state.force and parsed.id in state.existing:
        if state.done.get(parsed.id) == work["params_hash"]:
            if parsed.id not in state.restored:
                label = state.labels.get(parsed.id)
                return {**work, "status": "skipped", "relabel": label is not None and label != work["passthrough_hash"]}
            # a failure since (an adapter upload cut short, put back), and the image its ok entry vouches for is
            # still there: that entry is recorded again, so the row does not stay `failed` in the ledger and report
            entry = state.restored[parsed.id]
            return {**work, **entry, "status": "ok", "warning": recorded_again(RESTORED, entry["warning"])}
        # An image a killed run wrote without recording it: never one whose newest `ok` entry still vouches for it
        # (that image has the entry's hash; one written since was taken out of `done`, changed_since_recorded).
        # Read only where no entry does: a change to every row's hash (a new model, a new mark) read every image
        # back, two requests per row on an object store (~15 h for a million rows on S3).
        unvouched = parsed.id not in state.done
        found = recovered(state.out, parsed.id, work["params_hash"]) if state.out and unvouched else None
        if found:
            return {**work, **found, "status": "ok"}
    unused = unused_embeddings(parsed, state.embedding_tokens)
    return {**work, "affinity": affinity(work), **({"warning": unused} if unused else {})}


def adapter_failures(parsed, errors: dict[str, str], tokens: dict[str, str], words: frozenset[str],
                     widths: dict[str, dict] | None = None, model: dict | None = None) -> list[str]:
    """Why the adapters a row lists would fail it, each reason once: one that cannot be used (`errors`: name ->
    why, as resolve_adapters found it), an embedding whose token is already a word of the row's model (`words`),
    which an actor refuses, or one made for a model of other widths (`widths`: name -> what it needs, against the
    row's `model` info). An adapter at scale 0 loads nothing, so it fails nothing."""
    broken = dict.fromkeys(errors[a.name] for a in parsed.adapters if a.scale != 0 and a.name in errors)
    listed = {a.name for a in parsed.adapters if a.scale != 0}
    broken.update((str(AdapterError(name, word_token_cause(name, token, token.lower()))), None)
                  for token, name in sorted(tokens.items()) if name in listed and token in words)
    for name in sorted(listed):
        if cause := other_widths((widths or {}).get(name), model, parsed.model):
            broken[str(AdapterError(name, cause))] = None
    return list(broken)


def other_widths(needs: dict | None, model: dict | None, model_name: str) -> str | None:
    """Why an adapter needing `needs` (text_width, context_width) does not fit `model`, or None where it fits or
    either side does not say."""
    for field_name, what, verb in (("text_width", "text encoder is", "is"),
                                   ("context_width", "cross-attention takes text features", "takes")):
        have, want = (model or {}).get(field_name), (needs or {}).get(field_name)
        if have and want and have != want:
            return (f"is made for a model whose {what} {want} wide, and model {model_name!r}'s {verb} {have}: an "
                    "adapter for another base model (Stable Diffusion 1.x: 768, 2.x: 1024)")
    return None


def unused_embeddings(parsed, tokens: dict[str, str]) -> str | None:
    """A warning for a row that lists an embedding whose token neither of its prompts uses: the embedding adds a
    word to the tokenizer, and a prompt without the word draws as if it were not listed. (Users of other tools
    write the file's name, which is the token only where the file names none.)"""
    if not tokens or not parsed.adapters:  # (most rows of most runs: every row to draw passes here)
        return None
    by_name: dict[str, list[str]] = {}
    for token, name in sorted(tokens.items()):
        by_name.setdefault(name, []).append(token)
    text = f"{parsed.prompt}\n{parsed.negative_prompt or ''}".lower()
    used = added_tokens_in(text, {t.lower() for t in tokens})
    said = []
    for a in parsed.adapters:
        if a.scale != 0 and a.name in by_name and not any(t.lower() in used for t in by_name[a.name]):
            token = by_name[a.name][0]
            named = " (the prompt has the file's name: an embedding acts through its token)" if (
                a.name.lower() in text) else ""
            said.append(f"`adapters` lists the embedding {a.name!r}, whose token {token!r} neither prompt uses: it "
                        f"changes nothing{named}; write {token!r} where its concept goes")
    return "; ".join(said) or None


def listed_adapters(adapters: Any, fingerprints: dict[str, str]) -> list[dict[str, Any]] | None:
    """A row's raw `adapters` as the work schema spells them, where they read as name and scale pairs (a row
    invalid for another field, or for its adapters: one listed twice); None where they do not."""
    try:
        return adapter_entries([(str(a["name"]), float(1.0 if a.get("scale") is None else a["scale"]))
                                for a in adapters or []], fingerprints)  # (a null scale: 1, as validate_row reads it)
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def _as_json(value: Any) -> str:
    """A manifest value JSON has no type for, as the ledger's text: dates and times in ISO 8601, binary as hex,
    anything else (decimals) as Python writes it."""
    if isinstance(value, (dt.date, dt.time)):  # datetimes too
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


def unlisted_embedding(parsed, tokens: dict[str, str], words: frozenset[str] = frozenset()) -> str | None:
    """Why a row that uses an embedding's token without listing the embedding cannot be drawn, or None.

    An actor keeps the embeddings it loaded (their tokens are words of its tokenizer from then on), so such a
    row would draw with the embedding on an actor that loaded it for another row, and without it elsewhere:
    two images for one `params_hash`, whichever came first. Tokens are matched as the tokenizer matches
    added tokens: anywhere in the text, in any case (CLIP's tokenizer lower-cases the text first, so
    `<MY-TOK>` reads as `<my-tok>`). `words`: the tokens that are words of the row's model's tokenizer, which
    no actor adds to it (it refuses their embeddings), so they draw the same everywhere."""
    embeddings = set(tokens.values())
    for a in parsed.adapters:  # the actor would refuse it: a row's problem, said before any actor is asked
        problem = embedding_scale_problem(a.scale) if a.name in embeddings else None
        if problem:
            return f"`adapters` adapter {a.name!r} {problem}"
    listed = {a.name for a in parsed.adapters if a.scale != 0}
    at_zero = {a.name for a in parsed.adapters if a.scale == 0}
    prompt, negative = parsed.prompt.lower(), (parsed.negative_prompt or "").lower()
    every = {t.lower() for t in tokens if t not in words}  # (an actor may hold them all: matched as it would)
    in_prompt, in_negative = added_tokens_in(prompt, every), added_tokens_in(negative, every)
    for token, name in sorted(tokens.items()):
        if name in listed or token in words:
            continue
        where = ("the prompt" if token.lower() in in_prompt else
                 "the negative prompt" if token.lower() in in_negative else None)
        if where:
            how = "lists at scale 0, which loads nothing" if name in at_zero else "do not list"
            return (f"{where} uses {token!r}, the token of the embedding {name!r}, which the row's `adapters` {how}: "
                    f"add {{\"name\": \"{name}\", \"scale\": 1.0}} (unlisted, the row would draw with it on an "
                    "actor that loaded it for another row, and without it elsewhere)")
    return None


def added_tokens_in(text: str, tokens: set[str]) -> set[str]:
    """The added tokens CLIP's tokenizer finds in `text` (both in lower case) when it holds all of `tokens`: from
    the left, the longest one starting at each place (transformers' Trie.split), so `<tok>` inside `<tok>_v2` is
    no use of `<tok>` (a row listing `<tok>_v2` was refused as using `<tok>`: QA)."""
    present = [t for t in tokens if t in text]
    found: set[str] = set()
    at = 0
    while present and at < len(text):
        match = max((t for t in present if text.startswith(t, at)), key=len, default="")
        if match:
            found.add(match)
        at += len(match) or 1
    return found


RESTORED = (f"{RESTORED_MARK} the image drawn before this row's last failure is still the row's; its entry is recorded "
            "again")


RELABELLED = (f"{RELABELLED_MARK} the row's pass-through columns changed since its image was drawn, not what it draws; "
              "its entry is recorded again with them")


def passthrough_hash(extras: dict[str, Any]) -> str:
    """A digest of a row's pass-through columns, by name (their order in the manifest does not count), a whole
    float as the integer it is (pandas makes an integer column float on a night it holds a null: 7.0 is 7)."""
    values = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in extras.items()}
    blob = json.dumps(values, default=_as_json, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def recovered(out: str, row_id: str, params_hash: str) -> dict[str, str] | None:
    """The ledger fields of `row_id`'s image if it is already the one the row would draw: a killed run wrote
    it (images are written before their ledger entry) but did not live to record it. Only the PNG's
    parameters chunk is read unless its `params_hash` matches; then the whole file, for its sha256."""
    fs, root = url_to_fs(out)
    path = f"{root.rstrip('/')}/images/{row_id}.png"
    try:
        parameters = read_parameters_from(fs, path)
        if not parameters or parameters.get("params_hash") != params_hash:
            return None
        data = fs.cat_file(path)
        with Image.open(io.BytesIO(data)) as image:  # its parameters come first: a file cut short still has them
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # gone, cut short, damaged: draw it
        return None
    return {"uri": fs.unstrip_protocol(path), "sha256": hashlib.sha256(data).hexdigest(), "png_bytes": len(data),
            "warning": f"{RECOVERED_MARK} an earlier run drew this image and no ledger entry vouches for it (a run "
                       "stopped before recording it, or the output was copied); read back, it is the row's"}


def affinity(work: dict[str, Any]) -> str:
    """A string that sorts rows by model, then adapter set, then the rest of the batching key."""
    return json.dumps(group_key(work), separators=(",", ":"), ensure_ascii=False)


def plan_part(part: ManifestPart, state: PlanState) -> Iterator[dict[str, Any]]:
    """Plan every row of one manifest part, in manifest order. A row of a row group that cannot be decoded
    (a damaged file) is invalid, named by its id where the id column alone still reads."""
    source = without_passwords(part.uri)  # the ledger, run.json and the report name it; a password stays out
    for pos, raw in read_part(part):
        if isinstance(raw, Unreadable):
            yield {"source": source, "row": pos, "id": raw.id, "extra": None, "status": "invalid", "error": raw.error}
        else:
            yield plan_row(raw, source=source, row=pos, state=state)


PLAN_CHUNK_ROWS = 8_192  # work rows a plan task yields at a time: a part of a million rows is not held whole


_HELD: dict[str, PlanState] = {}  # this worker process's plan state, by object id: one run's at a time


def _state_from(ref) -> PlanState:
    """The plan state behind `ref`, read from the object store once per worker process: with the done-ledger
    of a million-row output it is ~70 MB, ~0.9 s to unpickle, and a manifest of a thousand parts made that a
    thousand times (Ray reuses the worker processes of a run's plan tasks)."""
    key = ref.hex()
    if key not in _HELD:
        import ray

        _HELD.clear()
        _HELD[key] = ray.get(ref)
    return _HELD[key]


def plan_batch(batch: pa.Table, state) -> Iterator[pa.Table]:
    """Ray Data entry point: a batch of ManifestPart records in, tables of WORK_SCHEMA rows out.

    `state` is a PlanState or an object-store reference to one.
    """
    if not isinstance(state, PlanState):
        state = _state_from(state)
    for record in batch.to_pylist():
        rows = plan_part(ManifestPart(**record), state)
        while chunk := list(itertools.islice(rows, PLAN_CHUNK_ROWS)):
            planned_at = time.time()
            yield to_table([{**r, "affinity": r.get("affinity") or "", "planned_at": planned_at} for r in chunk],
                           WORK_SCHEMA)
