"""`sdfleet eval`: how well a run's images follow their prompts, in the synthetic shapes world.

Every manifest row names what it asked for: `color`, `shape` and `background` columns, or a prompt in
the grammar `a {color} {shape} on a {background} background` (jobs.synthetic). Each image is scored
with plain image statistics, no model:

- background: the median colour of the image's border;
- object: the pixels far from that background colour;
- drawn or noise: a uniform border and an object of plausible size (noise has neither);
- colour: the palette colour nearest the object's median colour;
- shape: a star if the object is far from convex (area over convex hull area), else by its fill of its
  bounding box (square 1.0, circle 0.79, triangle 0.5), a diamond telling itself from a triangle by
  holding half its area in the box's top half; the object is the connected region at the
  mask's densest spot.

    sdfleet eval MANIFEST... --out RUN      -> prints the scores, writes RUN/eval.json
"""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from jobs.synthetic import ALL_SHAPES, BACKGROUNDS, HELD_OUT, PALETTE
from actors import opencv
from actors.png import image_parameters
from jobs.console import recorded_json
from jobs.errors import EvalError, one_line
from manifests.reader import Unreadable, count_ids, expand_manifest_paths, iter_rows
from manifests.schema import coerced_id, is_safe_id
from jobs.outputs import image_workers
from manifests.ledger import damaged_part, newest_statuses, not_a_part
from manifests.stores import UnreadableFile, url_to_fs

PROMPT = re.compile(r"^a (?P<color>\w+) (?P<shape>\w+) on a (?P<background>\w+) background$")
# Fill of the bounding box by each ideal shape (jobs.synthetic draws them exactly so).
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "star": 0.359}
OBJECT_DISTANCE = 60.0  # RGB distance from the background that makes a pixel part of the object
DIAMOND_TOP = 0.375  # share of the object in its box's top half: upright triangle 0.25, diamond 0.5
STAR_SOLIDITY = 0.75  # object area over its convex hull's: ideal star 0.53, every other shape ~1
BORDER = 6  # px of the image's edge that is taken as background


def intended(row: dict[str, Any]) -> dict[str, str] | None:
    """The colour, shape and background a row asked for (its columns, else its prompt), or None if it does not
    say or asks for something outside tiny's world (not a miss: not scored)."""
    if all(isinstance(row.get(k), str) for k in ("color", "shape", "background")):
        want = {k: row[k] for k in ("color", "shape", "background")}
    else:
        match = PROMPT.match(str(row.get("prompt") or "").strip())
        want = match.groupdict() if match else None
    if want and want["color"] in PALETTE and want["shape"] in ALL_SHAPES and want["background"] in BACKGROUNDS:
        return want
    return None


def contradicted(row: dict[str, Any], want: dict[str, str]) -> list[str]:
    """The intent columns whose value the row's own prompt contradicts (a prompt edited, its columns not): the
    image follows the prompt, so scoring it against the columns would count a right image as a miss."""
    match = PROMPT.match(str(row.get("prompt") or "").strip())
    if match is None:
        return []
    return [k for k, v in match.groupdict().items() if want[k] != v]


