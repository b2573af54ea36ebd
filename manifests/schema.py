"""The manifest row: everything one image is made from. This model is the contract of DESIGN.md.

Only `id` and `prompt` are required. Unset optional fields stay `None` here and are filled from the
model's defaults by `resolve_row`, because the defaults (size, steps, scheduler) belong to the model.
"""

from __future__ import annotations

import decimal
import hashlib
import json
import math
import numbers
import re
import unicodedata
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from manifests.text import terminal_line

# `\Z`, not `$`: `$` also matches before a trailing newline, and "sku-1\n" must not name a file.
ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
# One folder or file name of an adapter's name in its store (`style`, `brand/style-v2`): nothing that leaves
# the store (`..`, an absolute path) and nothing hidden.
ADAPTER_NAME_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
# The rule in words, for the messages that refuse a name (no '..', no leading '/', '.' or '-')
ADAPTER_NAME_RULE = ("letters, digits, '.', '_' and '-', starting with a letter, digit or '_'; '/' between the names "
                     "of folders in the store, each named so")
SEED_LIMIT = 2**63
# invisible-watermark refuses images of fewer pixels than 256x256 (any shape: 128x512 is marked); every such
# size with sides in multiples of 8 holds at least 1,024 blocks, one payload bit each.
WATERMARK_MIN_SIDE = 256
WATERMARK_MIN_PIXELS = WATERMARK_MIN_SIDE**2
# A payload is 4 to 32 bytes of UTF-8. Under 32 bits an unmarked image reads as carrying it now and then (a
# 1-byte payload: 1 image in 128). Over 256 bits a bit has fewer than 4 blocks on the smallest image, and busy
# images lose some (48 bytes: 98.4% read back on noise at 256x256; 32 bytes: all).
WATERMARK_MIN_BYTES, WATERMARK_MAX_BYTES = 4, 32
# A mark reads as present when this share of its bits match (an unmarked image matches about half; a few bits
# can read wrong on busy or re-encoded images).
WATERMARK_MATCH = 0.9

