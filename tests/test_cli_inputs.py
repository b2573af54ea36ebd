"""Bad input to `dataset build`, `watermark verify` and `manifest expand`: one line that says what is wrong and what
would be valid, exit 1, no traceback; nothing the user has is overwritten; a bad file among many is reported and
the rest still checked. In this process (`jobs.cli.main`), which is what the CLI's own process runs."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from actors import watermark as wm
from jobs.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdfleet") and ": error: " in lines[0], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def noise(size: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 200 + 20).astype(np.uint8)


# -- dataset build ------------------------------------------------------------------------------------------

@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(noise(72, i)).save(folder / f"{i}.png")
    return folder


def build(capsys, images, *extra) -> tuple[int, str, str]:
    return run(capsys, "dataset", "build", images, "--resolution", "64", *extra)


@pytest.mark.parametrize("flags, said", [
    (["--resolution", "8"], "--resolution must be a multiple of 8 (the VAE downsamples 8x) in 64..2048, as the "
                            "generation sizes are; got 8"),  # finetune takes 64 and up: a dataset of 8 px was no use
    (["--resolution", "40000"], "--resolution must be a multiple of 8 (the VAE downsamples 8x) in 64..2048, as the "
                                "generation sizes are; got 40000"),  # a MemoryError traceback
    (["--resolution", "64", "--min-size", "-5"], "--min-size must be at least 1 px; got -5"),  # taken as it was
])
def test_dataset_build_refuses_sizes_out_of_range(capsys, tmp_path, images, flags, said):
    code, _, err = run(capsys, "dataset", "build", images, *flags, "-o", tmp_path / "data")
    assert code == 1 and err.strip() == f"sdfleet: error: {said}", err


def test_dataset_build_into_a_folder_inside_its_images_rebuilds_without_reading_its_own_parts(capsys, images):
    """The rebuild skipped its own part files as "not an image type" and exited 2."""
    for i in range(2):
        (images / f"{i}.txt").write_text("a mug")
    for _ in range(2):
        code, _, err = build(capsys, images, "-o", images / "dataset")
        assert code == 0 and "0 file(s) skipped" in err, err
        assert json.loads((images / "dataset" / "_dataset.json").read_text())["rows"] == 2


def test_a_build_into_another_folder_leaves_out_a_dataset_built_inside_the_images(capsys, tmp_path, images):
    """A dataset built inside IMAGES_DIR made every later build of that folder into another -o list its parts as
    "not an image type this reads" and exit 2."""
    for i in range(2):
        (images / f"{i}.txt").write_text("a mug")
    assert build(capsys, images, "-o", images / "sub" / "dataset")[0] == 0
    code, _, err = build(capsys, images, "-o", tmp_path / "other")
    assert code == 0 and "0 file(s) skipped" in err and "parquet" not in err, err
    assert "note: left out 1 `dataset build` output(s) inside IMAGES_DIR: sub/dataset" in err
    assert json.loads((tmp_path / "other" / "_dataset.json").read_text())["rows"] == 2
    (images / "_dataset.json").write_text("{}")  # IMAGES_DIR's own: its images are still its images
    code, _, err = build(capsys, images, "-o", tmp_path / "third")
    assert code == 0 and json.loads((tmp_path / "third" / "_dataset.json").read_text())["rows"] == 2, err


def test_a_file_name_with_a_newline_or_escape_code_cannot_forge_or_hide_lines(capsys, tmp_path, images):
    """dataset build and manifest validate printed names raw: `x\x1b[2J\nskipped FAKE.png` cleared the screen
    and added a forged line."""
    import pyarrow as pa

    for i in range(2):
        (images / f"{i}.txt").write_text("a mug")
    (images / "x\x1b[2J\nskipped FAKE.png").write_bytes((images / "0.png").read_bytes())  # no caption: skipped
    code, _, err = build(capsys, images, "-o", tmp_path / "data")
    assert code == 2 and "\x1b" not in err and "skipped x\\x1b[2J\\nskipped FAKE.png: no caption" in err, err
    assert not any(line.startswith("skipped FAKE") for line in err.splitlines())
    forged = tmp_path / "m\x1b[31m\nerror: forged.parquet"
    pq.write_table(pa.table({"id": ["e1"], "prompt": ["x"], "steps": [0]}), forged)
    code, out, _ = run(capsys, "manifest", "validate", forged)
    assert code == 1 and "\x1b" not in out and not any(line.startswith("error: forged") for line in out.splitlines())
    assert "m\\x1b[31m\\nerror: forged.parquet row 0 (`e1`): `steps` must be in 1..500, got 0" in out, out


@pytest.mark.parametrize("failing_write", [1, 2])  # the part, then the summary
def test_a_dataset_that_cannot_be_written_is_one_line_and_leaves_no_folder(capsys, tmp_path, images, monkeypatch,
                                                                           failing_write):
    """A read-only folder or a full disk ended `dataset build` with a traceback, and left an empty -o behind."""
    import jobs.dataset

    for i in range(2):
        (images / f"{i}.txt").write_text("a mug")
    real, calls = jobs.dataset.atomic_write, []

    def full_disk(fs, path, data):
        calls.append(path)
        if len(calls) == failing_write:  # as the real one fails: its folder made, the file not
            os.makedirs(os.path.dirname(path), exist_ok=True)
            raise OSError(28, "No space left on device")
        real(fs, path, data)

    monkeypatch.setattr(jobs.dataset, "atomic_write", full_disk)
    out = tmp_path / "new" / "datasets" / "data"  # three folders the build makes
    code, _, err = build(capsys, images, "-o", out)
    assert code == 1
    one_error_line(err, f"cannot write -o {out}: ", "No space left on device")
    assert not (tmp_path / "new").exists()


def test_dataset_build_refuses_an_out_that_is_a_file_and_leaves_it(capsys, tmp_path, images):
    for i in range(2):
        (images / f"{i}.txt").write_text("a mug")
    target = tmp_path / "afile"
    target.write_text("mine")
    code, out, err = build(capsys, images, "-o", target)
    assert code == 1 and not out
    one_error_line(err, f"-o {target}", "is a file", "folder")
    assert target.read_text() == "mine"


def test_dataset_build_refuses_an_empty_out(capsys, tmp_path, images, monkeypatch):
    for i in range(2):
        (images / f"{i}.txt").write_text("a mug")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = build(capsys, images, "-o", "")
    assert code == 1
    one_error_line(err, "-o is empty")
    assert list(work.iterdir()) == []


def test_dataset_build_refuses_a_folder_of_other_files_and_leaves_them(capsys, tmp_path, images):
    for i in range(2):
        (images / f"{i}.txt").write_text("a mug")
    target = tmp_path / "mine"
    target.mkdir()
    (target / "part-00000.parquet").write_bytes(b"someone else's part file")  # the name a build would take
    (target / "notes.txt").write_text("mine")
    code, out, err = build(capsys, images, "-o", target)
    assert code == 1 and not out
    one_error_line(err, f"-o {target}", "notes.txt, part-00000.parquet", "not a `dataset build` output")
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "part-00000.parquet"]
    assert (target / "part-00000.parquet").read_bytes() == b"someone else's part file"


def _parts(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("part-*.parquet"))


def test_a_rebuild_replaces_the_dataset_only_once_it_has_succeeded(capsys, tmp_path, images, monkeypatch):
    import jobs.dataset
    from manifests.dataset import read_dataset

    monkeypatch.setattr(jobs.dataset, "ROWS_PER_PART", 1)  # one part per image
    for i in range(2):
        (images / f"{i}.txt").write_text(f"a mug {i}")
    out = tmp_path / "data"
    code, _, err = build(capsys, images, "-o", out)
    assert code == 0, err
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    summary = json.loads(first["_dataset.json"])
    assert summary["parts"] == _parts(out) and len(summary["parts"]) == 2

    # a rebuild in which no image is usable (all too small) fails and leaves the dataset whole
    code, _, err = build(capsys, images, "-o", out, "--min-size", "512")
    assert code == 1 and "left as it was" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first

    # a rebuild stopped half way (Ctrl-C after one part was written) leaves it whole too, with nothing of its own
    real = jobs.dataset._prepare
    calls = []

    def stopped(name, *args):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(name, *args)

    (images / "0.txt").write_text("another caption")
    monkeypatch.setattr(jobs.dataset, "_prepare", stopped)
    monkeypatch.setattr(jobs.dataset.os, "cpu_count", lambda: 1)  # one image at a time: part 0 is written first
    code, _, err = build(capsys, images, "-o", out)
    assert code == 130 and len(calls) == 2, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    monkeypatch.setattr(jobs.dataset, "_prepare", real)

    # parts a killed build left (kill -9: no clean-up) are not read, and the next build removes them
    (out / "part-20261205T000000-abcdef-00000.parquet").write_bytes((out / summary["parts"][0]).read_bytes())
    assert read_dataset(str(out)).num_rows == 2

    # a rebuild from one image replaces both parts with its one
    (images / "0.txt").write_text("a mug 0")
    (images / "1.png").unlink()
    code, _, err = build(capsys, images, "-o", out)
    assert code == 0, err
    (part,) = _parts(out)
    assert sorted(p.name for p in out.iterdir()) == ["_dataset.json", part]
    assert json.loads((out / "_dataset.json").read_text())["parts"] == [part]
    assert read_dataset(str(out)).column("caption").to_pylist() == ["a mug 0"]


def test_a_dataset_built_before_parts_were_named_by_build_is_rebuilt_in_place(capsys, tmp_path, images):
    """Builds before 2026-12-05 wrote part-NNNNN.parquet; a rebuild replaces those too."""
    for i in range(2):
        (images / f"{i}.txt").write_text("a mug")
    out = tmp_path / "data"
    assert build(capsys, images, "-o", out)[0] == 0
    (part,) = _parts(out)
    (out / part).rename(out / "part-00000.parquet")
    summary = json.loads((out / "_dataset.json").read_text())
    (out / "_dataset.json").write_text(json.dumps({**summary, "parts": ["part-00000.parquet"]}))
    code, _, err = build(capsys, images, "-o", out)
    assert code == 0, err
    assert "part-00000.parquet" not in _parts(out) and len(_parts(out)) == 1


def test_a_first_build_killed_before_its_summary_can_be_run_again(capsys, tmp_path, images):
    for i in range(2):
        (images / f"{i}.txt").write_text("a mug")
    out = tmp_path / "data"
    out.mkdir()
    (out / "part-20261205T000000-abcdef-00000.parquet").write_bytes(b"half")  # what it left
    (out / ".part-20261205T000000-abcdef-00001.parquet.1a2b3c4d.tmp").write_bytes(b"half")
    code, _, err = build(capsys, images, "-o", out)
    assert code == 0, err
    assert len(_parts(out)) == 1 and not (out / "part-20261205T000000-abcdef-00000.parquet").exists()


def test_a_dataset_whose_summary_names_a_part_that_is_gone_is_said(tmp_path):
    from manifests.dataset import DatasetError, check_dataset

    out = tmp_path / "data"
    out.mkdir()
    (out / "_dataset.json").write_text(json.dumps({"parts": ["part-20261205T000000-abcdef-00000.parquet"]}))
    with pytest.raises(DatasetError, match=r"--data .*: _dataset.json names part-20261205T000000-abcdef-00000.parquet, "
                                           r"which is not there; build the dataset again"):
        check_dataset(str(out))


def test_dataset_build_says_a_captions_csv_that_is_not_utf8(capsys, tmp_path, images):
    captions = tmp_path / "latin1.csv"
    captions.write_bytes("file,caption\n0.png,un caf\xe9\n1.png,a mug\n".encode("latin-1"))
    code, _, err = build(capsys, images, "--captions", captions, "-o", tmp_path / "data")
    assert code == 1
    one_error_line(err, f"--captions {captions}", "UTF-8")
    assert not (tmp_path / "data").exists()


def test_dataset_build_reads_a_captions_csv_with_a_byte_order_mark(capsys, tmp_path, images):
    captions = tmp_path / "excel.csv"
    captions.write_bytes("file,caption\r\n0.png,un café\r\n1.png,a mug\r\n".encode("utf-8-sig"))
    code, out, err = build(capsys, images, "--captions", captions, "-o", tmp_path / "data")
    assert code == 0, err
    assert sorted(pq.read_table(tmp_path / "data").column("caption").to_pylist()) == ["a mug", "un café"]
    # the summary is one of sdfleet's own lines: on stderr, prefixed
    assert not out and err.strip().splitlines()[-1].startswith("[sdfleet] wrote 2 samples at 64 px"), err


def test_dataset_build_refuses_two_captions_for_one_file_and_names_captions_without_an_image(capsys, tmp_path,
                                                                                            images):
    captions = tmp_path / "captions.csv"
    captions.write_text("file,caption\n0.png,a mug\n1.png,a cup\n0.png,a jug\n")
    code, _, err = build(capsys, images, "--captions", captions, "-o", tmp_path / "data")
    assert code == 1
    one_error_line(err, f"--captions {captions} gives '0.png' two captions ('a mug' and 'a jug'); keep one")
    captions.write_text("file,caption\n0.png,a mug\n1.png,a cup\n0.png,a mug\n2.png,a jug\n")  # 2.png: moved
    code, _, err = build(capsys, images, "--captions", captions, "-o", tmp_path / "data")
    assert code == 0 and f"warning: 1 caption(s) in {captions} name no image in {images}: 2.png" in err, err


def test_dataset_build_matches_captions_spelled_with_dots_or_backslashes(capsys, tmp_path, images):
    """`./0.png` matched no image (its caption was said to name none, and the image was skipped uncaptioned)."""
    captions = tmp_path / "captions.csv"
    captions.write_text("file,caption\n./0.png,a mug\n.\\1.png,a cup\n")
    code, _, err = build(capsys, images, "--captions", captions, "-o", tmp_path / "data")
    assert code == 0 and "name no image" not in err, err
    assert sorted(pq.read_table(tmp_path / "data").column("caption").to_pylist()) == ["a cup", "a mug"]


def test_dataset_build_stores_each_image_as_it_is_seen_and_says_what_it_leaves_out(capsys, tmp_path):
    """A phone's portrait (stored sideways, EXIF orientation 6), a 16-bit grey scan, a PNG whose transparency is
    a colour key, a TIFF; captions with a byte-order mark or in UTF-16; a Latin-1 caption and an SVG are skipped
    with their reasons (the caption would be mojibake; an SVG was left out without a word)."""
    folder = tmp_path / "images"
    folder.mkdir()
    upright = np.zeros((96, 64, 3), np.uint8)
    upright[:48] = (220, 30, 30)  # red on top, green below, as the photo is seen
    upright[48:] = (30, 200, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(upright).rotate(90, expand=True).save(folder / "portrait.jpg", quality=95, exif=exif)
    Image.fromarray(np.full((72, 72), 32768, np.uint16)).save(folder / "grey16.png")
    # no scale to read these by: each was trained on as a black or near-black sample
    Image.fromarray(noise(72, 5)[..., 0].astype(np.int32), "I").save(folder / "int32.tif")
    Image.fromarray(noise(72, 6)[..., 0].astype(np.float32) / 255, "F").save(folder / "float.tif")
    keyed = np.zeros((72, 72, 3), np.uint8)
    keyed[:, :36] = (255, 0, 0)  # the key colour: transparent
    keyed[:, 36:] = (0, 0, 200)
    Image.fromarray(keyed).save(folder / "keyed.png", transparency=(255, 0, 0))
    Image.fromarray(noise(72, 3)).save(folder / "scan.tif")
    Image.fromarray(noise(72, 4)).save(folder / "latin.png")
    (folder / "logo.svg").write_text("<svg/>")
    (folder / "README.md").write_text("shots from the spring catalogue")
    for stem in ("portrait", "grey16", "keyed", "int32", "float"):
        (folder / f"{stem}.txt").write_bytes("a product, café".encode("utf-8-sig"))
    (folder / "scan.txt").write_bytes("a scan, café".encode("utf-16"))
    (folder / "latin.txt").write_bytes("un caf\xe9".encode("latin-1"))
    Image.fromarray(noise(72, 7)).save(folder / "bom.png")
    (folder / "bom.txt").write_bytes(b"\xff\xfe\xfa bad")  # a UTF-16 mark, then an odd number of bytes: a traceback
    (folder / "logo.txt").write_text("a logo")
    code, _, err = run(capsys, "dataset", "build", folder, "--resolution", "64", "-o", tmp_path / "data")
    assert code == 2, err  # written, with files skipped
    summary = json.loads((tmp_path / "data" / "_dataset.json").read_text())
    reasons = {s["file"]: s["reason"] for s in summary["skipped"]}
    assert reasons.keys() == {"latin.png", "bom.png", "logo.svg", "int32.tif", "float.tif"}, reasons
    assert reasons["int32.tif"].startswith("32-bit integer pixels from ") and "save it as 8- or 16-bit" in reasons["int32.tif"]
    assert reasons["float.tif"] == "a floating-point image: its brightness scale is not known; save it as 8- or 16-bit"
    assert reasons["latin.png"] == f"caption {folder}/latin.txt is not UTF-8 text (byte 6 is 0xe9); save it as UTF-8"
    assert reasons["bom.png"] == (f"caption {folder}/bom.txt starts with a UTF-16 byte-order mark but is not UTF-16 "
                                  "text (truncated data at byte 6); save it as UTF-8")
    assert reasons["logo.svg"].startswith("not an image type this reads (.png, ")
    rows = {r["file"]: r for r in pq.read_table(tmp_path / "data").to_pylist()}
    assert rows.keys() == {"portrait.jpg", "grey16.png", "keyed.png", "scan.tif"}
    assert {r["caption"] for r in rows.values()} == {"a product, café", "a scan, café"}
    seen = {name: np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")).astype(int) for name, r in rows.items()}
    portrait = seen["portrait.jpg"]  # upright: the centre square's top is red, its bottom green
    assert portrait[4, 32, 0] > 180 > portrait[4, 32, 1] and portrait[60, 32, 1] > 160 > portrait[60, 32, 0]
    assert np.abs(seen["grey16.png"] - 128).max() <= 1  # mid grey, not white
    assert (seen["keyed.png"][:, :30] == 255).all() and (seen["keyed.png"][:, 40:] == (0, 0, 200)).all()


# -- watermark verify ----------------------------------------------------------------------------------------

def save_png(path, rgb, recorded: str | None = None):
    info = PngImagePlugin.PngInfo()
    if recorded is not None:
        info.add_itxt("parameters", json.dumps({"watermark": recorded}))
    Image.fromarray(rgb).save(path, pnginfo=info)
    return path


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("marks")
    image = noise(256)
    paths = {
        "a": save_png(folder / "a.png", wm.embed(image, "sdfleet")),
        "b": save_png(folder / "b.png", wm.embed(noise(256, 1), "sdfleet")),
        "plain": save_png(folder / "plain.png", image),
        "acme": save_png(folder / "acme.png", wm.embed(image, "acme-2026")),  # no recorded payload: read blind
        "acme-recorded": save_png(folder / "acme-recorded.png", wm.embed(image, "acme-2026"), recorded="acme-2026"),
        "small": save_png(folder / "small.png", noise(64)),
        "thin": save_png(folder / "thin.png", wm.embed(noise(1024)[:, :64], "sdfleet")),  # 64 wide, 1024 tall
        # what the file claims is not believed where a flat unmarked image would read as carrying it
        "claims-zeros": save_png(folder / "claims-zeros.png", np.full((256, 256, 3), 255, np.uint8), recorded="\0" * 4),
        "colons": save_png(folder / "shot::1.png", wm.embed(image, "sdfleet")),  # fsspec reads `::` as a URL chain
        "deep": folder / "deep.png",
        "pipe": folder / "pipe.png",
        "folder": folder / "a-folder",
        "text": folder / "notes.png",
        "truncated": folder / "truncated.jpg",
        "missing": folder / "missing.png",
    }
    paths["folder"].mkdir()
    paths["text"].write_text("not an image")
    deep = PngImagePlugin.PngInfo()
    deep.add_itxt("parameters", "[" * 100_000)  # nested past Python's recursion limit
    Image.fromarray(wm.embed(image, "sdfleet")).save(paths["deep"], pnginfo=deep)
    os.mkfifo(paths["pipe"])  # reading it would wait for a writer forever
    buf = io.BytesIO()
    Image.fromarray(wm.embed(image, "sdfleet")).save(buf, format="JPEG", quality=95)
    paths["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return paths


def lines_by_file(out: str) -> dict[str, str]:
    lines = {}
    for line in out.strip().splitlines():
        status, rest = line.split("  ", 1)
        lines[rest.split(": ", 1)[0]] = f"{status}: {rest.split(': ', 1)[1]}"
    return lines


def test_verify_reports_each_bad_file_on_its_line_and_checks_the_rest(capsys, marked):
    order = ["a", "missing", "text", "truncated", "small", "folder", "pipe", "deep", "plain", "thin", "claims-zeros",
             "colons", "b"]
    code, out, err = run(capsys, "watermark", "verify", *(marked[k] for k in order))
    assert code == 1 and "Traceback" not in err
    got = lines_by_file(out)
    assert list(got) == [str(marked[k]) for k in order]  # every file, in order, the one after the bad ones too
    status = {k: got[str(marked[k])] for k in order}
    for name in ("a", "b", "thin", "colons", "deep"):
        assert status[name].startswith("ok: read 'sdfleet', expected 'sdfleet', 100% of bits match"), (name, status)
    assert status["plain"].startswith("MISSING:") and status["claims-zeros"].startswith("MISSING:")
    assert status["pipe"] == "ERROR: is not a regular file (a pipe, socket or device)"
    assert status["missing"] == "ERROR: does not exist"
    assert status["text"].startswith("ERROR: is not an image")
    assert status["truncated"].startswith("ERROR: is a corrupt image")
    assert status["small"] == "ERROR: 64x64 is too small to carry the watermark (it needs at least 65,536 pixels, as " \
        "256x256 has), so it has none"
    assert status["folder"].startswith("ERROR: is a folder")
    code, out, _ = run(capsys, "watermark", "verify", marked["a"], marked["b"])  # all marked: exit 0
    assert code == 0 and out.count("ok  ") == 2
    # a glob no shell expanded (quoted; an object store's) is what it matches, as a manifest argument is
    folder = marked["a"].parent
    code, out, _ = run(capsys, "watermark", "verify", f"{folder}/[ab].png", f"{folder}/*.webp")
    assert lines_by_file(out) == {str(marked["a"]): lines_by_file(out)[str(marked["a"])],
                                  str(marked["b"]): lines_by_file(out)[str(marked["b"])],
                                  f"{folder}/*.webp": "ERROR: no file matches this glob"}, out
    assert code == 1 and out.count("ok  ") == 2


def test_verify_shows_payload_bytes_that_are_no_text_as_bytes(capsys, marked, monkeypatch):
    """An unmarked image reads noise: its bytes were shown as U+FFFD beside \\x1a escapes, garbling logs."""
    from actors import watermark as wm

    monkeypatch.setattr(wm, "read", lambda rgb, payload: (b"h8\xd4?\x1a", 0.5))
    code, out, _ = run(capsys, "watermark", "verify", marked["plain"])
    assert code == 1 and "read b'h8\\xd4?\\x1a', expected 'sdfleet'" in out and "\ufffd" not in out, out


def test_verify_shows_a_name_with_a_newline_or_escape_code_on_its_own_line(capsys, marked, tmp_path):
    """A file named `x\nok  forged.png: ...` printed raw added a forged `ok` line to what a script reads."""
    forged = tmp_path / "plain.png\nok  forged.png: read 'sdfleet', expected 'sdfleet', 100% of bits match"
    forged.write_bytes(marked["plain"].read_bytes())
    separated = tmp_path / "sep.png\u2028ok  forged.png: read 'sdfleet'"  # a line separator splits lines too
    separated.write_bytes(marked["plain"].read_bytes())
    tinted = tmp_path / "\x1b[2Kcaf\u00e9.png"  # an escape code that would erase what the terminal shows
    tinted.write_bytes(marked["plain"].read_bytes())
    code, out, _ = run(capsys, "watermark", "verify", forged, tinted, separated)
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("MISSING  ") for line in lines), lines
    assert lines[0].startswith(f"MISSING  {tmp_path}/plain.png\\nok  forged.png: read") and "\x1b" not in out
    assert lines[1].startswith(f"MISSING  {tmp_path}/\\x1b[2Kcaf\u00e9.png: ")  # the accent as it is, as everywhere


@pytest.mark.parametrize("name", ["acme", "acme-recorded"])
def test_verify_tells_another_payload_from_no_mark(capsys, marked, name):
    code, out, _ = run(capsys, "watermark", "verify", marked[name], marked["plain"], "--payload", "sdfleet")
    assert code == 1
    got = lines_by_file(out)
    assert got[str(marked[name])].startswith("OTHER: other payload 'acme-2026', expected 'sdfleet'"), out
    assert got[str(marked["plain"])].startswith("MISSING:"), out


def test_verify_tells_another_payload_whose_blocks_agree_less_than_a_clean_copys(capsys, tmp_path):
    """A busy image marked by invisible-watermark itself read its payload back whole, yet verify said MISSING:
    its blocks' votes agree on each bit by a clear majority but well short of unanimously (0.6; a JPEG copy of an
    sdfleet image, 0.9), which the payload guess took for no mark."""
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", b"acme-co")
    busy = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(encoder.encode(busy[:, :, ::-1].copy(), "dwtDctSvd")[:, :, ::-1]).save(tmp_path / "other.png")
    Image.fromarray(busy).save(tmp_path / "plain.png")
    code, out, _ = run(capsys, "watermark", "verify", tmp_path / "other.png", tmp_path / "plain.png")
    got = lines_by_file(out)
    assert code == 1 and got[str(tmp_path / "other.png")].startswith("OTHER: other payload 'acme-co', expected "
                                                                      "'sdfleet'"), out
    assert got[str(tmp_path / "plain.png")].startswith("MISSING:"), out


def test_verify_refuses_an_empty_payload(capsys, marked, tmp_path):
    code, out, err = run(capsys, "watermark", "verify", marked["a"], "--payload", "")
    assert code == 1 and not out
    one_error_line(err, "sdfleet watermark verify: error: --payload is empty")
    for payload, why in (("x", "is 1 byte(s) of UTF-8; a watermark payload is 4 to 32 bytes"),
                         ("\0" * 4, "is nearly all zero (or all one) bits"),
                         (" " * 4, "is only white space; choose text")):
        code, out, err = run(capsys, "watermark", "verify", marked["a"], "--payload", payload)
        assert code == 1 and not out
        one_error_line(err, f"sdfleet watermark verify: error: --payload {payload!r} {why}")
    # generate refuses what verify refuses: marked with spaces, an image could be checked only while its PNG's
    # text said so
    code, _, err = run(capsys, "generate", marked["a"], "--out", tmp_path / "out", "--watermark", " " * 4)
    one_error_line(err, "sdfleet generate: error: --watermark '    ' is only white space; choose text")
    # an image marked so before is still checked against the payload its PNG records
    save_png(tmp_path / "blank.png", wm.embed(noise(256, 3), " " * 4), recorded=" " * 4)
    code, out, _ = run(capsys, "watermark", "verify", tmp_path / "blank.png")
    assert code == 0 and out.startswith("ok  ") and "expected '    ', 100% of bits match" in out, out


def test_verify_does_not_read_an_image_past_pillows_bomb_warning(capsys, tmp_path, monkeypatch):
    """An image over Pillow's 89M-pixel warning took 40 s and 3 GB, and the warning reached the terminal."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256 * 256 - 1)  # (the warning comes past it, the error past 2x)
    Image.new("RGB", (256, 256), (200, 100, 50)).save(tmp_path / "big.png")
    code, out, err = run(capsys, "watermark", "verify", tmp_path / "big.png")
    assert code == 1 and "ERROR  " in out and "is not checked: Image size (65536 pixels) exceeds limit" in out, out
    assert "DecompressionBombWarning" not in err, err


