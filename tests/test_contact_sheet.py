"""Contact sheets: what the docs' pictures are made with."""

import pytest
from PIL import Image

from benchmarks.contact_sheet import comparison_sheet, contact_sheet


def _run(root, colours: dict[str, tuple]):
    (root / "images").mkdir(parents=True)
    for row_id, colour in colours.items():
        Image.new("RGB", (64, 64), colour).save(root / "images" / f"{row_id}.png")
    return str(root)


def test_contact_sheet_lays_a_runs_images_out_in_id_order(tmp_path):
    run = _run(tmp_path / "run", {"b": (0, 0, 255), "a": (255, 0, 0), "c": (0, 255, 0)})
    sheet = contact_sheet(run, columns=2, thumb=32, label=10)
    assert sheet.size == (64, 2 * 42)
    assert sheet.getpixel((16, 16)) == (255, 0, 0)  # a, b in the first row; c below a
    assert sheet.getpixel((48, 16)) == (0, 0, 255)
    assert sheet.getpixel((16, 42 + 16)) == (0, 255, 0)


def test_comparison_sheet_puts_the_same_rows_of_each_run_one_run_to_a_row(tmp_path):
    before = _run(tmp_path / "before", {"concept-000": (255, 0, 0), "concept-001": (0, 255, 0)})
    after = _run(tmp_path / "after", {"concept-000": (0, 0, 255), "concept-001": (255, 255, 0)})
    sheet = comparison_sheet({"base": before, "+ x": after}, ["concept-001", "concept-000"], thumb=32, label=40)
    assert sheet.size == (40 + 2 * 32, 2 * 32)
    assert sheet.getpixel((40 + 16, 16)) == (0, 255, 0)  # columns in the order asked, runs in rows
    assert sheet.getpixel((40 + 48, 16)) == (255, 0, 0)
    assert sheet.getpixel((40 + 16, 48)) == (255, 255, 0)
    assert sheet.getpixel((40 + 48, 48)) == (0, 0, 255)
    with pytest.raises(SystemExit, match="no image for row 'concept-002'"):
        comparison_sheet({"base": before}, ["concept-002"])