def analyse(rgb: np.ndarray) -> dict[str, Any]:
    """What one image shows: drawn or not, and its object's colour and shape (nearest in the palette)."""
    pixels = rgb.astype(np.float32)
    border = np.concatenate([pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3),
                             pixels[:, :BORDER].reshape(-1, 3), pixels[:, -BORDER:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    border_spread = float(np.linalg.norm(border - background, axis=1).mean())
    mask = np.linalg.norm(pixels - background, axis=2) > OBJECT_DISTANCE
    area = float(mask.mean())
    result: dict[str, Any] = {"background": _nearest(background, BACKGROUNDS), "object_area": round(area, 4),
                              "border_spread": round(border_spread, 2)}
    result["drawn"] = border_spread < 25.0 and 0.02 <= area <= 0.6
    if not mask.any():
        return {**result, "color": None, "shape": None, "fill": None}
    # the object is the connected region around the mask's densest spot: a generated image's stray
    # specks (at corners, say) would otherwise stretch the bounding box and read every shape as a star
    mask = main_region(mask)
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum() / box)
    solidity = float(mask.sum() / max(hull_area(mask), 1.0))
    color = np.median(pixels[mask], axis=0)
    # a star is the only concave shape; blur fills its notches (its box fill drifts towards a
    # triangle's), but what is left is still far from convex
    shape = "star" if solidity < STAR_SOLIDITY else min(("square", "circle", "triangle"), key=lambda s: abs(FILL[s] - fill))
    if shape == "triangle":  # or a diamond (same box fill): a diamond has half its area in its box's top half
        top = float(mask[ys.min():(ys.min() + ys.max() + 1) // 2].sum() / mask.sum())
        shape = "diamond" if top > DIAMOND_TOP else "triangle"
    return {**result, "color": _nearest(color, PALETTE), "fill": round(fill, 3), "solidity": round(solidity, 3),
            "shape": shape}


def hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of a mask's pixels (pixel corners), from each row's extreme pixels."""
    rows = np.nonzero(mask.any(axis=1))[0]
    left = mask[rows].argmax(axis=1)
    right = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    points = sorted({(float(x), float(y)) for y, a, b in zip(rows, left, right)
                     for x, y in ((a, y), (b + 1, y), (a, y + 1), (b + 1, y + 1))})
    if len(points) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    hull = []
    for sweep in (points, points[::-1]):  # Andrew's monotone chain: lower, then upper half
        half = []
        for p in sweep:
            while len(half) >= 2 and cross(half[-2], half[-1], p) <= 0:
                half.pop()
            half.append(p)
        hull += half[:-1]
    xs, ys = np.array([p[0] for p in hull]), np.array([p[1] for p in hull])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def main_region(mask: np.ndarray, window: int = 15) -> np.ndarray:
    """The 4-connected part of `mask` that holds its densest `window` x `window` spot."""
    padded = np.pad(mask.astype(np.int32), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    h, w = mask.shape
    k = min(window, h, w)
    density = padded[k:, k:] - padded[:-k, k:] - padded[k:, :-k] + padded[:-k, :-k]
    y, x = np.unravel_index(int(density.argmax()), density.shape)
    y, x = y + k // 2, x + k // 2
    if not mask[y, x]:  # the window's centre missed: take the window's first mask pixel
        ys, xs = np.nonzero(mask[y - k // 2:y - k // 2 + k, x - k // 2:x - k // 2 + k])
        y, x = y - k // 2 + ys[0], x - k // 2 + xs[0]
    # the 4-connected component holding (y, x), labelled by OpenCV in one pass: growing it one pixel step
    # per pass over the image took time that rose with the image side cubed (4 s for one 1024 px image)
    _, labels = opencv.load().connectedComponents(mask.astype(np.uint8), connectivity=4)
    return labels == labels[y, x]


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.linalg.norm(rgb - np.array(palette[name], dtype=np.float32))))


def evaluate(manifests: list[str], out: str) -> dict[str, Any]:
    """Score every row whose intent is known; returns (and writes to OUT/eval.json) the summary."""
    fs, root = url_to_fs(out)
    if not fs.isdir(f"{root}/images"):
        if fs.isfile(f"{root}/run.json"):  # a run that drew nothing (an empty manifest, every row invalid)
            raise EvalError(f"--out {out}: nothing to score, it has a run.json but no images/ (the run drew none, "
                            "or they were moved away)")
        raise EvalError(f"--out {out} has no images/ folder (give the --out of a `sdfleet generate` run)")
    rows, unscored, not_ok, skipped = [], 0, 0, Counter()  # skipped: images counted by `_look`'s reason
    shared, contradicting = 0, []  # (of the unscored) ids of several rows; rows whose columns and prompt disagree
    todo = []  # (id, intent, prompt) of each row whose image is to be looked at
    try:  # an image whose row failed or is invalid since is an older version's, whatever its prompt
        statuses = newest_statuses(fs, root)
    except UnreadableFile as exc:
        raise EvalError(f"--out {out}: " + (not_a_part(exc) or (damaged_part(exc) if exc.damaged else
                                             f"ledger part {exc.path} cannot be read ({one_line(exc.cause)})"))) \
            from exc
    uris = expand_manifest_paths(manifests)
    _, id_counts = count_ids(uris)  # rows sharing an id: generate draws none of them, so no image is theirs
    for _, _, row in iter_rows(uris):
        want = None if isinstance(row, Unreadable) else intended(row)  # a damaged row group: nothing to score
        row_id = None if want is None else coerced_id(row.get("id"))  # as generate reads it (binary ids too)
        if want is None or not isinstance(row_id, str) or not is_safe_id(row_id) or id_counts[row_id] > 1:
            unscored += 1  # an id generate refuses has no image of its own to score
            shared += want is not None and isinstance(row_id, str) and id_counts[row_id] > 1
            continue
        if wrong := contradicted(row, want):
            unscored += 1
            # (the columns the prompt contradicts, with their values; the prompt once)
            contradicting.append({"id": row_id, "prompt": row["prompt"], "columns": {k: want[k] for k in wrong}})
            continue
        if statuses.get(row_id, "ok") != "ok":  # (an id the ledger lacks: a killed run's image, judged by its prompt)
            not_ok += 1
            continue
        todo.append((row_id, want, row.get("prompt")))
    workers = image_workers(fs)
    with ThreadPoolExecutor(workers) as pool:  # on an object store each read is mostly a round trip
        # a block of reads at a time: all at once queued a million before the first (GBs), and a Ctrl-C waited on them
        for start in range(0, len(todo), 32 * workers):
            block = todo[start:start + 32 * workers]
            looks = pool.map(lambda job: _look(fs, f"{root}/images/{job[0]}.png", job[2]), block)
            for (row_id, want, _), seen in zip(block, looks):
                if isinstance(seen, str):  # why it is not scored
                    skipped[seen] += 1
                    continue
                rows.append({"id": row_id, **{f"want_{k}": v for k, v in want.items()}, **seen,
                             "held_out": (want["color"], want["shape"], want["background"]) in HELD_OUT})
    summary = {
        "scored": len(rows), "not_scored": unscored, "missing_images": skipped["missing"],
        "images_of_another_prompt": skipped["other"], "images_without_parameters": skipped["foreign"],
        "not_ok_in_ledger": not_ok, "shared_ids": shared,
        "columns_contradict_prompt": len(contradicting), "contradicting_rows": contradicting[:20],
        **_scores(rows),
        "held_out": _scores([r for r in rows if r["held_out"]]),
        "per_color": {c: _scores([r for r in rows if r["want_color"] == c]) for c in PALETTE
                      if any(r["want_color"] == c for r in rows)},
        "per_shape": {s: _scores([r for r in rows if r["want_shape"] == s]) for s in ALL_SHAPES
                      if any(r["want_shape"] == s for r in rows)},
        "chance": {"color": 1 / len(PALETTE), "shape": 1 / len(ALL_SHAPES), "background": 1 / len(BACKGROUNDS)},
        "confusion": {
            "color": _confusion(rows, "color"), "shape": _confusion(rows, "shape"),
        },
        "rows": rows,
    }
    if rows:
        try:
            with fs.open(f"{root}/eval.json", "w", encoding="utf-8") as f:
                f.write(recorded_json(summary))
        except Exception as exc:  # noqa: BLE001 - a read-only output: the scores are still said
            summary["not_written"] = f"{out}/eval.json cannot be written ({one_line(exc)})"
    return summary


def _look(fs, path: str, prompt: str | None) -> dict[str, Any] | str:
    """What the image at `path` shows (`analyse`), or why it is not scored: "missing" (not there, cut short, not
    an image), "foreign" (no parameters chunk: not generate's) or "other" (drawn for another prompt)."""
    try:
        with Image.open(io.BytesIO(fs.cat_file(path))) as im:
            drawn_for = image_parameters(im).get("prompt")
            if drawn_for is None:  # not generate's image (a sheet saved there, a copy that lost its text)
                return "foreign"
            if drawn_for != prompt:  # drawn for another version of the row (it is invalid or failed now)
                return "other"
            return analyse(np.asarray(im.convert("RGB")))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # not there, cut short, not an image
        return "missing"


def _scores(rows: list[dict]) -> dict[str, float | int | None]:
    n = len(rows)
    if not n:
        return {"n": 0, "drawn": None, "color": None, "shape": None, "background": None}
    return {"n": n, "drawn": sum(r["drawn"] for r in rows) / n,
            "color": sum(r["color"] == r["want_color"] for r in rows) / n,
            "shape": sum(r["shape"] == r["want_shape"] for r in rows) / n,
            "background": sum(r["background"] == r["want_background"] for r in rows) / n}


def _confusion(rows: list[dict], key: str) -> dict[str, dict[str, int]]:
    table: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        table[r[f"want_{key}"]][str(r[key])] += 1
    return {want: dict(seen) for want, seen in table.items()}


def report(summary: dict[str, Any]) -> str:
    """The scores as a small table."""
    def pct(x):
        return "   -" if x is None else f"{x:4.0%}"

    lines = [f"{summary['scored']} images scored ({summary['not_scored']} rows without a known intent, "
             f"{summary['missing_images']} without an image)",
             f"{'':<14}{'n':>5}{'drawn':>7}{'colour':>8}{'shape':>7}{'backgr.':>9}"]
    for label, s in [("all", summary), ("held-out", summary["held_out"]),
                     *[(c, v) for c, v in summary["per_color"].items()],
                     *[(k, v) for k, v in summary["per_shape"].items()]]:
        lines.append(f"{label:<14}{s['n']:>5}{pct(s['drawn']):>7}{pct(s['color']):>8}{pct(s['shape']):>7}"
                     f"{pct(s['background']):>9}")
    chance = summary["chance"]
    lines.append(f"chance: colour {chance['color']:.0%}, shape {chance['shape']:.0%}, background {chance['background']:.0%}")
    return "\n".join(lines)