def test_the_longest_payload_fits_the_fewest_pixels_a_mark_takes():
    payload = "© Acme catalogue 2026-12 v1.0.0"
    assert len(payload.encode()) == 32
    for shape in ((256, 256), (64, 1024), (1024, 64), (128, 512)):
        rgb = noise(1024)[:shape[0], :shape[1]]
        marked, share, _ = wm.embed_checked(rgb, payload)
        assert share == 1.0 and wm.read_bits(marked, 32) == payload.encode(), shape  # the library's decoder
    with pytest.raises(wm.WatermarkError, match="128x256 is too small"):
        wm.embed(noise(256)[:256, :128], "sdfleet")


# -- manifest expand -----------------------------------------------------------------------------------------

@pytest.fixture
def products(tmp_path):
    path = tmp_path / "products.csv"
    path.write_text("sku,product\nmug-001,a red mug\nvase-002,a blue vase\n", encoding="utf-8")
    return path


def expand(capsys, products, out, *extra, template="a photo of {product}"):
    return run(capsys, "manifest", "expand", "--template", template, "--products", products, "-o", out, *extra)


@pytest.mark.parametrize("template, needles", [
    ("a {product} {", ["'a {product} {'", "{{"]),
    ("a {product} }", ["'a {product} }'", "}}"]),
    ("a {product!r}", ["{product!r}", "write it as {product}"]),
    ("a {product:>20}", ["{product:>20}", "write it as {product}"]),
])
def test_expand_refuses_a_bad_template(capsys, tmp_path, products, template, needles):
    out = tmp_path / "m.parquet"
    code, stdout, err = expand(capsys, products, out, template=template)
    assert code == 1 and not stdout
    one_error_line(err, "--template", *needles)
    assert not out.exists()
    code, _, err = expand(capsys, products, out, template="{{logo}} {product}")  # as the message says
    assert code == 0, err
    assert pq.read_table(out).column("prompt").to_pylist() == ["{logo} a red mug", "{logo} a blue vase"]


