"""Adapters through `sdfleet generate` on local Ray: mixed rows, bad adapters, swap counts, incremental."""

from __future__ import annotations

import collections
import pickle

import pytest
from safetensors.torch import save

from actors.presets import build_preset
from helpers import FAST, assert_same_pixels, ledger, pixels, run_summary, sdfleet, write_manifest
from helpers import UNET_TARGETS, diffusers_file, make_lora, to_kohya

PROMPT = "a red mug on a white background"
# Big enough to change the image clearly, small enough that batch-size float noise stays noise: with the
# unit tests' 0.5, a random LoRA makes the tiny UNet chaotic and 1/255 differences spread.
STD = 0.15


def row(row_id: str, adapters=(), seed: int = 7) -> dict:
    return {"id": row_id, "prompt": PROMPT, "seed": seed, **FAST,
            "adapters": [{"name": n, "scale": float(s)} for n, s in adapters]}


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("adapters")
    tiny = build_preset("tiny")
    a = make_lora(tiny.unet, UNET_TARGETS, seed=1, std=STD)
    store = base / "store"
    store.mkdir()
    (store / "A.safetensors").write_bytes(diffusers_file(base, a))
    (store / "A_kohya.safetensors").write_bytes(save(to_kohya(a)))
    (store / "B").mkdir()
    (store / "B" / "pytorch_lora_weights.safetensors").write_bytes(
        diffusers_file(base, make_lora(tiny.unet, UNET_TARGETS, seed=2, std=STD)))
    (store / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    marker = base / "unpickled"
    (store / "evil.ckpt").write_bytes(pickle.dumps(_Marker(str(marker))))
    (store / "other_model.safetensors").write_bytes(
        diffusers_file(base, make_lora(tiny.unet, UNET_TARGETS, seed=3, in_features={"to_k": 96, "to_v": 96})))

    records = [
        row("base"), row("zero", [("A", 0.0)]),
        row("a1", [("A", 1.0)]), row("kohya", [("A_kohya", 1.0)]),
        row("b1", [("B", 1.0)]), row("blend", [("A", 1.0), ("B", 1.0)]),
        row("a2", [("A", 1.0)]), row("none2"), row("a3", [("A", 1.0)]),
        row("unknown", [("nope", 1.0)]), row("corrupt", [("corrupt", 1.0)]),
        row("pickle", [("evil", 1.0)]), row("shapes", [("other_model", 1.0)]),
    ]
    manifest = write_manifest(base / "m.parquet", records)
    out = base / "out"
    proc = sdfleet("generate", str(manifest), "--out", str(out), "--adapters", str(store),
                   "--actors", "2", "--batch-size", "2", "--no-watermark")
    return {"base": base, "store": store, "manifest": manifest, "out": out, "proc": proc, "marker": marker,
            "records": records}


class _Marker:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_adapters_fail_only_their_rows(adapter_run):
    proc, out = adapter_run["proc"], adapter_run["out"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    by_id = {e["id"]: e for e in ledger(out)}
    assert len(by_id) == len(adapter_run["records"])
    expected_failures = {"unknown": "nope", "corrupt": "corrupt", "pickle": "evil", "shapes": "other_model"}
    for row_id, adapter in expected_failures.items():
        entry = by_id[row_id]
        assert entry["status"] == "failed", entry
        assert f"'{adapter}'" in entry["error"], entry["error"]
    assert "pickle" in by_id["pickle"]["error"] or ".ckpt" in by_id["pickle"]["error"]
    assert not adapter_run["marker"].exists(), "a pickle file was unpickled"
    ok = {i for i, e in by_id.items() if e["status"] == "ok"}
    assert ok == {r["id"] for r in adapter_run["records"]} - set(expected_failures)


def test_adapters_change_pixels_exactly_as_they_should(adapter_run):
    img = {r: pixels(adapter_run["out"] / "images" / f"{r}.png") for r in
           ("base", "zero", "a1", "a2", "a3", "kohya", "b1", "blend", "none2")}
    assert_same_pixels(img["zero"], img["base"], "scale 0 is the base model")
    assert_same_pixels(img["none2"], img["base"], "no adapters after adapters is the base model")
    assert_same_pixels(img["kohya"], img["a1"], "kohya and diffusers formats of one LoRA")
    assert_same_pixels(img["a2"], img["a1"], "A again, after B and a blend")
    assert_same_pixels(img["a3"], img["a1"], "A again, after none")
    for name in ("a1", "b1", "blend"):
        assert abs(img[name] - img["base"]).mean() > 2, f"{name} should change the image"
    assert abs(img["blend"] - img["a1"]).mean() > 2 and abs(img["blend"] - img["b1"]).mean() > 2


def test_run_json_counts_adapter_swaps_per_actor(adapter_run):
    swaps = run_summary(adapter_run["out"])["adapter_swaps"]
    assert swaps["total"] == sum(swaps["per_actor"].values()) > 0
    assert swaps["seconds"] >= 0
    assert f"{swaps['total']} adapter swaps in " in adapter_run["proc"].stderr  # said in the summary, not only here
    from jobs.outputs import summary_problem  # the report reads what generate writes, as it writes it

    assert summary_problem(run_summary(adapter_run["out"])) is None
    actors = collections.Counter(e["actor"] for e in ledger(adapter_run["out"]) if e["status"] == "ok")
    assert set(swaps["per_actor"]) <= set(actors)
    # which version of each adapter drew the rows: the ledger names them, run.json holds their fingerprints
    from actors.adapters import AdapterStore

    store = AdapterStore(str(adapter_run["store"]))
    recorded = run_summary(adapter_run["out"])["adapters"]
    assert {n: recorded[n] for n in ("A", "A_kohya", "B")} == {n: store.describe(n).fingerprint
                                                               for n in ("A", "A_kohya", "B")}
    assert not {"nope", "corrupt", "evil"} & recorded.keys()  # unusable: their rows failed, naming why


def test_replacing_an_adapter_file_redraws_only_its_rows(adapter_run, tmp_path):
    import shutil

    out, store = tmp_path / "out", tmp_path / "store"
    shutil.copytree(adapter_run["out"], out)
    shutil.copytree(adapter_run["store"], store)  # the module's store stays as its run drew with it
    tiny = build_preset("tiny")
    (store / "B" / "pytorch_lora_weights.safetensors").write_bytes(
        diffusers_file(tmp_path, make_lora(tiny.unet, UNET_TARGETS, seed=22, std=STD)))
    before = len(ledger(out))
    proc = sdfleet("generate", str(adapter_run["manifest"]), "--out", str(out), "--adapters",
                   str(store), "--no-watermark", "--rows-may-fail")
    # the bad-adapter rows still fail; --rows-may-fail (what the RayJobs pass) turns only the exit code to 0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows failed" in proc.stderr and "--rows-may-fail" in proc.stderr
    redrawn = sorted(e["id"] for e in ledger(out)[before:] if e["status"] == "ok")
    assert redrawn == ["b1", "blend"]
    assert run_summary(out)["adapters"]["B"] != run_summary(adapter_run["out"])["adapters"]["B"]
    assert run_summary(out)["failed"] > 0 and any(e["status"] == "failed" for e in ledger(out)[before:])


def test_rows_failed_by_a_cut_short_adapter_are_restored_not_redrawn_once_it_is_put_back(adapter_run, tmp_path):
    """A night whose adapter upload was cut short fails that adapter's rows; once the file is back, the next night
    records their earlier images as theirs again ("restored", read from the ledger, nothing drawn) rather than
    skipping them as done and leaving them `failed` in the ledger for good."""
    import shutil

    out, store = tmp_path / "out", tmp_path / "store"
    shutil.copytree(adapter_run["out"], out)
    shutil.copytree(adapter_run["store"], store)
    whole = (store / "A.safetensors").read_bytes()
    (store / "A.safetensors").write_bytes(whole[: len(whole) // 2])
    flags = ("--out", str(out), "--adapters", str(store), "--actors", "2", "--batch-size", "2", "--no-watermark",
             "--rows-may-fail")
    before = len(ledger(out))
    cut = sdfleet("generate", str(adapter_run["manifest"]), *flags)
    a_rows = {"a1", "a2", "a3", "blend"}  # "zero" names A at scale 0, which loads nothing
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert {e["id"] for e in ledger(out)[before:] if "'A'" in (e["error"] or "")} == a_rows
    (store / "A.safetensors").write_bytes(whole)
    before = len(ledger(out))
    back = sdfleet("generate", str(adapter_run["manifest"]), *flags)
    assert back.returncode == 0, back.stderr[-3000:]
    summary = run_summary(out)
    assert (summary["ok"], summary["restored"], summary["recovered"], summary["images_per_actor"]) == (4, 4, 0, {})
    assert "0 drawn, 4 restored" in back.stderr
    new = ledger(out)[before:]
    assert sorted(e["id"] for e in new if e["status"] == "ok") == sorted(a_rows)
    assert all(e["warning"].startswith("restored:") for e in new if e["status"] == "ok")
