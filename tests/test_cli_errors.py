"""What the CLI says when the input is wrong: one line on standard error that names the problem, no usage
block and no traceback, and exit 1 (the run could not start) rather than 2, which means "the run finished
with failed rows" to the scripts and job schedulers that read it.

Most cases run `jobs.cli.main` in this process (they stop before Ray or a model is touched); hdfs:// runs in
a subprocess, since pyarrow loads a JVM for it if the machine has one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from helpers import REPO, rows, sdfleet, write_manifest
from jobs.cli import main
from test_report import make_output


def run(capsys, *argv) -> tuple[int, str, str]:
    """`sdfleet ARGV` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["generate", "m.parquet", "--out", "o", "--actors", "1.5"],
     "sdfleet generate: error: argument --actors: invalid int value: '1.5' (see sdfleet generate --help)"),
    (["generate", "m.parquet", "--out", "o", "--batch-size", "foo"],
     "sdfleet generate: error: argument --batch-size: invalid int or auto value: 'foo' (see sdfleet generate --help)"),
    (["generate", "m.parquet", "--out", "o", "--batch-size", "0"],  # was pydantic's line for each member of the union
     "sdfleet generate: error: --batch-size: must be a whole number in 1..256, or auto; got 0"),
    (["generate", "m.parquet"],
     "sdfleet generate: error: the following arguments are required: --out (see sdfleet generate --help)"),
    (["generate", "m.parquet", "--out", "o", "--bogus"],
     "sdfleet generate: error: unrecognized arguments: --bogus (see sdfleet generate --help)"),
    (["manifest", "validate", "m.parquet", "--bogus"],
     "sdfleet manifest validate: error: unrecognized arguments: --bogus (see sdfleet manifest validate --help)"),
    (["sheet", "out"],
     "sdfleet sheet: error: the following arguments are required: -o/--output (see sdfleet sheet --help)"),
    (["watermark"],  # (was "required: watermark_command", a name only the code knows)
     "sdfleet watermark: error: the following arguments are required: COMMAND (see sdfleet watermark --help)"),
    (["generate", "m.parquet", "--out", "o", "--backend", "onnx", "--compile-mode", "max-autotune"],  # was ignored
     "sdfleet generate: error: --compile-mode max-autotune is for --backend compile (torch.compile's mode); got "
     "--backend onnx: give --backend compile, or leave --compile-mode out"),
])
def test_a_flag_error_is_one_line_naming_the_subcommand_and_exits_1(capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert one_error_line(err) == expected


def test_an_unknown_subcommand_is_one_line_listing_the_commands(capsys):
    code, _, err = run(capsys, "bogus")
    assert code == 1
    line = one_error_line(err)
    assert line.startswith("sdfleet: error: argument COMMAND: invalid choice: 'bogus' (choose from 'generate',")
    assert line.endswith("(see sdfleet --help)")


def test_help_still_prints_every_flag_and_exits_0(capsys):
    code, out, err = run(capsys, "generate", "--help")
    assert code == 0 and err == ""
    assert out.startswith("usage: sdfleet generate") and "--batch-size" in out and "--actors" in out


@pytest.mark.parametrize("argv, package", [
    (["generate", "{m}", "--out", "gs://bucket/x"], "gcsfs"),
    (["generate", "{m}", "--out", "gcs://bucket/x"], "gcsfs"),
    (["generate", "{m}", "--out", "az://container/x"], "adlfs"),
    (["generate", "{m}", "--out", "abfs://container/x"], "adlfs"),
    (["generate", "gs://bucket/m.parquet", "--out", "{out}"], "gcsfs"),
    (["generate", "{m}", "--out", "{out}", "--backend-cache", "gs://bucket/c"], "gcsfs"),  # (Ray was started)
    (["generate", "{m}", "--out", "{out}", "--model", "default=gs://bucket/m"], "gcsfs"),
    (["finetune", "lora", "--data", "{out}", "--base", "tiny", "--out", "az://container/x"], "adlfs"),
    (["manifest", "validate", "gs://bucket/m.parquet"], "gcsfs"),
    (["report", "gs://bucket/x"], "gcsfs"),
])
def test_a_store_whose_package_is_not_installed_is_one_line_naming_it(capsys, tmp_path, monkeypatch, argv, package):
    import jobs.generate
    from fsspec.registry import _registry, known_implementations

    monkeypatch.setattr(jobs.generate, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    # the package as if it were not installed (the test extra installs gcsfs): its import fails, and fsspec
    # forgets any class of it an earlier test loaded
    monkeypatch.setitem(sys.modules, package, None)
    for protocol in list(_registry):
        if known_implementations.get(protocol, {}).get("class", "").startswith(f"{package}."):
            monkeypatch.delitem(_registry, protocol)
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    code, _, err = run(capsys, *(a.format(m=manifest, out=tmp_path / "out") for a in argv))
    assert code == 1
    line = one_error_line(err)
    scheme = "gs://" if package == "gcsfs" else "az://"
    assert re.match(r"sdfleet( \w+)?: error: ", line) and scheme in line and f"install {package}" in line.lower()
    flag = next((a for a in argv if a.startswith("--") and a not in ("--data", "--base")), None)
    if flag and "://" in argv[argv.index(flag) + 1]:  # a flag's store: refused naming the flag, before any read
        assert f"error: {flag} " in line, line


def test_opencv_without_its_system_libraries_is_one_line_saying_what_to_install(tmp_path):
    """opencv-python is the desktop build: on a host without libGL (a slim container, Ray's image) `import cv2`
    failed with the loader's bare message, as a traceback from `watermark verify` and `eval`, and on every image
    of a run. A cv2 that raises the loader's error stands in for such a host."""
    fake = tmp_path / "fake" / "cv2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise ImportError("libGL.so.1: cannot open shared object file: No such file or directory")\n')
    image = tmp_path / "a.png"
    Image.new("RGB", (256, 256), "white").save(image)
    done = sdfleet("watermark", "verify", str(image), env={"PYTHONPATH": f"{fake.parent}:{REPO}"})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    line = one_error_line(done.stderr)
    assert line.startswith("sdfleet: error: OpenCV cannot load (libGL.so.1: cannot open shared object file"), line
    assert "apt-get install libgl1 libglib2.0-0" in line
    # generate on a local Ray (whose workers are this machine's) says so before Ray starts or anything is written
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    done = sdfleet("generate", str(manifest), "--out", str(tmp_path / "out"),
                   env={"PYTHONPATH": f"{fake.parent}:{REPO}"})
    assert done.returncode == 1 and "ray:" not in done.stderr and not (tmp_path / "out").exists(), done.stderr[-2000:]
    assert one_error_line(done.stderr).startswith("sdfleet: error: OpenCV cannot load (libGL.so.1"), done.stderr
    # the driver itself needs none (it passes the stages to Ray); a finishing task fails at its first batch
    code = ("import actors.finish, actors.actor, jobs.plan, jobs.report\n"
            "try:\n    actors.finish.finish_table(None, 'x')\nexcept actors.opencv.OpenCVUnavailable: print('said')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"PYTHONPATH": f"{fake.parent}:{REPO}"},
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "said", done.stderr[-2000:]


def test_hdfs_without_java_is_one_line_not_a_page_of_dlopen_failures(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    done = sdfleet("generate", str(manifest), "--out", "hdfs://namenode/x", env={"JAVA_HOME": str(tmp_path)})
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    # libjvm here; libhdfs on a machine with Java but no Hadoop
    assert line.startswith("sdfleet: error: hdfs:// cannot be opened: Unable to load lib"), line
    assert "JAVA_HOME" in line


@pytest.mark.parametrize("name, magic", [("s.jpg", b"\xff\xd8\xff"), ("s.JPEG", b"\xff\xd8\xff"), ("s.webp", b"RIFF")])
def test_sheet_is_written_in_the_format_its_extension_names(capsys, tmp_path, name, magic):
    output = make_output(tmp_path / "out")
    code, _, err = run(capsys, "sheet", output, "-o", tmp_path / name, "--thumb", "32")
    assert code == 0, err
    assert (tmp_path / name).read_bytes().startswith(magic)
    with Image.open(tmp_path / name) as image:
        assert image.size == (6 * 32, 46)  # six rows on one line, each with its caption


@pytest.mark.parametrize("target, expected", [
    ("{dir}", "is a directory"),
    ("", "-o is empty"),
    ("{dir}/sheet.txt", ".txt is not a format a sheet is written in; end the name in .png, .jpg, .jpeg, .webp"),
    ("{dir}/sheet", "no extension is not a format"),
    ("{dir}/sheet.", "no extension is not a format"),  # was ". is not a format"
    ("{dir}/out/run.json/sheet.png", "cannot write -o {dir}/out/run.json/sheet.png: "),  # its parent is a file
    ("memory://sheets/s.png", "memory:// lives in this process only"),  # gone when the command ends
])
def test_sheet_refuses_an_output_it_cannot_write_in_one_line(capsys, tmp_path, target, expected):
    output = make_output(tmp_path / "out")
    code, _, err = run(capsys, "sheet", output, "-o", target.format(dir=tmp_path))
    assert code == 1
    assert expected.format(dir=tmp_path) in one_error_line(err)
    assert not (tmp_path / "sheet.txt").exists() and not (tmp_path / "sheet").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--thumb", "5000"], "sheet: error: --thumb must be 16 to 1024 px; got 5000"),
    (["--columns", "0"], "sheet: error: --columns must be at least 1; got 0"),
    # six rows on one line 17,000 px wide: more than WebP holds, which JPEG and PNG can
    (["--columns", "1000", "--thumb", "17", "-o", "{dir}/s.webp"], "would be 17000x31 px, more than WEBP can hold"),
    # one tile a line, 1,000 px: 6 Mpx, over the limit as patched below (200 Mpx takes ~12,000 rows of 128 px)
    (["--columns", "1", "--thumb", "1000", "-o", "{dir}/s.png"], "would be 1000x6084 px, more than 5 Mpx"),
])
def test_a_sheet_too_large_to_hold_is_refused_before_drawing_naming_the_flags(capsys, tmp_path, monkeypatch, argv,
                                                                           expected):
    import jobs.sheet

    monkeypatch.setattr(jobs.sheet, "MAX_SHEET_PIXELS", 5_000_000)  # 6 rows of 1000 px are 6 Mpx
    output = make_output(tmp_path / "out")
    argv = [a.format(dir=tmp_path) for a in argv]
    target = [] if "-o" in argv else ["-o", str(tmp_path / "s.png")]
    code, _, err = run(capsys, "sheet", output, *target, *argv)
    assert code == 1
    assert expected in one_error_line(err)
    assert not list(tmp_path.glob("s.*")), "nothing written"


def test_a_sheet_no_thumbnail_size_would_fit_does_not_suggest_a_smaller_one(capsys, tmp_path, monkeypatch):
    """A million rows fit no sheet even at --thumb 16: the advice to give a smaller --thumb could not work."""
    import jobs.sheet

    monkeypatch.setattr(jobs.sheet, "MAX_SHEET_PIXELS", 2_000)  # 4 tiles of 16 px with captions
    code, _, err = run(capsys, "sheet", make_output(tmp_path / "out"), "-o", str(tmp_path / "s.png"))
    line = one_error_line(err)
    assert code == 1 and "no sheet holds 6 rows (about 4 at --thumb 16): see every row with `sdfleet report" in line
    assert "smaller --thumb" not in line


def test_report_refuses_a_thumbnail_larger_than_an_image(capsys, tmp_path):
    code, _, err = run(capsys, "report", make_output(tmp_path / "out"), "--thumb", "4096")
    assert code == 1
    assert "--thumb must be 16 to 1024 px, got 4096" in one_error_line(err)


@pytest.mark.parametrize("command", [["generate", "{m}", "--out", "{out}"], ["manifest", "validate", "{m}"]])
def test_a_model_name_given_twice_is_refused(capsys, tmp_path, command):
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    argv = [a.format(m=manifest, out=tmp_path / "out") for a in command]
    code, _, err = run(capsys, *argv, "--model", "default=tiny", "--model", "default=tiny-random")
    assert code == 1
    assert "--model default is given twice (default=tiny and default=tiny-random)" in one_error_line(err)
    assert not (tmp_path / "out").exists()  # refused before anything was drawn
    # a preset's name for another model: rows naming `tiny` would draw it, and every other run the preset
    code, _, err = run(capsys, *argv, "--model", "tiny=sd21-random")
    assert code == 1 and not (tmp_path / "out").exists()
    assert "--model tiny=sd21-random: tiny is a preset's name (presets: sd21-random, tiny, tiny-random); give this " \
           "model a name of its own, such as --model tiny-1=sd21-random" in one_error_line(err), err


def test_a_report_group_by_column_the_new_ledger_will_not_have_is_said_before_drawing(capsys, tmp_path,
                                                                                     monkeypatch):
    """Said before a GPU starts, and the run goes on: a report never fails a run (the nightly passes
    `--report-group-by sku`, and a catalogue without `sku` failed its RayJob three times, drawing nothing)."""
    from jobs.errors import RunFailed

    def stop(*args, **kwargs):
        raise RunFailed("stopped where Ray would start")

    monkeypatch.setattr("jobs.generate._run_on_ray", stop)
    manifest = write_manifest(tmp_path / "m.parquet", rows(2, sku="A1", status="draft"))
    out = tmp_path / "out"
    code, _, err = run(capsys, "generate", manifest, "--out", out, "--report-group-by", "skU")  # implies --report
    warning = next(line for line in err.splitlines() if "warning" in line)
    assert warning.startswith("[sdfleet] warning: --report-group-by 'skU': this run's ledger will have no such "
                              "column; group by one of id, "), warning
    # the manifest's own columns, as the ledger names them (its `status` is kept as manifest_status)
    assert warning.endswith(", scheduler, sku, manifest_status; the run goes on, its report will not be grouped")
    assert code == 1 and err.rstrip().endswith("stopped where Ray would start"), err
    code, _, err = run(capsys, "generate", manifest, "--out", out, "--report", "--report-group-by", "actor")
    assert "warning: --report-group-by 'actor': a column of how each entry was made" in err
    code, _, err = run(capsys, "generate", manifest, "--out", out, "--report-group-by", "sku")
    assert "warning" not in err and "stopped where Ray would start" in err


def test_a_plan_only_run_is_refused_what_this_machine_cannot_draw_before_ray_starts(capsys, tmp_path, monkeypatch):
    """A dry run of a local Ray names a backend or device this machine lacks before Ray starts, as a real run
    does (it started Ray, planned in Ray, then refused: backends QA); a CUDA-graph mode on a CPU is said."""
    import torch

    from jobs.errors import RunFailed

    def ray_started(*args, **kwargs):
        raise RunFailed("Ray was started")

    monkeypatch.setattr("jobs.generate._run_on_ray", ray_started)
    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    argv = ("generate", manifest, "--out", tmp_path / "out", "--plan-only")
    cases = [(("--backend", "tensorrt", "--device", "cpu"), "--backend tensorrt needs an NVIDIA GPU")]
    if not torch.cuda.is_available():
        cases.append((("--device", "cuda"), "--device cuda: this machine has no GPU"))
    for flags, needle in cases:
        code, _, err = run(capsys, *argv, *flags)
        assert code == 1 and needle in one_error_line(err) and "Ray was started" not in err, (flags, err)
    code, _, err = run(capsys, *argv)  # what it can draw still gets its plan
    assert code == 1 and "Ray was started" in err, err
    # a mode that only adds CUDA graphs, on a CPU: said (it was taken without a word), and the run goes on
    code, _, err = run(capsys, *argv, "--backend", "compile", "--compile-mode", "reduce-overhead", "--device", "cpu")
    assert "warning: --compile-mode reduce-overhead adds CUDA graphs, which actors on a CPU have not" in err, err
    assert code == 1 and "Ray was started" in err, err
    from actors.backends.compile import CompileSettings  # and there the actors compile as default (one cache)

    assert CompileSettings.for_device("cpu", "reduce-overhead") == CompileSettings.for_device("cpu", "default")
    code, _, err = run(capsys, *argv, "--backend", "compile", "--compile-mode", "max-autotune", "--device", "cpu")
    assert "warning" not in err, err  # (it tunes Inductor's CPU kernels: a mode of its own there)


def test_ctrl_c_while_a_finished_run_leaves_ray_does_not_make_it_interrupted(monkeypatch, capsys):
    """A Ctrl-C in the second Ray takes to stop, after run.json was written, made the CLI say "interrupted" and exit
    130: a scheduler took a finished run for a failed one. Ray is left again and the run's summary returned; a
    Ctrl-C while the run draws still stops it, Ray left once."""
    import jobs.generate as generate

    left = []

    def disconnect():
        left.append(1)
        if len(left) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(generate, "connect", lambda *a, **k: {"CPU": 2.0})
    monkeypatch.setattr(generate, "disconnect", disconnect)
    monkeypatch.setattr(generate, "_on_cluster", lambda *a, **k: {"run_id": "r", "ok": 1})
    cfg = generate.GenerateConfig(manifests=["m.parquet"], out="o")
    try:
        assert generate._run_on_ray(cfg, *[None] * 6, time.time(), None, None) == {"run_id": "r", "ok": 1}
    except KeyboardInterrupt:  # (escaping, it would end the whole test session)
        pytest.fail("a Ctrl-C while leaving Ray made the finished run interrupted")
    assert len(left) == 2 and "interrupted while leaving Ray, after the run finished" in capsys.readouterr().err

    # SIGTERM there (the pod is being stopped): Ray is left again, then the command stops, doing no more (no report)
    left.clear()
    monkeypatch.setattr(generate, "stop_signal", lambda: signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        generate._run_on_ray(cfg, *[None] * 6, time.time(), None, None)
    assert len(left) == 2 and "stopped by SIGTERM while leaving Ray" in capsys.readouterr().err

    def drawing(*args, **kwargs):
        raise KeyboardInterrupt

    left.clear()
    monkeypatch.setattr(generate, "_on_cluster", drawing)
    monkeypatch.setattr(generate, "disconnect", lambda: left.append(1))
    with pytest.raises(KeyboardInterrupt):
        generate._run_on_ray(cfg, *[None] * 6, time.time(), None, None)
    assert left == [1]


def test_a_line_said_to_a_terminal_that_is_gone_loses_the_line_not_the_run(monkeypatch):
    """After a hang-up every write to the terminal fails (EIO): a progress line then ended the run, or replaced the
    KeyboardInterrupt of its orderly stop with an OSError."""
    import io

    from jobs.console import log

    class Gone(io.StringIO):
        def write(self, text):
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(sys, "stderr", Gone())
    log("12/48 rows")  # says nothing, raises nothing


@pytest.mark.parametrize("argv", [
    ["manifest", "validate", "ftp://127.0.0.1:1/m.parquet"],
    ["manifest", "expand", "--template", "{product}", "--products", "ftp://127.0.0.1:1/p.csv", "-o", "{tmp}/o.parquet"],
    ["manifest", "expand", "--template", "{product}", "--products", "{tmp}/p.csv", "-o", "ftp://127.0.0.1:1/o.parquet"],
    ["generate", "{tmp}/m.parquet", "--out", "ftp://127.0.0.1:1/out"],
    ["generate", "ftp://127.0.0.1:1/m.parquet", "--out", "{tmp}/out"],
    ["report", "ftp://127.0.0.1:1/out"],
], ids=["validate", "expand --products", "expand -o", "generate --out", "generate manifest", "report"])
def test_a_store_that_connects_as_it_opens_and_does_not_answer_is_one_line(capsys, tmp_path, monkeypatch, argv):
    """fsspec's ftp:// (and sftp://, smb://) connects in its constructor: a store that did not answer ended in a
    40-line traceback wherever a command opened one."""
    monkeypatch.setattr("jobs.generate._run_on_ray", lambda *a, **k: pytest.fail("Ray was reached"))
    write_manifest(tmp_path / "m.parquet", rows(1))
    (tmp_path / "p.csv").write_text("product\nmug\n")
    code, _, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 1 and "Traceback" not in err, err
    assert one_error_line(err).startswith("sdfleet: error: cannot reach ftp://127.0.0.1:1/"), err
    assert "Connection refused" in err


def test_report_group_by_asks_for_a_report():
    """`--report-group-by sku` alone wrote no report, without a word."""
    from jobs.generate import GenerateConfig

    assert GenerateConfig(manifests=["m.parquet"], out="o", report_group_by="sku").report is True
    assert GenerateConfig(manifests=["m.parquet"], out="o").report is False


def test_gpu_processes_on_a_local_ray_want_a_gpu_each():
    """A local Ray has this machine's GPUs for good: actors or training workers it could not place would wait
    forever, so generate and finetune both refuse at once, naming their own flag."""
    from cluster.connect import local_gpu_shortfall

    assert local_gpu_shortfall("--actors", 2, 2, "x") is None and local_gpu_shortfall("--actors", 1, 8, "x") is None
    assert local_gpu_shortfall("--actors", 4, 1, "x") == (
        "--actors 4 needs 4 GPUs (one each); this machine has 1: give --actors 1, "
        "or --address a cluster that has or can add them")
    none = local_gpu_shortfall("--workers", 1, 0, "leave --gpu out to train on the CPU")
    assert none.startswith("this machine has no GPU Ray can use")
    assert none.endswith("leave --gpu out to train on the CPU")


def test_places_are_given_to_the_workers_as_the_user_meant_them(tmp_path, monkeypatch):
    """`--out=~/x` reaches sdfleet unexpanded (the shell expands only a word that starts with ~), a model folder
    may be relative or under ~, and gcsfs keeps a URI's trailing slash: each is made what every process of the
    run opens alike, so the actors load the model the driver checked and a rerun finds the same output."""
    from jobs.generate import GenerateConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home" / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "sd").mkdir(parents=True)
    cfg = GenerateConfig(manifests=["m.parquet"], out="~/runs/a/", adapters="s3://bucket/adapters/",
                         models={"home": "~/models/tiny/", "here": "models/sd", "store": "gs://b/models/sd21/",
                                 "preset": "tiny-random", "hub": "org/model"})
    assert cfg.out == str(tmp_path / "home" / "runs" / "a") and cfg.adapters == "s3://bucket/adapters"
    assert cfg.models == {"default": "tiny", "home": str(tmp_path / "home" / "models" / "tiny"),
                          "here": str(tmp_path / "models" / "sd"), "store": "gs://b/models/sd21",
                          "preset": "tiny-random", "hub": "org/model"}


def test_the_reason_an_actor_died_is_said_not_ray_datas_empty_marker():
    """Ray Data raises an actor's constructor error with an empty SystemException as its cause: the run said
    only "the run stopped: SystemException" for a model folder whose weights do not load."""
    from ray.data.exceptions import SystemException

    from jobs.errors import root_cause

    try:
        try:
            raise SystemException()
        except SystemException as marker:
            raise RuntimeError("The actor died because of an error raised in its creation task\nTraceback ...\n"
                               "actors.models.ModelError: model default=/m did not load: bad header") from marker
    except RuntimeError as exc:
        assert root_cause(exc) == "actors.models.ModelError: model default=/m did not load: bad header"
    inner = ValueError("the innermost says most")
    outer = RuntimeError("wrapped")
    outer.__cause__ = inner
    assert root_cause(outer) == "the innermost says most"


def test_the_error_in_a_ray_data_task_is_said_not_ray_datas_retry_tip():
    """Ray Data appends its retry notice and a tip on configuring retries to an error raised in its tasks: a
    manifest gone while the plan ran said only "the run stopped: To change retry attempts, backoff, ..."."""
    from ray.data._internal.util import _annotate_exception_with_retry_context

    from jobs.errors import root_cause

    for message in ("ManifestError: /m.parquet is not a readable Parquet file: [Errno 2] No such file or directory",
                    "Traceback (most recent call last):\n  ...\nOSError: AWS Error ACCESS_DENIED during GetObject"):
        exc = _annotate_exception_with_retry_context(
            ValueError(message), description="call map_batches", attempts=1, max_attempts=1, total_backoff_s=0.0,
            exception_str=message)
        assert "To change retry attempts" in str(exc)  # Ray still says it this way
        assert root_cause(exc) == message.splitlines()[-1], str(exc)


def test_a_store_that_refuses_this_reader_names_the_flag_and_place(monkeypatch, tmp_path):
    """Credentials a store refuses came back as a bare "Forbidden", naming neither the flag nor the place."""
    from fsspec.implementations.memory import MemoryFileSystem

    from actors.models import ModelError, describe_model
    from jobs.errors import RunFailed
    from jobs.generate import resolve_adapters
    from manifests.reader import ManifestError, expand_manifest_paths

    def refused(self, path, *args, **kwargs):
        raise PermissionError("Forbidden")

    for method in ("isfile", "exists"):
        monkeypatch.setattr(MemoryFileSystem, method, refused)
    with pytest.raises(ManifestError, match=r"^manifest 'memory://b/m.parquet' cannot be read \(PermissionError: "
                                            r"Forbidden\)"):
        expand_manifest_paths(["memory://b/m.parquet"])
    with pytest.raises(ModelError, match=r"^model default=memory://b/models/sd cannot be read \(PermissionError: "
                                         r"Forbidden\)"):
        describe_model("default", "memory://b/models/sd")
    with pytest.raises(RunFailed, match=r"^--adapters memory://b/adapters cannot be read \(PermissionError: "
                                        r"Forbidden\)"):
        resolve_adapters("memory://b/adapters", {"style"})


def test_a_report_that_cannot_be_written_or_of_a_file_is_one_line(capsys, tmp_path, monkeypatch):
    import jobs.report

    output = make_output(tmp_path / "out")
    code, _, err = run(capsys, "report", output / "run.json")
    assert code == 1 and "out/run.json is a file: give the --out folder of a `sdfleet generate` run" in \
        one_error_line(err)
    for command in (["report", ""], ["sheet", "", "-o", tmp_path / "s.png"]):  # was "error:  holds no sdfleet run"
        code, _, err = run(capsys, *command)
        assert code == 1 and one_error_line(err) == ("sdfleet: error: no output was given (OUT is blank): give the "
                                                     "--out of a `sdfleet generate` run"), err

    def read_only(self):
        raise PermissionError("501 Unsupported method ('PUT')")  # a bucket served over HTTP

    monkeypatch.setattr(jobs.report.Thumbnails, "save", read_only)
    code, _, err = run(capsys, "report", output)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"sdfleet: error: cannot write {output}/report/thumbs: "
                                                   "PermissionError: 501"), err


@pytest.mark.parametrize("returned, code", [(0, 0), (2, 2), (130, 130), (None, 0)])
def test_the_command_leaves_with_its_own_code_without_the_interpreters_teardown(monkeypatch, returned, code):
    """The console script and `python -m jobs` end in os._exit after flushing: Python's teardown could abort a
    finished run (an Arrow thread freeing a Parquet reader's buffer, exit 134) and fail its Ray job."""
    import tomllib

    import jobs.cli
    from helpers import REPO

    left = []
    monkeypatch.setattr(jobs.cli, "main", lambda: returned)
    monkeypatch.setattr(jobs.cli.os, "_exit", lambda c: left.append(c))
    jobs.cli.run()
    assert left == [code]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sdfleet"] == "jobs.cli:run" and "run()" in (REPO / "jobs" / "__main__.py").read_text()


def test_a_command_run_as_a_program_says_its_last_line_and_exits_with_its_code(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", rows(3) + [{"id": "bad", "prompt": "x", "steps": 0}])
    proc = sdfleet("manifest", "validate", str(manifest))  # stdout is a pipe: block-buffered until flushed
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "`steps` must be in 1..500" in proc.stdout and "4 rows in 1 manifest(s): 1 error(s)" in proc.stdout


@pytest.mark.parametrize("counts, may_fail, code", [
    ({"failed": 0, "invalid": 0}, False, 0),
    ({"failed": 1, "invalid": 1}, False, 2),
    ({"failed": 1, "invalid": 1}, True, 0),  # a partial run, as the RayJobs allow
    ({"failed": 0, "invalid": 4}, True, 2),  # every row unusable: a manifest gone wrong, not a partial run
    ({"failed": 4, "invalid": 0}, True, 2),
])
def test_rows_may_fail_covers_a_partial_run_not_one_where_every_row_went_wrong(capsys, counts, may_fail, code):
    from types import SimpleNamespace

    from jobs.cli import _rows_exit

    assert _rows_exit(SimpleNamespace(rows_may_fail=may_fail), {"rows": 4, **counts}) == code
    err = capsys.readouterr().err
    if code == 2 and may_fail:
        assert "every row failed or is invalid" in err and "--rows-may-fail does not cover" in err


def test_rows_may_fail_in_a_plan_says_where_the_rows_are_named_not_a_ledger_it_never_wrote(capsys):
    from types import SimpleNamespace

    from jobs.cli import _rows_exit

    summary = {"rows": 4, "failed": 1, "invalid": 2}
    assert _rows_exit(SimpleNamespace(rows_may_fail=True), {**summary, "plan_only": True}) == 0
    err = capsys.readouterr().err
    assert "1 rows would fail and 2 are invalid" in err and "ledger" not in err, err
    assert _rows_exit(SimpleNamespace(rows_may_fail=True), summary) == 0
    assert "they are in the ledger and run.json" in capsys.readouterr().err


def test_a_relative_out_is_refused_where_the_command_runs_as_a_ray_job(capsys, monkeypatch, tmp_path):
    """`ray job submit --working-dir .` runs the command in Ray's unpacked copy of the folder: a relative --out
    was written there, and went with the package."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    code, _, err = run(capsys, "generate", manifest, "--out", "rel-out")
    assert code == 1 and "--out rel-out is a relative path, and this command runs as a Ray job" in one_error_line(err)
    code, _, err = run(capsys, "finetune", "lora", "--data", "data", "--base", "tiny", "--out", str(tmp_path / "t"))
    assert code == 1 and "--data data is a relative path, and this command runs as a Ray job" in one_error_line(err)


@pytest.mark.parametrize("address, said", [
    ("ray://127.0.0.1:10001", "is a Ray Client address, on which Ray Data cannot run"),
    ("ray://hunter2@127.0.0.1:10001", "--address ray://***@127.0.0.1:10001 is a Ray Client address"),
    ("ann:hunter2@127.0.0.1:6379", "--address ***@127.0.0.1:6379 holds a user or password"),
    ("http://ann:hunter2@127.0.0.1:8265", "--address http://***@127.0.0.1:8265 is an HTTP address: that is the "
                                          "dashboard"),
    ("{http}", "answers HTTP: that is the dashboard and job-submission address"),
])
def test_addresses_ray_cannot_run_a_job_on_are_refused_at_once(capsys, tmp_path, address, said):
    """The dashboard's port (which `ray job submit` takes) hung for 14 minutes in ray.init; Ray Client got as far
    as Ray Data and failed with "'Worker' object has no attribute 'core_worker'"."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        manifest = write_manifest(tmp_path / "m.parquet", rows(1))
        address = address.format(http=f"127.0.0.1:{server.server_address[1]}")
        code, _, err = run(capsys, "generate", manifest, "--out", tmp_path / "out", "--address", address)
        assert code == 1 and said in err.splitlines()[-1] and "Traceback" not in err and "hunter2" not in err
        if "answers HTTP" not in said:  # told by its form alone: before any store is read or written
            assert not (tmp_path / "out").exists()
            code, _, err = run(capsys, "finetune", "lora", "--data", tmp_path / "none", "--base", "tiny",
                               "--out", tmp_path / "tune", "--address", address)
            assert code == 1 and said in err.splitlines()[-1] and "hunter2" not in err
    finally:
        server.shutdown()


def test_a_password_in_a_uri_is_never_printed(capsys, monkeypatch, tmp_path):
    """`https://user:secret@host/...` was echoed whole by every error and progress line naming the URI: secrets
    belong in the environment, and these lines end up in CI logs."""
    from jobs.console import log, without_passwords

    assert without_passwords("s3://b/k and https://ann:hunter2@h:8/m.parquet, ftp://bo:pw@x/y") == \
        "s3://b/k and https://ann:***@h:8/m.parquet, ftp://bo:***@x/y"
    assert without_passwords("mail ann@example.com, http://ann@host/x") == "mail ann@example.com, http://ann@host/x"
    uri = "http://ann:hunter2@127.0.0.1:9/m.parquet"  # nothing listens on port 9
    assert main(["manifest", "validate", uri]) == 1
    assert main(["watermark", "verify", uri.replace("m.parquet", "a.png")]) == 1
    log(f"reading {uri}")
    out, err = capsys.readouterr()
    assert "hunter2" not in out + err and "http://ann:***@127.0.0.1:9/" in err and "ann:***@" in out, out + err

    def pressed(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("jobs.cli.cmd_finetune", pressed)  # Ctrl-C: the line says where the checkpoints are
    assert main(["finetune", "lora", "--data", "d", "--base", "tiny", "--out", "https://ann:hunter2@h/tunes/a"]) == 130
    assert capsys.readouterr().err.strip() == ("sdfleet: interrupted; checkpoints are in https://ann:***@h/tunes/a/"
                                               "checkpoints, rerun the same command to resume from the newest")
    # before its first checkpoint (drawing the class images, loading the model) there is nothing to resume from
    (tmp_path / "early" / "checkpoints" / "checkpoint_2026-12-07_01-00-00").mkdir(parents=True)  # cut short
    (tmp_path / "early" / "checkpoints" / "checkpoint_2026-12-07_01-00-00" / "state.json").write_text('{"step": 4}')
    (tmp_path / "early" / "checkpoints" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert main(["finetune", "lora", "--data", "d", "--base", "tiny", "--out", str(tmp_path / "early")]) == 130
    assert capsys.readouterr().err.strip() == ("sdfleet: interrupted; no checkpoint was written yet, so rerunning the "
                                               "same command starts training again")
    (tmp_path / "early" / "class-images" / "images").mkdir(parents=True)  # DreamBooth stopped in its class draw
    (tmp_path / "early" / "class-images" / "images" / "class-00000.png").write_bytes(b"")
    assert main(["finetune", "lora", "--data", "d", "--base", "tiny", "--out", str(tmp_path / "early")]) == 130
    assert capsys.readouterr().err.strip().endswith("starts training again (the class images drawn so far are kept)")


def test_the_line_said_on_a_stop_quotes_a_path_with_a_newline_on_one_line(capsys, monkeypatch, tmp_path):
    """Ctrl-C's line names --out: a newline in it forged a second line (the others go through terminal_line)."""
    def pressed(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("jobs.cli.cmd_finetune", pressed)
    out = "https://h/tune\nsdfleet: done"  # (a store: the line says where its checkpoints are)
    assert main(["finetune", "lora", "--data", "d", "--base", "tiny", "--out", out]) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "tune\\nsdfleet: done" in err, err


def test_a_password_in_a_uri_stays_out_of_the_files_a_command_writes(tmp_path, monkeypatch):
    """run.json, the ledger's `source`, finetune.json and a dataset's summary recorded the URIs they were given
    whole, password included, in files that travel with the images and models. A rerun of the same fine-tune
    still resumes: what it would record is compared with what was recorded."""
    import io
    import json

    import fsspec

    import jobs.plan as plan
    from actors.models import describe_model
    from actors.train.config import TrainConfig
    from jobs.dataset import build_dataset
    from jobs.finetune import _starts_afresh, _write_json, run_record
    from jobs.generate import write_summary
    from manifests.reader import ManifestPart, Unreadable

    uri, shown = "https://ann:hunter2@h/m.parquet", "https://ann:***@h/m.parquet"
    monkeypatch.setattr(plan, "read_part", lambda part: iter([(0, Unreadable(id="a", error="cut short")),
                                                             (1, {"id": "b", "prompt": "a red mug"})]))
    state = plan.PlanState(models={"default": describe_model("default", "tiny").defaults()}, watermark="sdfleet")
    rows = list(plan.plan_part(ManifestPart(uri=uri, row_group=0, first_row=0, num_rows=2), state))
    assert [(r["source"], r["id"]) for r in rows] == [(shown, "a"), (shown, "b")], rows

    write_summary(*fsspec.core.url_to_fs(str(tmp_path / "run")), "r1", {"manifests": [uri], "models": {}})
    for name in ("run.json", "runs/r1.json"):
        assert json.loads((tmp_path / "run" / name).read_text())["manifests"] == [shown]

    fs, root = fsspec.core.url_to_fs(str(tmp_path / "tune"))
    fs.makedirs(root)
    cfg = TrainConfig(method="lora", data="https://bo:pw1234@x/data", base="tiny", out=root, steps=2)
    _write_json(fs, f"{root}/finetune.json", {**run_record(cfg, "fp", None), "status": "running",
                                              "config": cfg.model_dump()})
    recorded = (tmp_path / "tune" / "finetune.json").read_text()
    assert "pw1234" not in recorded and '"https://bo:***@x/data"' in recorded
    assert _starts_afresh(fs, root, run_record(cfg, "fp", None), cfg) is False  # the same run: it resumes
    fs.makedirs(f"{root}/checkpoints/checkpoint_2026-12-05_10-00-00.000000")  # one written before, password and all
    (tmp_path / "tune" / "finetune.json").write_text(json.dumps({**run_record(cfg, "fp", None), "status": "running",
                                                                 "config": cfg.model_dump()}))
    assert _starts_afresh(fs, root, run_record(cfg, "fp", None), cfg) is False  # resumes too

    from helpers import ledger as ledger_of
    from jobs.recorder import Recorder  # a damaged row group's error names the manifest file
    ledger = Recorder(fs, str(tmp_path / "run"), "r1", total=1, started=0.0)
    ledger.record([{**rows[0], "error": f"{uri} rows 0-49 (row group 0) cannot be read", "actor": None,
                    "warning": f"read from {uri}", "finished_at": "2026-12-06T00:00:00+00:00"}])
    ledger.flush()
    (entry,) = ledger_of(tmp_path / "run")
    assert (entry["source"], entry["error"], entry["warning"]) == (
        shown, f"{shown} rows 0-49 (row group 0) cannot be read", f"read from {shown}"), entry

    images = "memory://ann:hunter2@h/images"  # the memory store takes the name as a path: a stand-in URI
    for i in range(2):
        data = io.BytesIO()
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(data, "PNG")
        fsspec.filesystem("memory").pipe(f"{images}/{i}.png", data.getvalue())
        fsspec.filesystem("memory").pipe(f"{images}/{i}.txt", b"a blue square")
    try:
        build_dataset(images, str(tmp_path / "data"), resolution=64, log=lambda line: None)
    finally:
        fsspec.filesystem("memory").rm(images, recursive=True)
    assert json.loads((tmp_path / "data" / "_dataset.json").read_text())["source"] == "memory://ann:***@h/images"


def test_a_store_librarys_log_records_stay_off_the_terminal_of_a_short_command(tmp_path):
    """gcsfs logs each retry with its traceback: with no handler configured Python's last-resort handler printed
    them, 158 lines for one unreachable gs:// image under `watermark verify`, which says each failure itself."""
    script = """
import logging, sys
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import register_implementation

class Noisy(MemoryFileSystem):
    protocol = "noisy"

    def isdir(self, path):
        logging.getLogger("gcsfs").error("retrying after a connection error\\nTraceback (most recent call last): ...")
        raise ConnectionError("no route to host")

register_implementation("noisy", Noisy)
from jobs.cli import main
sys.exit(main(["watermark", "verify", "noisy://bucket/a.png"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout.strip() == "ERROR  noisy://bucket/a.png: cannot be read (ConnectionError: no route to host)"
    assert proc.stderr == "", proc.stderr


def test_a_store_librarys_own_error_is_one_line_and_others_keep_their_traceback():
    """An error of botocore, gcsfs or aiohttp that no call site worded is the store refusing or not answering;
    an error of any other library (protobuf's, say) is a bug whose traceback must show."""
    import aiohttp
    from botocore.exceptions import NoCredentialsError
    from google.protobuf.message import DecodeError

    from jobs.errors import describe_error

    try:
        try:
            raise NoCredentialsError()
        except NoCredentialsError as cause:
            raise OSError("s3fs could not sign the request") from cause
    except OSError as wrapped:
        said = describe_error(wrapped)
    assert said == ("a store refused or did not answer: NoCredentialsError: Unable to locate credentials (check the "
                    "URIs given, and the store's credentials in the environment)")
    assert describe_error(aiohttp.ClientConnectionError("down")).startswith("a store refused or did not answer")
    assert describe_error(DecodeError("truncated message")) is None


def test_generate_names_every_manifest_of_a_folder_that_cannot_be_read(capsys, tmp_path, monkeypatch):
    """It named the first and stopped, where `manifest validate` names them all: fix one, rerun, meet the next."""
    import cluster.connect

    monkeypatch.setattr(cluster.connect, "connect", lambda *a, **k: pytest.fail("Ray started"))
    from helpers import write_damaged_manifest

    folder = tmp_path / "day"
    write_manifest(folder / "a-good.parquet", rows(2))
    (folder / "b-empty.parquet").write_bytes(b"")
    (folder / "c-text.parquet").write_text("id,prompt\nx,a mug\n")
    code, _, err = run(capsys, "generate", folder, "--out", tmp_path / "out")
    line = one_error_line(err)
    assert code == 1 and line.startswith("sdfleet: error: 2 of the 3 manifests cannot be read: "), line
    assert "b-empty.parquet is not a readable Parquet file" in line and "c-text.parquet is not a readable" in line
    write_damaged_manifest(folder / "a-damaged.parquet", column="id")  # its footer opens; its ids do not
    code, _, err = run(capsys, "generate", folder, "--out", tmp_path / "out")
    line = one_error_line(err)
    assert line.startswith("sdfleet: error: 3 of the 4 manifests cannot be read: ") and "a-damaged.parquet" in line


def test_manifests_without_a_row_are_refused_and_the_output_left_as_it_was(capsys, tmp_path, monkeypatch):
    """An upstream export that wrote empty files made a night that exited 0 with nothing to do, started Ray for
    nothing, and counted every row of the catalogue as no longer asked for (the report's 'not asked for')."""
    import ray

    from test_report import make_output

    out = make_output(tmp_path / "out")  # an output with earlier runs
    before = (out / "run.json").read_text()
    empty = write_manifest(tmp_path / "catalog.parquet", [])
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started for manifests without a row"))
    code, _, err = run(capsys, "generate", str(empty), "--out", str(out))
    assert code == 1, err
    assert one_error_line(err) == f"sdfleet: error: the manifests hold no rows ({empty}): nothing was drawn; check " \
                                  "what wrote them", err
    assert (out / "run.json").read_text() == before
    # into a new --out, a refused run (no rows, a mistyped manifest) leaves no empty output folder behind
    for manifest in (empty, tmp_path / "typo.parquet"):
        code, _, err = run(capsys, "generate", str(manifest), "--out", str(tmp_path / "new" / "out"))
        assert code == 1 and not (tmp_path / "new" / "out").exists(), err
    assert (out / "results").is_dir()  # an output that was there stays, whole


def test_a_backend_cache_the_actors_could_not_use_is_refused_before_ray_naming_the_flag(capsys, tmp_path,
                                                                                          monkeypatch):
    """A file, or a path below a file: found by the actors, every row to draw failed (exit 0 under
    --rows-may-fail, nothing drawn) or the run stopped with a bare OS error or Ray's 'UDF failed'. --plan-only,
    the nightly's dry run, says so too, and makes nothing. A local path on a joined cluster is the workers' disk,
    not this one's: not checked here; nor is a cache the run never reads (eager, a fixed batch size)."""
    from jobs.generate import check_backend_cache

    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started with a cache it cannot use"))
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for cache, said in ((afile, f"--backend-cache {afile} is a file; give a folder"),
                        (afile / "onnx", f"--backend-cache {afile / 'onnx'} cannot be used (")):
        for plan_only in ([], ["--plan-only"]):
            code, _, err = run(capsys, "generate", manifest, "--out", tmp_path / "out", "--backend", "onnx",
                               "--backend-cache", cache, "--rows-may-fail", *plan_only)
            assert code == 1 and said in one_error_line(err), err
    assert not (tmp_path / "out").exists(), "a refused run leaves no output behind"
    fresh = tmp_path / "cache" / "new"  # a folder that is not there yet is fine; the plan does not make it
    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))  # checks passed
    run(capsys, "generate", manifest, "--out", tmp_path / "out", "--backend-cache", fresh, "--plan-only")
    assert not fresh.exists() and not (tmp_path / "cache").exists()
    run(capsys, "generate", manifest, "--out", tmp_path / "out", "--backend-cache", fresh)  # eager, batch 8
    assert not fresh.exists()
    run(capsys, "generate", manifest, "--out", tmp_path / "out", "--backend-cache", fresh, "--backend", "onnx")
    assert fresh.is_dir()
    check_backend_cache(str(afile / "onnx"), make=True, here=False)  # (no error: the workers' disk, not this one)
    assert afile.is_file()


def test_a_cache_write_that_fails_mid_run_costs_the_cache_not_the_rows(tmp_path, monkeypatch):
    """--batch-size auto wrote its choice with no guard: one failed write ended the whole run ('UDF failed')."""
    from actors import batch_size

    sizes = batch_size.BatchSizes(str(tmp_path / "cache"))
    monkeypatch.setattr(batch_size, "measure", lambda *a, **k: (4, {4: 1.0}))
    monkeypatch.setattr(sizes.fs, "pipe_file", lambda *a, **k: (_ for _ in ()).throw(OSError("the store went away")))

    import torch

    class Unet:
        device, dtype = torch.device("cpu"), torch.float32

    pipe = type("Pipe", (), {"unet": Unet()})()
    row = {"model": "default", "width": 64, "height": 64, "guidance_scale": 3.0, "negative_prompt": None}
    assert sizes.get(row, "fp", "eager", lambda r: pipe) == 4


def test_output_piped_into_a_reader_that_leaves_early_ends_quietly(tmp_path):
    """`sdfleet watermark verify 'OUT/images/*.png' | head -1` printed a BrokenPipeError traceback and exited 1
    although every image was fine; now it ends as a pipe's reader leaving ends a Unix tool: no word, exit 141."""
    for i in range(60):
        Image.new("RGB", (256, 256), (i, 100, 200)).save(tmp_path / f"{i:02d}.png")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "watermark", "verify", str(tmp_path / "*.png")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does once it has its line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "00.png" in first, (proc.returncode, first, err)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_broken_pipe_that_is_not_stdouts_is_not_taken_for_a_reader_leaving(monkeypatch):
    """Only stdout's reader leaving ends a command quietly (141); a socket's or a subprocess's broken pipe is a
    failure with its traceback, as before."""
    from jobs import cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_report", broken)
    with pytest.raises(BrokenPipeError):
        cli.main(["report", "out"])


@pytest.mark.parametrize("flags, needle", [
    (["--backend", "tensorrt", "--device", "cpu"], "--backend tensorrt needs an NVIDIA GPU"),
    (["--device", "cuda"], "--device cuda: this machine has no GPU"),
    (["--actors", "99"], "--actors 99 is too many for 2 CPUs"),
])
def test_what_a_local_ray_could_never_run_is_refused_before_it_starts_leaving_no_output(capsys, tmp_path,
                                                                                      monkeypatch, flags, needle):
    """A local Ray has this machine's devices for good: a backend or device it lacks was said only after Ray had
    started, and left OUT/logs/ behind in what was a fresh output folder."""
    from jobs import generate

    monkeypatch.setattr(generate, "local_resources", lambda num_cpus=None: {"CPU": 2.0, "GPU": 0.0})
    monkeypatch.setattr(generate, "connect", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    assert main(["generate", str(manifest), "--out", str(tmp_path / "out"), *flags]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_gcs_endpoint_whose_name_does_not_resolve_is_one_line_at_once(capsys, tmp_path, monkeypatch):
    """gcsfs retried the name lookup as any other failure, twice over for one bucket: over a minute, then a
    message that called it a write error."""
    pytest.importorskip("gcsfs")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://gcs.invalid:4443")  # (.invalid never resolves: RFC 6761)
    monkeypatch.setattr("jobs.generate._run_on_ray", lambda *a, **k: pytest.fail("Ray was reached"))
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    code, _, err = run(capsys, "generate", str(manifest), "--out", "gs://catalog/run", "--plan-only")
    assert code == 1 and "Traceback" not in err, err
    assert one_error_line(err).startswith("sdfleet: error: --out gs://catalog/run: the store does not answer "
                                          "(cannot resolve the host of http://gcs.invalid:4443"), err


# A store whose library logs its retries, tracebacks and all, before the command's log file is open
NOISY_STORE = """
import logging, sys
import fsspec
from fsspec.implementations.local import LocalFileSystem
from jobs.cli import main

class Noisy(LocalFileSystem):
    protocol = "noisy"
    def info(self, path, **kwargs):
        try:
            raise ConnectionError("reset by peer")
        except ConnectionError:
            logging.getLogger("gcsfs").exception("_request out of retries on exception")
        return super().info(path, **kwargs)

fsspec.register_implementation("noisy", Noisy, clobber=True)
sys.exit(main(sys.argv[1:]))
"""


def test_a_store_librarys_own_log_lines_do_not_reach_the_terminal(tmp_path):
    """Python prints a library's records where no handler takes them: a gs:// output that did not answer put
    104 lines of gcsfs's retry tracebacks before generate's one line."""
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    proc = subprocess.run([sys.executable, "-c", NOISY_STORE, "generate", str(manifest), "--out",
                           f"noisy://{tmp_path}/out", "--plan-only"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "out of retries" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_an_adapter_store_that_is_not_there_is_warned_of_when_no_row_names_an_adapter(capsys, tmp_path):
    """A mistyped --adapters went unsaid until a night whose rows named an adapter failed every one of them."""
    from jobs.generate import resolve_adapters

    assert resolve_adapters(str(tmp_path / "adaptors"), set()) == ({}, {})
    assert "warning: --adapters " in capsys.readouterr().err
    (tmp_path / "adapters").mkdir()
    assert resolve_adapters(f"file://{tmp_path}/adapters", set()) == ({}, {})
    assert "warning" not in capsys.readouterr().err


def test_credentials_a_store_refuses_are_said_so_not_a_bucket_that_does_not_exist():
    """A wrong secret key (S3's SignatureDoesNotMatch) sent the operator after a bucket that exists."""
    from manifests.stores import require_bucket

    class Refusing:
        protocol = ("s3", "s3a")

        def exists(self, path):
            return False

        def ls(self, path):
            raise PermissionError("Forbidden")

    with pytest.raises(ValueError) as exc:
        require_bucket(Refusing(), "catalog/run", "--out", "s3://catalog/run", ValueError)
    said = str(exc.value)
    assert said.startswith("--out s3://catalog/run: the store refused these credentials for bucket 'catalog' ("), said
    assert "does not exist" not in said


def test_a_preset_name_for_another_model_is_refused_by_the_config_too():
    """The Python API (GenerateConfig) as the CLI: `--model tiny=...` drew rows naming tiny with another model."""
    from pydantic import ValidationError

    from jobs.generate import GenerateConfig

    with pytest.raises(ValidationError, match=r"--model tiny=sd21-random: tiny is a preset's name"):
        GenerateConfig(manifests=["m.parquet"], out="out", models={"tiny": "sd21-random"})
    assert GenerateConfig(manifests=["m.parquet"], out="out", models={"tiny": "tiny"}).models["tiny"] == "tiny"