@pytest.mark.parametrize("flags, needles", [
    (["--steps", "0"], ["--steps must be in 1..500, got 0"]),
    (["--scheduler", "bogus"], ["--scheduler should be 'ddim'", "got 'bogus'"]),
    (["--width", "65", "--guidance-scale", "-1"], ["--width must be a multiple of 8", "--guidance-scale must be"]),
])
def test_expand_checks_fixed_values_before_writing(capsys, tmp_path, products, flags, needles):
    out = tmp_path / "m.parquet"
    code, _, err = expand(capsys, products, out, *flags)
    assert code == 1
    one_error_line(err, *needles)
    assert not out.exists()


def test_expand_refuses_an_out_that_is_not_parquet(capsys, tmp_path, products):
    out = tmp_path / "m.csv"
    code, _, err = expand(capsys, products, out)
    assert code == 1
    one_error_line(err, str(out), ".parquet")
    assert not out.exists()


def test_expand_keeps_an_existing_out_unless_forced(capsys, tmp_path, products):
    out = tmp_path / "m.parquet"
    out.write_bytes(b"my manifest")
    code, _, err = expand(capsys, products, out)
    assert code == 1
    one_error_line(err, str(out), "already exists", "--force")
    assert out.read_bytes() == b"my manifest"
    code, stdout, err = expand(capsys, products, out, "--force")
    assert code == 0, err
    assert pq.read_table(out).num_rows == 2
    assert main(["manifest", "expand", "--help"]) == 0
    assert "--force" in capsys.readouterr().out


def test_verify_of_images_on_a_store_reads_several_at_once_and_says_each_in_order(capsys, marked):
    """On an object store each read is mostly waiting: they are read several at a time, the lines still in the
    order of the images (a store's glob: sorted)."""
    import fsspec

    store = fsspec.filesystem("memory")
    names = {"1-a": "a", "2-plain": "plain", "3-text": "text", "4-b": "b"}
    for name, kind in names.items():
        store.pipe(f"/verify-threads/{name}.png", marked[kind].read_bytes())
    try:
        code, out, err = run(capsys, "watermark", "verify", "memory://verify-threads/*.png")
    finally:
        store.rm("/verify-threads", recursive=True)
    assert code == 1 and "Traceback" not in err, err
    got = lines_by_file(out)
    assert list(got) == [f"memory:///verify-threads/{name}.png" for name in names], got
    statuses = [line.split(":", 1)[0] for line in got.values()]
    assert statuses == ["ok", "MISSING", "ERROR", "ok"], got