SchedulerName = Literal["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "pndm", "heun", "unipc"]
SCHEDULER_NAMES: tuple[str, ...] = get_args(SchedulerName)


def is_safe_id(value: str) -> bool:
    """Whether a row id can name its image file: 1-128 of `[A-Za-z0-9._-]`, and not `.` or `..`."""
    return value not in (".", "..") and bool(ID_PATTERN.match(value))


def is_adapter_name(name: str) -> bool:
    """Whether `name` is a path of safe segments inside an adapter store (`style`, `brand/style-v2`)."""
    return all(ADAPTER_NAME_SEGMENT.match(part) for part in name.split("/"))


def too_small_for_the_mark(width: int, height: int) -> str | None:
    """Why an image of this size cannot carry the watermark (and the ways out), or None when it can."""
    if width * height >= WATERMARK_MIN_PIXELS:
        return None
    return (f"{width}x{height} is too small to carry the watermark (it needs at least {WATERMARK_MIN_PIXELS:,} "
            f"pixels, as {WATERMARK_MIN_SIDE}x{WATERMARK_MIN_SIDE} has); make it larger or run with --no-watermark")


def watermark_payload_problem(payload: str, blank_ok: bool = False) -> str | None:
    """Why `payload` cannot be a watermark's payload, or None when it can. `blank_ok`: white space alone is a
    payload (one a PNG records: images were marked so before it was refused for new marks)."""
    if payload and not payload.strip() and not blank_ok:  # (marked, it could be checked only while its PNG's
        # text said it)
        return "is only white space; choose text, e.g. the owner's name"
    data = payload.encode("utf-8")
    if not WATERMARK_MIN_BYTES <= len(data) <= WATERMARK_MAX_BYTES:
        return (f"is {len(data)} byte(s) of UTF-8; a watermark payload is {WATERMARK_MIN_BYTES} to "
                f"{WATERMARK_MAX_BYTES} bytes (fewer and unmarked images read as carrying it now and then, more "
                "and busy images lose bits)")
    ones = sum(bin(byte).count("1") for byte in data)
    if min(ones, 8 * len(data) - ones) <= (1 - WATERMARK_MATCH) * 8 * len(data):
        return ("is nearly all zero (or all one) bits, which a flat unmarked image reads as well; choose text, "
                "e.g. the owner's name")
    return None


# The `id` field's own coercion: a string as it is, bytes decoded as UTF-8 (a Parquet binary column), nothing else.
_ID_TYPE = TypeAdapter(str)
# How many characters of a value an error message quotes: a 100 KB prompt must not become a 100 KB line.
QUOTE_CHARS = 200
MAX_SIDE = 2048  # the largest width and height a row may ask for; training sizes stop there too


def coerced_id(value: Any) -> str | None:
    """The id the schema sees in a raw `id` value, or None where the schema refuses the value's type.
    Duplicate ids are counted on this, so a binary `id` column and a string one compare as the rows will."""
    if isinstance(value, str):
        return value
    try:
        return _ID_TYPE.validate_python(value)
    except ValidationError:
        return None


LISTED_TWICE = "is listed twice in one row; list it once, with the summed scale"


def adapter_listed_twice(names) -> str | None:
    """The first adapter name a row lists twice, or None. Two scales of one adapter are refused, not summed:
    which one was meant is the user's call. The schema (manifest validate, the plan) and the actor
    (actors.adapter_cache.normalise) both ask this, with LISTED_TWICE as the cause."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def first_few(names: list[str], limit: int) -> str:
    """The first `limit` names, comma-separated, with how many more were left out ("a, b and 3 more")."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def error_line(exc: BaseException, limit: int = 300, typed: tuple[type, ...] = ()) -> str:
    """An exception as one short line, led by its type ("OSError: Invalid BYTE_ARRAY value") unless the message
    already names it or it is one of `typed` (errors whose messages are written to be read as they are)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, typed) and type(exc).__name__ not in text:
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[:limit] + "..."


def quoted(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)`, cut to `limit` characters with a note of how much was left out."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _whole_number(value: Any) -> Any:
    """Integer fields take integers only: text, true/false and floats (even 2.0) are refused, not converted. A
    decimal column of scale 0 (`decimal(10, 0)`, as databases export counts) holds integers."""
    if value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        return value
    if isinstance(value, decimal.Decimal) and value.is_finite() and value.as_tuple().exponent >= 0:
        return int(value)
    if isinstance(value, decimal.Decimal) and value.is_finite():  # decimal(10, 2): 5.00 is whole, its column is not
        raise ValueError("must be a whole number, stored in an integer column or a decimal one with no digits after "
                         f"the point (scale 0); this one keeps {-value.as_tuple().exponent}")
    raise ValueError("must be a whole number, stored in an integer column (not text, true/false or a float)")


def _real_number(value: Any) -> Any:
    """Float fields take numbers only: text and true/false are refused, not converted. Decimals are numbers."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value
    if isinstance(value, decimal.Decimal):
        return float(value)  # NaN and infinities are then refused as for floats
    raise ValueError("must be a number, stored in a numeric column (not text or true/false)")


def default_seed(row_id: str) -> int:
    """A stable seed from the row id: the same id draws the same image on every run and machine."""
    return int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big") % SEED_LIMIT


class AdapterRef(BaseModel):
    """One adapter applied to a row, with the weight it is blended at."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="adapter name in the --adapters store")
    scale: float = Field(default=1.0, allow_inf_nan=False, description="blend weight; 0 is the base model")

    @field_validator("scale", mode="before")
    @classmethod
    def _scale_is_a_number(cls, value: Any) -> Any:
        # a null scale is the default, as a null field of a row is (a struct built from dicts, some without it)
        return 1.0 if value is None else _real_number(value)

    @field_validator("name")
    @classmethod
    def _name_stays_in_the_store(cls, value: str) -> str:
        if not is_adapter_name(value):
            raise ValueError(f"is not a valid adapter name ({ADAPTER_NAME_RULE})")
        return value


def control_character(text: str) -> str | None:
    """What is wrong with prompt text holding a control character, naming the first, or None. CLIP's tokenizer
    makes such a character (an ANSI colour code, a NUL of a binary export) tokens of its own, so the image is
    drawn for other words than the prompt shows; tabs, line breaks and the other whitespace it folds are fine."""
    if found := CONTROL_CHARACTER.search(text):
        return (f"holds control character U+{ord(found.group()):04X} (character {found.start() + 1}), which would "
                "be drawn as tokens of its own; remove it")
    return None


def _without_control_characters(text: str) -> str:
    if problem := control_character(text):
        raise ValueError(f"{problem} (tabs and line breaks are fine)")
    return text


# The control characters (Unicode category Cc) that CLIP's tokenizer turns into tokens: all but the whitespace it
# folds into a space (tab, line feed, vertical tab, form feed, carriage return, next line U+0085)
CONTROL_CHARACTER = re.compile("[\\x00-\\x08\\x0e-\\x1f\\x7f-\\x84\\x86-\\x9f]")


class ManifestRow(BaseModel):
    """One row of a prompt manifest. Columns that are not fields pass through to the ledger."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    id: str = Field(description="1-128 of [A-Za-z0-9._-], not . or ..; unique in a run; names the output file")
    prompt: str = Field(description="what to draw; over 77 CLIP tokens the rest is cut off (a warning)")
    negative_prompt: str = Field(default="", description="what to steer away from")
    seed: int | None = Field(default=None, description="0 <= seed < 2**63; default: a stable hash of id")
    steps: int | None = Field(default=None, description="denoising steps, 1..500; default: the model's")
    guidance_scale: float = Field(default=7.5, description="classifier-free guidance, finite and >= 0")
    width: int | None = Field(default=None, description=f"pixels, a multiple of 8 in 64..{MAX_SIDE}; default: native")
    height: int | None = Field(default=None, description=f"pixels, a multiple of 8 in 64..{MAX_SIDE}; default: native")
    scheduler: SchedulerName | None = Field(default=None, description="sampler; default: the model's")
    model: str = Field(default="default", description="a --model NAME or a preset")
    adapters: list[AdapterRef] = Field(default_factory=list, description="LoRA / embeddings with scales")

    @field_validator("seed", "steps", "width", "height", mode="before")
    @classmethod
    def _integers_are_numbers(cls, value: Any) -> Any:
        return _whole_number(value)

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _floats_are_numbers(cls, value: Any) -> Any:
        return _real_number(value)

    @field_validator("id")
    @classmethod
    def _id_is_a_safe_file_name(cls, value: str) -> str:
        if not is_safe_id(value):
            raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ - (and not . or ..)")
        return value

    @field_validator("adapters")
    @classmethod
    def _each_adapter_once(cls, value: list[AdapterRef]) -> list[AdapterRef]:
        twice = adapter_listed_twice(ref.name for ref in value)
        if twice:
            raise ValueError(f"adapter {twice!r} {LISTED_TWICE}")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        # format and control characters alone (a zero-width space, a byte-order mark) are as empty to the eye
        if all(c.isspace() or unicodedata.category(c) in ("Cf", "Cc") for c in value):
            raise ValueError(f"must not be empty (it holds only invisible characters: {value!r})")
        return _without_control_characters(value)

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_readable(cls, value: str) -> str:
        return _without_control_characters(value)

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < SEED_LIMIT:
            raise ValueError("must be in 0 <= seed < 2**63")
        return value

    @field_validator("steps")
    @classmethod
    def _steps_in_range(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 500:
            raise ValueError("must be in 1..500")
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _guidance_finite(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be a finite number >= 0")
        return value

    @field_validator("width", "height")
    @classmethod
    def _size_multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and (value % 8 or not 64 <= value <= MAX_SIDE):
            raise ValueError(f"must be a multiple of 8 in 64..{MAX_SIDE}")
        return value

    @field_validator("model")
    @classmethod
    def _model_is_known(cls, value: str, info) -> str:
        known = (info.context or {}).get("models")
        if not value.strip():  # (`--model =REF` names no model: the hint below would be refused)
            raise ValueError("is empty: name a model, or leave the cell null for `default`")
        if known is not None and value not in known:
            raise ValueError(f"is not a known model; known: {', '.join(sorted(known))} (add --model {value}=REF)")
        return value


FIELDS = tuple(ManifestRow.model_fields)


# Names other tools give the fields (diffusers' arguments, AUTOMATIC1111's parameters, short forms), as
# look_alike_columns spells them: lower case, no separators.
FIELD_ALIASES = {
    "prompts": "prompt", "positiveprompt": "prompt",
    "negative": "negative_prompt", "negprompt": "negative_prompt", "negativeprompts": "negative_prompt",
    "seeds": "seed", "numinferencesteps": "steps", "numsteps": "steps", "samplingsteps": "steps",
    "cfg": "guidance_scale", "cfgscale": "guidance_scale", "guidance": "guidance_scale",
    "sampler": "scheduler", "samplername": "scheduler", "lora": "adapters", "loras": "adapters",
}


def look_alike_columns(columns) -> dict[str, str]:
    """Columns that are no field but read as one, each with the field it looks like: the same once case,
    spaces, `_` and `-` are set aside (`Seed`, `steps `, `negative-prompt`, `GuidanceScale`), or another
    tool's name for it (`negative`, `cfg_scale`, `num_inference_steps`, `sampler`). Such a column passes
    through as an extra column and the field is missing from every row, which is seldom what its author
    meant: a renamed `negative_prompt` column redraws a whole catalogue without its negative prompts."""
    def key(name: str) -> str:
        return re.sub(r"[\s_-]+", "", name.strip().lower())

    known = {**FIELD_ALIASES, **{key(f): f for f in FIELDS}}
    return {c: known[key(c)] for c in columns if c not in FIELDS and key(c) in known}


def look_alike_warning(source: str, column: str, field: str, columns=()) -> str:
    """The warning for `column` of `source`, which looks like `field`; `columns`: all of the file's columns."""
    what = (f"`{field}` is read from the file's own `{field}` column" if field in columns else
            f"every row of it reads `{field}` as missing")
    return (f"{source}: column {column!r} is not the field `{field}` (field names are exact, lower-case): {what}, "
            f"and {column!r} passes through to the ledger")


REQUIRED = ("id", "prompt")


class RowError(BaseModel):
    """One thing wrong with one row, said the way a user can act on it."""

    source: str
    row: int  # 0-based position in its manifest file
    id: str | None
    field: str
    value: Any = None
    missing: bool = False
    reason: str

    def __str__(self) -> str:
        return f"{row_location(self.source, self.row, self.id)}: {self.what()}"

    def what(self) -> str:
        """What is wrong, without where (said once for a row's several errors: see `row_errors`)."""
        got = "it is missing" if self.missing else f"got {quoted(self.value)}"
        return f"`{self.field}` {self.reason}, {got}"


def row_errors(errors: list[RowError]) -> str:
    """A row's errors in one message, led once by where the row is."""
    first = errors[0]
    return f"{row_location(first.source, first.row, first.id)}: " + "; ".join(e.what() for e in errors)


def row_location(source: str, row: int, row_id: str | None) -> str:
    """Where a row is, as every message about one says it: `m.parquet row 17 (`sku-88`)` (0-based row)."""
    if row_id is not None:  # a newline in an id would split the message in two
        row_id = terminal_line(row_id)
    shown = row_id if row_id is None or len(row_id) <= QUOTE_CHARS else row_id[:QUOTE_CHARS] + "..."
    return f"{source} row {row}" + (f" (`{shown}`)" if shown else "")


def validate_row(raw: dict[str, Any], *, source: str, row: int, models: set[str] | None = None):
    """Validate one raw manifest row.

    Returns (ManifestRow or None, errors, extras): `extras` are the columns that are not fields, kept
    for the ledger. Nulls in optional columns mean "use the default"; a null `id` or `prompt` is missing.
    """
    extras = {k: v for k, v in raw.items() if k not in FIELDS}
    data = {k: v for k, v in raw.items() if k in FIELDS and v is not None}
    row_id = coerced_id(raw.get("id"))
    try:
        parsed = ManifestRow.model_validate(data, context={"models": models} if models is not None else None)
        return parsed, [], extras
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "row"
            top = str(err["loc"][0]) if err["loc"] else field
            missing = err["type"] == "missing"
            if missing:
                reason = "is required" if top in raw else "is required (a column every manifest needs)"
            else:
                reason = err["msg"].removeprefix("Value error, ").replace("Input should be", "should be")
                if "instance of AdapterRef" in reason:  # pydantic names our class, not the shape a manifest needs
                    reason = ("should be a struct of `name` (text) and `scale` (a number): `adapters` is a column "
                              "of type list<struct<name: string, scale: double>>")
                elif top == "adapters" and err["type"] == "list_type":  # text, JSON, one struct: say the shape
                    reason = ("should be a list of {name, scale} structs: `adapters` is a column of type "
                              "list<struct<name: string, scale: double>>")
                elif top == "adapters" and err["type"] == "extra_forbidden":  # `adapters.0.weight`
                    reason = "is not a field of an adapter: an entry has `name` and `scale` only"
                elif top == "adapters" and err["type"] == "string_too_short":  # an empty name
                    reason = "is empty: name an adapter of the --adapters store"
                elif top == "id" and err["type"] == "string_type":  # an id column of numbers
                    reason += " (store the `id` column as text)"
                elif top == "id" and err["type"] == "string_unicode":  # a binary id column of bytes no UTF-8
                    reason = "is not UTF-8 text: write the manifest's ids as UTF-8 text"
            errors.append(RowError(
                source=source, row=row, id=row_id, field=field, missing=missing,
                value=None if missing else _value_at(data, err["loc"]), reason=reason,
            ))
        return None, errors, extras


def _value_at(data: dict[str, Any], loc: tuple) -> Any:
    value: Any = data
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def params_hash(resolved: dict[str, Any]) -> str:
    """Hash over everything that changes a row's pixels; equal hashes mean the image can be reused."""
    keys = (
        "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "scheduler",
        "model_fingerprint", "adapters", "watermark",
    )
    payload = {k: resolved.get(k) for k in keys}
    # the adapters as the actors apply them: by name, scale-0 entries left out (they change nothing)
    payload["adapters"] = sorted((a for a in payload["adapters"] or [] if a["scale"] != 0), key=lambda a: a["name"])
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def adapter_entries(pairs, fingerprints: dict[str, str]) -> list[dict[str, Any]]:
    """(name, scale) pairs as a work row's `adapters` (rows.WORK_SCHEMA): name, scale, the file's fingerprint."""
    return [{"name": name, "scale": float(scale), "fingerprint": fingerprints.get(name, "")} for name, scale in pairs]


def resolve_row(row: ManifestRow, model: dict[str, Any], *, watermark: str | None,
                adapter_fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    """Fill a valid row's defaults from its model and add its `params_hash`.

    `model` holds the model's `fingerprint`, `width`, `height`, `steps` and `scheduler` defaults.
    The result is a plain dict: what travels to the actors and, less the prompt, into the ledger.
    """
    fingerprints = adapter_fingerprints or {}
    resolved = {
        "id": row.id,
        "prompt": row.prompt,
        "negative_prompt": row.negative_prompt,
        "seed": row.seed if row.seed is not None else default_seed(row.id),
        "steps": row.steps or model["steps"],
        "guidance_scale": float(row.guidance_scale),
        "width": row.width or model["width"],
        "height": row.height or model["height"],
        "scheduler": row.scheduler or model["scheduler"],
        "model": row.model,
        "model_fingerprint": model["fingerprint"],
        "adapters": adapter_entries(((a.name, a.scale) for a in row.adapters), fingerprints),
        "watermark": watermark,
    }
    resolved["params_hash"] = params_hash(resolved)
    return resolved


def is_guided(row: dict) -> bool:
    """Whether diffusers draws `row` with classifier-free guidance (the UNet runs on twice the rows)."""
    return float(row.get("guidance_scale") or 0) > 1


def group_key(resolved: dict[str, Any]) -> tuple:
    """Resolved rows with equal keys can share a forward pass (one denoising batch)."""
    adapters = tuple((a["name"], a["scale"]) for a in resolved["adapters"] or [])
    return (resolved["model"], adapters, resolved["width"], resolved["height"], resolved["steps"],
            resolved["scheduler"], resolved["guidance_scale"])
