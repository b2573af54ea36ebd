"""The `sdfleet` command line. Library code raises typed errors; this module turns them into exit codes.

Exit codes (DESIGN.md): 0 every row ok or skipped; 2 the run finished with failed or invalid rows (0 with
`generate --rows-may-fail`, for job schedulers that retry every non-zero exit); 1 it could not run (bad flags,
unreachable store, a model that does not load). `dataset build` follows the same rule with files for rows:
2 when some images were skipped, 1 when none could be used.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from pydantic import ValidationError

EXIT_OK, EXIT_ERROR, EXIT_ROWS = 0, 1, 2
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of the output left (`| head`)
MAX_THUMB = 1024  # report and sheet: a thumbnail larger than this is the image itself (OUT/images)


def _flag_error(prog: str, message: str) -> str:
    return f"{prog}: error: {message} (see {prog} --help)\n"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose flag errors are one line and exit 1 (EXIT_ERROR).

    argparse's own error() prints the whole usage block and exits 2, which in this CLI means "the run finished
    with failed rows": a script or job scheduler could not tell a mistyped flag from bad rows. --help still
    prints the full help and exits 0. add_subparsers makes each subcommand's parser a _Parser too (its
    parser_class defaults to type(self)), so `sdfleet generate` errors name `sdfleet generate`."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, _flag_error(self.prog, message))


def _model_pairs(values: list[str] | None) -> dict[str, str]:
    from actors.presets import preset_name_problem

    pairs = {}
    for value in values or []:
        name, sep, ref = value.partition("=")
        if not sep or not name or not ref:
            raise argparse.ArgumentTypeError(f"--model expects NAME=REF (say default=tiny), got {value!r}")
        if problem := preset_name_problem(name, ref):
            raise argparse.ArgumentTypeError(problem)
        if name in pairs:  # last-one-wins would quietly draw with a model the user may not have meant
            raise argparse.ArgumentTypeError(f"--model {name} is given twice ({name}={pairs[name]} and {value}): "
                                             "give each NAME once")
        pairs[name] = ref
    return pairs


def _flags_from_model(parser: argparse.ArgumentParser, model, skip=(), plural=None) -> None:
    """One flag per pydantic field (`batch_size` -> `--batch-size`), so the CLI cannot drift from the config.
    A field's description is its help; `json_schema_extra={"metavar": ...}` names its value."""
    import typing

    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = (plural or {}).get(name) or "--" + name.replace("_", "-")
        kind = field.annotation
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        text = field.description or ""
        if kind is bool:
            parser.add_argument(flag, action="store_true", dest=name, help=text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, action="append", dest=name, metavar="TEXT", help=text + " (repeat for more)")
        elif len(args) > 1 and any(typing.get_origin(a) is typing.Literal for a in args):  # 8 or auto
            words = [w for a in args if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
            scalar = typing.get_args(next(a for a in args if typing.get_origin(a) is not typing.Literal))[0]

            def number_or_word(text: str, scalar=scalar, words=tuple(words)):
                return text if text in words else scalar(text)

            number_or_word.__name__ = f"{scalar.__name__} or {'/'.join(words)}"  # argparse's error names it
            parser.add_argument(flag, type=number_or_word, default=default, dest=name, metavar=f"N|{'|'.join(words)}",
                                help=f"{text} (default {default})")
        elif typing.get_origin(kind) is typing.Literal or (args and typing.get_origin(args[0]) is typing.Literal):
            choices = typing.get_args(kind if typing.get_origin(kind) is typing.Literal else args[0])
            suffix = f" (default {default})" if default is not None else ""
            parser.add_argument(flag, choices=choices, default=default, dest=name, help=text + suffix)
        else:
            scalar = args[0] if args else kind
            suffix = f" (default {default})" if default not in (None, [], "") else ""
            metavar = (field.json_schema_extra or {}).get("metavar")
            parser.add_argument(flag, type=scalar, default=default, required=field.is_required(), dest=name,
                                metavar=metavar, help=text + suffix)


def build_parser() -> argparse.ArgumentParser:
    from actors.train.config import FLAG_NAMES, TrainConfig
    from jobs.generate import GenerateConfig

    parser = _Parser(prog="sdfleet", description="Batch Stable Diffusion on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="draw every row of Parquet manifests")
    fields = GenerateConfig.model_fields
    gen.add_argument("manifests", nargs="+", metavar="MANIFEST", help=fields["manifests"].description)
    gen.add_argument("--model", action="append", dest="models", metavar="NAME=REF", help=fields["models"].description)
    mark = gen.add_mutually_exclusive_group()
    mark.add_argument("--watermark", default=fields["watermark"].default, metavar="TEXT",
                      help=f"{fields['watermark'].description} (default: {fields['watermark'].default})")
    mark.add_argument("--no-watermark", action="store_true", help="draw without the invisible watermark")
    _flags_from_model(gen, GenerateConfig, skip={"manifests", "models", "watermark"})

    man = sub.add_parser("manifest", help="check or build manifests").add_subparsers(dest="manifest_command", required=True)
    val = man.add_parser("validate", help="name every bad row; exit 1 if any")
    val.add_argument("manifests", nargs="+", metavar="MANIFEST")
    val.add_argument("--model", action="append", metavar="NAME=REF", help="models rows may name (presets always)")
    val.add_argument("--no-watermark", action="store_true",
                     help="the run will draw without the watermark: images smaller than it needs are fine")
    val.add_argument("--adapters", metavar="URI", help="the adapter store the run will use: each adapter rows name is "
                     "read and checked as generate checks it (default: adapters are not checked)")
    exp = man.add_parser("expand", help="template x products x scenes x variants -> manifest")
    exp.add_argument("--template", required=True, help="prompt with {product}, and {scene} when --scenes is given "
                     "(any other product or scene column too), e.g. \"a photo of {product}, {scene}\"")
    exp.add_argument("--products", required=True, metavar="CSV|PARQUET|TXT", help="`product` column (+ optional `sku`, other columns)")
    exp.add_argument("--scenes", metavar="CSV|PARQUET|TXT", help="`scene` column (+ optional `scene_id`), or one scene per line")
    exp.add_argument("--variants", type=int, default=1, help="seeds per product x scene (default 1)")
    exp.add_argument("--negative", default="", help="negative prompt for every row")
    for flag, kind in (("--steps", int), ("--width", int), ("--height", int), ("--guidance-scale", float),
                       ("--scheduler", str), ("--model", str)):
        exp.add_argument(flag, type=kind, help="set on every row (default: none; generate then takes the row "
                         "schema's default: the model's own size, steps and scheduler, guidance 7.5, model default)")
    exp.add_argument("-o", "--out", required=True, help="manifest to write (path or URI ending in .parquet)")
    exp.add_argument("--force", action="store_true", help="overwrite -o if it already exists (default: refuse)")

    wm = sub.add_parser("watermark", help="invisible watermark tools").add_subparsers(dest="watermark_command", required=True)
    ver = wm.add_parser("verify", help="read watermark payloads back from images")
    ver.add_argument("images", nargs="+", metavar="IMAGE", help="images (paths, URIs or globs, "
                     "'s3://bucket/out/images/*.png'); each gets a line: ok, "
                     "MISSING (no mark), OTHER (another payload) or ERROR (cannot be checked)")
    ver.add_argument("--payload", help="expected payload, not empty "
                     "(default: the one recorded in each PNG, else sdfleet)")

    tune = sub.add_parser("finetune", help="fine-tune a model on Ray Train (full, LoRA, DreamBooth, VAE, "
                                           "Textual Inversion)")
    tune.add_argument("method", choices=["full", "lora", "dreambooth", "vae", "textual-inversion"],
                      help="full: train the UNet (text encoder optional), write a diffusers model at --out; "
                           "lora: LoRA on the UNet's attention, write --out/pytorch_lora_weights.safetensors "
                           "(with --class-prompt: DreamBooth-LoRA); "
                           "dreambooth: full with prior preservation (--class-prompt or --class-data); "
                           "vae: train the autoencoder (pixel MSE + KL), write a diffusers model at --out; "
                           "textual-inversion: learn a new word's embedding (--token), write "
                           "--out/learned_embeds.safetensors")
    _flags_from_model(tune, TrainConfig, skip={"method"}, plural=FLAG_NAMES)

    data = sub.add_parser("dataset", help="training datasets").add_subparsers(dest="dataset_command", required=True)
    build = data.add_parser("build", help="captioned images -> Parquet training dataset")
    build.add_argument("images", metavar="IMAGES_DIR", help="folder of images (path or URI), searched recursively")
    build.add_argument("--captions", metavar="DIR|CSV|JSONL",
                       help="captions: a folder of <stem>.txt, or a .csv/.jsonl of file,caption "
                            "(default: <stem>.txt beside each image)")
    build.add_argument("-o", "--out", required=True, help="dataset folder to write (path or URI)")
    build.add_argument("--resolution", type=int, default=256, help="square training size in px (default 256)")
    build.add_argument("--min-size", type=int, help="skip images whose shortest side is smaller (default: --resolution)")

    ev = sub.add_parser("eval", help="score prompt adherence of a run in the synthetic shapes world")
    ev.add_argument("manifests", nargs="+", metavar="MANIFEST",
                    help="the run's manifests: color/shape/background columns, or prompts "
                         "'a {color} {shape} on a {background} background'")
    ev.add_argument("--out", required=True, help="the run's output root (images/ under it); eval.json is written there")

    rep = sub.add_parser("report", help="write OUT/report/index.html: a run's figures, changes, problems and images")
    rep.add_argument("out", metavar="OUT", help="the --out of a `sdfleet generate` run (path or URI)")
    rep.add_argument("--group-by", metavar="COLUMN", help="group the images by a ledger column: sku, scene_id, "
                                                          "adapters, model, any manifest column (default: one group)")
    rep.add_argument("--thumb", type=int, default=192, help="thumbnail size in px, the longer side (default 192)")

    sheet = sub.add_parser("sheet", help="a contact sheet: a run's images in one picture (PNG, JPEG or WebP), "
                                         "captioned with their ids")
    sheet.add_argument("out", metavar="OUT", help="the --out of a `sdfleet generate` run (path or URI)")
    sheet.add_argument("-o", "--output", required=True, metavar="FILE",
                       help="the sheet to write (path or URI); its extension names the format: .png, .jpg (.jpeg) "
                            "or .webp")
    sheet.add_argument("--group-by", metavar="COLUMN", help="one band per value of a ledger column (sku, ...)")
    sheet.add_argument("--columns", type=int, help="thumbnails per line (default: 6, more for a large run, so that "
                       "the sheet comes out about as wide as tall)")
    sheet.add_argument("--thumb", type=int, default=128, help="thumbnail side in px (default 128)")

    model = sub.add_parser("model", help="model tools").add_subparsers(dest="model_command", required=True)
    export = model.add_parser("export", help="write a preset as a diffusers directory")
    export.add_argument("preset", metavar="PRESET")
    export.add_argument("directory", metavar="DIR")
    _name_commands(parser)
    return parser


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """A missing or unknown command is named COMMAND ("required: COMMAND (see sdfleet watermark --help)"), not by
    argparse's `dest`, which only the code knows ("required: watermark_command")."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.metavar = "COMMAND"
            for sub in action.choices.values():
                _name_commands(sub)


def run() -> None:
    """The `sdfleet` command: `main`, then leave without the interpreter's teardown.

    Once a command has said its last line and closed its files, Python's teardown can still kill the process:
    an Arrow thread that frees a Parquet reader's Python buffer then asks a finalising interpreter for the
    GIL, and the process aborts (exit 134, apache/arrow#49942). A run whose rows were all recorded then failed
    its Ray job, and KubeRay drew the night again. So the command flushes what it printed and logged and
    exits at once with its own code. An exception no handler describes still ends in a traceback."""
    from jobs.console import leave

    code = main()
    leave(0 if code is None else code if isinstance(code, int) else EXIT_ERROR)


def _given(argv: list[str] | None) -> set[str]:
    """The fields whose flags `argv` names (argparse's namespace holds every default as well): `argv` parsed
    again by a parser whose defaults are suppressed, which leaves a flag not given off the namespace."""
    parser = build_parser()

    def suppress(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    suppress(sub)
            else:
                action.default = argparse.SUPPRESS

    suppress(parser)
    return set(vars(parser.parse_known_args(argv)[0]))


def main(argv: list[str] | None = None) -> int:
    from jobs.console import terminal_line, without_passwords

    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # parse_args would blame `sdfleet`; the subcommand's own --help is the one that lists its flags
            prog = " ".join([parser.prog, args.command,
                             *(v for k, v in vars(args).items() if k.endswith("_command"))])  # manifest validate
            parser.exit(EXIT_ERROR, _flag_error(prog, f"unrecognized arguments: {' '.join(unknown)}"))
    except SystemExit as exc:  # --help (0), or a flag error already said in one line by _Parser.error (1)
        return exc.code
    if args.command == "finetune":
        args.given = _given(argv)
    from cluster.connect import stop_on_sigterm

    stop_on_sigterm()  # from the start, not once Ray is up: a SIGTERM while checking inputs or starting Ray killed
    # the process without a word (or Ray's start-up handler exited 15 half a minute later), status left `starting`
    if not getattr(args, "verbose", False):  # generate and finetune send them to their log file once it is open
        # a store library's retries (gcsfs logs each with its traceback) reached Python's last-resort handler,
        # which prints them: 158 lines for one unreachable gs:// image; each command says a failure itself
        logging.getLogger().addHandler(logging.NullHandler())
    handlers = {
        "generate": cmd_generate,
        "manifest": cmd_manifest,
        "watermark": cmd_watermark_verify,
        "model": cmd_model_export,
        "finetune": cmd_finetune,
        "dataset": cmd_dataset_build,
        "eval": cmd_eval,
        "report": cmd_report,
        "sheet": cmd_sheet,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        from cluster.connect import cluster_lost, stop_signal

        from jobs.generate import STOPPED_HINT

        if args.command == "finetune":
            from jobs.finetune import resume_hint

            what = without_passwords(resume_hint(args.out))
        else:
            what = without_passwords(STOPPED_HINT if args.command == "generate" else "nothing more was done")
        signum = stop_signal()  # the handler's KeyboardInterrupt (cluster.connect.stop_on_sigterm)
        if cluster_lost():  # the watch interrupted the command (cluster.connect.watch_cluster)
            said, code = f"sdfleet: error: {without_passwords(cluster_lost())}; {what}", EXIT_ERROR
        elif signum:  # exit 143 for SIGTERM (EXIT_TERMINATED), 129 for SIGHUP, as a shell reports them
            said, code = f"sdfleet: stopped by {signum.name}; {what}", 128 + signum
        else:
            said, code = f"sdfleet: interrupted; {what}", 130
        with contextlib.suppress(OSError):  # (a closed terminal refuses the line: the ledger holds the rows)
            print(terminal_line(said), file=sys.stderr)
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe (a socket, a subprocess): not the user's doing
            raise
        # `sdfleet ... | head`: the reader has left with what it wanted; the rest goes unsaid, and the exit is a
        # shell's for a process the pipe's signal ended (no traceback)
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # the typed errors of the library, said in one line with a hint
        from jobs.errors import describe_error

        message = describe_error(exc)
        if message is None:
            raise
        print(f"sdfleet: error: {terminal_line(without_passwords(message))}", file=sys.stderr)
        return EXIT_ERROR


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no real stdout (a test's capture)
        return False


def cmd_generate(args) -> int:
    from jobs.console import log, terminal_line
    from jobs.errors import one_line
    from jobs.generate import GenerateConfig, run_generate

    try:
        values = {k: v for k, v in vars(args).items() if k in GenerateConfig.model_fields and v is not None}
        values["models"] = _model_pairs(args.models)
        values["watermark"] = None if args.no_watermark else args.watermark
        cfg = GenerateConfig(**values)
    except (ValidationError, argparse.ArgumentTypeError) as exc:
        print(f"sdfleet generate: error: {terminal_line(_config_message(exc))}", file=sys.stderr)
        return EXIT_ERROR
    summary = run_generate(cfg)
    if summary.get("plan_only"):
        restored = f", {summary['restored']} would be restored" if summary["restored"] else ""  # failed since, mended
        relabelled = (f" ({summary['relabelled']} to be recorded again with their changed manifest columns)"
                      if summary["relabelled"] else "")
        log(f"plan only, {summary['wall_seconds']:.1f} s: of {summary['rows']} rows {summary['to_draw']} would be "
            f"drawn, {summary['skipped']} are done{relabelled}, {summary['recovered']} would be recovered{restored}, "
            f"{summary['failed']} would fail, {summary['invalid']} are invalid; nothing was drawn or written")
        return _rows_exit(cfg, summary)
    found = summary["recovered"] + summary["restored"]  # ok rows an earlier run drew
    recovered = f", {summary['recovered']} recovered" if summary["recovered"] else ""  # a killed run's images
    recovered += f", {summary['restored']} restored" if summary["restored"] else ""  # failed since, mended
    relabelled = f" ({summary['relabelled']} relabelled)" if summary["relabelled"] else ""  # columns changed
    swaps = summary.get("adapter_swaps") or {}
    swapped = f", {swaps['total']} adapter swaps in {swaps['seconds']:.1f} s" if swaps.get("total") else ""
    log(f"done in {summary['wall_seconds']:.1f} s: {summary['ok'] - found} drawn{recovered}, "
        f"{summary['skipped']} skipped{relabelled}, "
        f"{summary['failed']} failed, {summary['invalid']} invalid ({summary['images_per_second']:.2f} img/s"
        f"{swapped}); ledger and run.json in {cfg.out}")
    if cfg.report:  # the page is a view of what is already stored: a failure is said, and the run stands
        from jobs.errors import GroupByError, describe_error
        from jobs.report import build_report

        try:
            try:
                done = build_report(cfg.out, group_by=cfg.report_group_by, flag="--report-group-by")
            except GroupByError as exc:  # said before drawing too, where this run alone could tell
                log(f"warning: {one_line(exc)}; the report is not grouped (`sdfleet report {cfg.out} --group-by "
                    "COLUMN` writes it again grouped)")
                done = build_report(cfg.out)
            _say_report(done)
        except Exception as exc:  # noqa: BLE001 - reported in one line; `sdfleet report` can write it later
            log(f"warning: no report: {describe_error(exc) or one_line(exc)}; the run is complete, "
                f"`sdfleet report {cfg.out}` writes it later")
    return _rows_exit(cfg, summary)


def cmd_report(args) -> int:
    from jobs.report import build_report

    if not 16 <= args.thumb <= MAX_THUMB:
        print(f"sdfleet report: error: --thumb must be 16 to {MAX_THUMB} px, got {args.thumb}", file=sys.stderr)
        return EXIT_ERROR
    _say_report(build_report(args.out, group_by=args.group_by, thumb=args.thumb))
    return EXIT_OK


def _say_report(done: dict) -> None:
    from jobs.console import log

    missing = f", {done['missing']} images missing" if done["missing"] else ""
    pages = (f" on {done['pages']} pages, {done['pages_unchanged']} of them unchanged" if done["pages"] > 1
             else "")
    log(f"report: {done['path']} ({done['rows']} rows{pages}, {done['thumbnails_made']} thumbnails made, "
        f"{done['thumbnails_reused']} reused{missing}, {done['seconds']:.1f} s)")
    for note in done["notes"]:
        log(f"warning: {note}")


def cmd_sheet(args) -> int:
    import io

    from jobs.console import log
    from jobs.errors import ReportError, one_line
    from jobs.outputs import run_file
    from jobs.sheet import contact_sheet, sheet_format
    from manifests.ledger import atomic_write
    from manifests.stores import is_local_fs, url_to_fs

    wrong = [] if args.columns is None or args.columns >= 1 else [f"--columns must be at least 1; got {args.columns}"]
    if not 16 <= args.thumb <= MAX_THUMB:
        wrong.append(f"--thumb must be 16 to {MAX_THUMB} px; got {args.thumb}")
    if wrong:
        print(f"sdfleet sheet: error: {'; '.join(wrong)}", file=sys.stderr)
        return EXIT_ERROR
    image_format = sheet_format(args.output)  # before drawing the sheet: a bad -o is said at once
    inside = run_file(args.out, args.output)
    if inside:
        raise ReportError(f"-o {args.output} is {inside}; write the sheet elsewhere (beside the run: "
                          f"{args.out.rstrip('/')}/sheet.png)")
    gaps = []  # said once the sheet is written (a sheet that cannot be written is the news)
    image = contact_sheet(args.out, group_by=args.group_by, columns=args.columns, thumb=args.thumb,
                          image_format=image_format, warn=lambda note: log(f"warning: {note}"), gaps=gaps.append)
    buf = io.BytesIO()
    image.save(buf, format=image_format)
    try:
        fs, path = url_to_fs(args.output)
        if is_local_fs(fs):  # a link (to where sheets are published) is written through, not replaced
            path = os.path.realpath(path)
        else:  # a disk's parents are made by atomic_write (sheet_format saw that a bucket is there)
            fs.makedirs(fs._parent(path), exist_ok=True)
        atomic_write(fs, path, buf.getvalue())  # a full disk leaves the sheet that was there, not half a picture
    except Exception as exc:  # noqa: BLE001 - a read-only store, a parent that is a file
        raise ReportError(f"cannot write -o {args.output}: {one_line(exc)}") from exc
    log(f"sheet: {args.output} ({image.width}x{image.height}, {image.width // args.thumb} to a line)")
    for gap in gaps:
        log(f"warning: {gap}")
    return EXIT_OK


def _rows_exit(cfg, summary: dict) -> int:
    if not (summary["failed"] or summary["invalid"]):
        return EXIT_OK
    from jobs.console import log

    if summary["failed"] + summary["invalid"] == summary["rows"]:  # not one row of the run can be used
        log(f"exit 2: every row failed or is invalid ({summary['failed']} failed, {summary['invalid']} invalid)"
            + (", which --rows-may-fail does not cover: a whole manifest gone wrong (every id twice, a model that "
               "draws nothing) is not a partial run" if cfg.rows_may_fail else ""))
        return EXIT_ROWS
    if cfg.rows_may_fail:
        if summary.get("plan_only"):  # nothing written: no ledger to look in
            failed, where = "would fail", ("named above (the first of them; a run without --plan-only names every "
                                           "one, `manifest validate` those whose own fields are wrong)")
        else:
            failed, where = "failed", "in the ledger and run.json"
        log(f"exit 0 although {summary['failed']} rows {failed} and {summary['invalid']} are invalid "
            f"(--rows-may-fail); they are {where}")
        return EXIT_OK
    return EXIT_ROWS


def _config_message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            # pydantic's "Input should be greater than or equal to 1" reads as a flag's rule: "must be at least 1"
            message = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
            message = message.replace("must be greater than or equal to", "must be at least").replace(
                "must be less than or equal to", "must be at most")
            if not err["loc"]:  # a check across flags: its message names them
                parts.append(message)
                continue
            flag = {"models": "model"}.get(str(err["loc"][0]), str(err["loc"][0])).replace("_", "-")
            parts.append(f"--{flag}: {message}")
        return "; ".join(parts)
    return str(exc)


def cmd_manifest(args) -> int:
    if args.manifest_command == "validate":
        return _validate(args)
    return _expand(args)


def _validate(args) -> int:
    from actors.models import describe_model
    from actors.presets import PRESETS
    from jobs.console import terminal_line, ticking, without_passwords
    from jobs.tokenizers import tokenizer_lookup
    from manifests.reader import ManifestError, expand_manifest_paths, named_together, plan_parts, unreadable_files
    from jobs.errors import RunFailed
    from jobs.validate import AdapterCheck
    from manifests.stores import absolute_local, store_problem
    from manifests.validate import check_manifests

    try:
        pairs = _model_pairs(args.model)
        if args.adapters is not None and not args.adapters.strip():  # "" would be the working directory
            raise argparse.ArgumentTypeError("--adapters must not be empty: give the adapter store's folder or URI, "
                                             "or leave --adapters out")
        if args.adapters is not None and (problem := store_problem("--adapters", args.adapters)):
            raise argparse.ArgumentTypeError(problem)
    except argparse.ArgumentTypeError as exc:
        print(f"sdfleet manifest validate: error: {terminal_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    models = {"default": "tiny", **{n: n for n in PRESETS}, **pairs}
    infos = {name: describe_model(name, ref) for name, ref in models.items()}
    absent: dict[str, ManifestError] = {}  # each path that names no manifest is said, and the others still checked
    uris = expand_manifest_paths(args.manifests, absent)
    if len(absent) == len(args.manifests):  # none to check: one error line, as generate says it
        raise named_together(absent)
    unreadable = unreadable_files(uris)  # each named, and the rest still checked
    for message in [*map(str, absent.values()), *unreadable.values()]:
        print(terminal_line(without_passwords(f"error: {message}")))
    errors, warnings = len(absent) + len(unreadable), 0
    uris = [uri for uri in uris if uri not in unreadable]
    sizes = {name: (info.width, info.height) for name, info in infos.items()}  # a row's size when it gives none
    total = sum(part.num_rows for part in plan_parts(uris))  # from footers
    adapters, unread = AdapterCheck(), None  # (without a store: the names rows load are only counted)
    if args.adapters is not None:
        try:
            adapters = AdapterCheck.resolve(absolute_local(args.adapters), *_adapter_names(uris),
                                            {n: dataclasses.asdict(i) for n, i in infos.items()})
        except RunFailed as exc:  # the store cannot be read: said, and the rows' own fields still checked
            print(terminal_line(without_passwords(f"error: {exc}; adapters not checked")))
            errors, unread = errors + 1, "the adapter store could not be read"
    checked, started = [0], time.time()
    with ticking(lambda: f"validating: {checked[0]:,}/{total:,} rows, {errors} error(s), {time.time() - started:.0f} s "
                         "in"):  # a catalogue of millions of rows takes minutes (on stderr: stdout is the verdicts)
        problems = check_manifests(uris, set(models), tokenizer_lookup(infos),
                                   watermark_sizes=None if args.no_watermark else sizes, checked=checked,
                                   row_checks=adapters.row)
        for kind, message in itertools.chain(problems, adapters.failures()):
            errors += kind == "error"
            warnings += kind == "warning"
            print(terminal_line(without_passwords(f"{kind}: {message}")))
    if uris and not total:  # as generate refuses them: an empty export, gated on validate, failed the night's run
        named = ", ".join(uris[:3]) + (f" and {len(uris) - 3} more" if len(uris) > 3 else "")
        print(terminal_line(without_passwords(f"error: the manifests hold no rows ({named}): `sdfleet generate` "
                                              "refuses them; check what wrote them")))
        errors += 1
    files = f"{len(uris)} manifest(s)" + (f" ({len(unreadable)} more unreadable)" if unreadable else "") + (
        f" ({len(absent)} path(s) naming none)" if absent else "")
    unchecked = f"; {len(adapters.unchecked)} adapter(s) named, not checked ({unread or why})" if (
        why := adapters.why_unchecked()) else ""
    print(f"{total} rows in {files}: {errors} error(s), {warnings} warning(s){unchecked}")
    return EXIT_ERROR if errors else EXIT_OK


def _adapter_names(uris: list[str]) -> tuple[set[str], set[str]]:
    """The adapter names the manifests' rows give, and those listed at a scale other than 0 (`named_adapters`); a
    damaged file's are asked about as its readable rows are checked (AdapterCheck.failures)."""
    from manifests.reader import ManifestError, named_adapters

    try:
        return named_adapters(uris)
    except ManifestError:
        names: set[str] = set()
        loaded: set[str] = set()
        for uri in uris:
            with contextlib.suppress(ManifestError):
                more, more_loaded = named_adapters([uri])
                names, loaded = names | more, loaded | more_loaded
        return names, loaded


def _expand(args) -> int:
    from actors.presets import PRESETS
    from jobs.console import terminal_line
    from manifests.expand import check_output, expand, fixed_warnings, load_list, write_manifest

    check_output(args.out, force=args.force)  # before any work: a wrong -o is refused, an existing one kept
    products = load_list(args.products, "product")
    scenes = load_list(args.scenes, "scene") if args.scenes else None
    fixed = {k: v for k, v in {
        "steps": args.steps, "width": args.width, "height": args.height,
        "guidance_scale": args.guidance_scale, "scheduler": args.scheduler, "model": args.model,
    }.items() if v is not None}
    table = expand(args.template, products, scenes, variants=args.variants, negative_prompt=args.negative,
                   fixed=fixed, products_source=args.products, scenes_source=args.scenes or "scenes")
    write_manifest(table, args.out)
    for warning in fixed_warnings(fixed, list(PRESETS)):
        print(terminal_line(f"warning: {warning}"), file=sys.stderr)
    print(terminal_line(f"wrote {table.num_rows} rows to {args.out}"))
    return EXIT_OK


def cmd_watermark_verify(args) -> int:
    """One line per image on stdout: ok, MISSING (no mark), OTHER (a mark with another payload) or ERROR (the file
    cannot be checked); every image is checked, and the exit is 1 unless all are ok."""
    from actors import watermark as wm
    from jobs.console import log, terminal_line, without_passwords

    from manifests.schema import watermark_payload_problem

    if args.payload == "":
        print("sdfleet watermark verify: error: --payload is empty; give the payload the images were marked with, "
              f"or leave it out to use the one recorded in each PNG (else {wm.DEFAULT_PAYLOAD!r})", file=sys.stderr)
        return EXIT_ERROR
    problem = watermark_payload_problem(args.payload) if args.payload is not None else None
    if problem:
        print(f"sdfleet watermark verify: error: --payload {args.payload!r} {problem}", file=sys.stderr)
        return EXIT_ERROR
    counts = dict.fromkeys(("ok", "MISSING", "OTHER", "ERROR"), 0)
    images = [found for given in args.images for found in _matching_images(given)]

    def check(image: tuple[str, bool]) -> tuple[str, str]:
        uri, matched = image
        return _verify_one(uri, args.payload, wm) if matched else ("ERROR", "no file matches this glob")

    # from an object store several at once, said in order (one at a time, 2,376 on S3 took 93 s, 39 s on a disk)
    pool = ThreadPoolExecutor(max_workers=_verify_workers(images))
    try:
        wm.load_decoder()  # imported once here, not by each thread at once
        for (uri, _), (status, message) in zip(images, pool.map(check, images)):
            counts[status] += 1
            print(terminal_line(without_passwords(f"{status}  {uri}: {message}")), flush=True)
    finally:
        pool.shutdown(cancel_futures=True)  # (a reader gone, `| head`: the rest are not checked)
    if len(images) > 1:
        log(f"{len(images)} image(s): {counts['ok']} ok, {counts['MISSING']} without the mark, "
            f"{counts['OTHER']} with another payload, {counts['ERROR']} could not be checked")
    return EXIT_OK if counts["ok"] == len(images) else EXIT_ERROR


def _verify_workers(images: list[tuple[str, bool]]) -> int:
    """Threads for `watermark verify`, by the first image's store: on an object store as for a run's images
    (jobs.outputs.image_workers), reads being mostly waiting; on a disk one (reading a mark holds the GIL: 200
    images took 4.7 s in one thread, 5.3 s in four, on 2 cores)."""
    from jobs.outputs import image_workers
    from manifests.stores import is_local_fs, url_to_fs

    try:
        fs = url_to_fs(images[0][0])[0] if images else None
    except Exception:  # noqa: BLE001 - a store that cannot be reached: its check says why
        return 1
    return 1 if fs is None or is_local_fs(fs) else image_workers(fs)


def _matching_images(given: str) -> list[tuple[str, bool]]:
    """(image, whether to check it) for what `given` names: itself, or, for a glob that names no file itself
    (quoted, or on an object store, where no shell expands it), the files it matches, sorted, as URIs of its
    store. A glob that matches nothing is `given`, not to be checked; a store that cannot be listed, `given`,
    whose check says why."""
    import fsspec

    from manifests.stores import url_to_fs

    if not fsspec.core.has_magic(given):
        return [(given, True)]
    try:
        fs, path = url_to_fs(given)
        if fs.exists(path):  # a name with `[` or `*` in it, taken as it is
            return [(given, True)]
        found = sorted(p for p in fs.glob(path) if fs.isfile(p))
    except Exception:  # noqa: BLE001 - said by the check of `given` itself
        return [(given, True)]
    return [(p if "://" not in given else fs.unstrip_protocol(p), True) for p in found] or [(given, False)]


def _verify_one(uri: str, payload: str | None, wm) -> tuple[str, str]:
    """(status, the rest of the line) for one image of `watermark verify`."""
    import io
    import warnings

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from actors.png import image_parameters
    from jobs.errors import describe_error, one_line
    from manifests.schema import too_small_for_the_mark, watermark_payload_problem
    from manifests.stores import missing, url_to_fs
    from manifests.text import NOT_AN_IMAGE

    try:
        fs, path = url_to_fs(uri)
        if fs.isdir(path):
            return "ERROR", "is a folder, not an image (give the image files, e.g. DIR/*.png)"
        if missing(fs, path):
            return "ERROR", "does not exist"
        if not fs.isfile(path):  # a pipe would wait forever, a device read without end
            return "ERROR", "is not a regular file (a pipe, socket or device)"
        data = fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - an unreachable store, a denied file: said, and the rest go on
        return "ERROR", f"cannot be read ({describe_error(exc) or one_line(exc)})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # (Pillow said it on the terminal)
            with Image.open(io.BytesIO(data)) as image:
                rgb = np.asarray(image.convert("RGB"))
                recorded = image_parameters(image).get("watermark")
    except UnidentifiedImageError:
        return "ERROR", f"is {NOT_AN_IMAGE}"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # (40 s and 3 GB to read one)
        return "ERROR", f"is not checked: {exc}"
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data after a valid header
        return "ERROR", f"is a corrupt image ({one_line(exc)})"
    h, w = rgb.shape[:2]
    too_small = too_small_for_the_mark(w, h)
    if too_small:
        return "ERROR", f"{too_small.partition(';')[0]}, so it has none"
    # what the file says it carries is only believed where an unmarked image could not read as carrying it
    trusted = isinstance(recorded, str) and not watermark_payload_problem(recorded, blank_ok=True)
    recorded = recorded if trusted else None
    expected = payload or recorded or wm.DEFAULT_PAYLOAD
    found, accuracy = wm.read(rgb, expected.encode())
    try:  # bytes that are no UTF-8 shown as bytes, b'h8\xd4?' (replaced, they read as U+FFFD beside \x1a escapes)
        shown = repr(found.decode("utf-8"))
    except UnicodeDecodeError:
        shown = repr(found)
    if accuracy == 1.0:
        return "ok", f"read {shown}, expected {expected!r}, 100% of bits match"
    if accuracy >= wm.MATCH_THRESHOLD:  # worn by re-encoding or editing; a payload this close reads the same
        return "ok", (f"read {shown}, expected {expected!r}, {accuracy:.0%} of bits match (a mark worn by "
                      "re-encoding or editing, or one whose payload differs from the expected in as few bits)")
    others = (recorded, wm.DEFAULT_PAYLOAD, wm.other_payload(rgb, expected))  # read unknown: a PNG's text stripped
    for other in dict.fromkeys(p for p in others if p and p != expected):
        if wm.read(rgb, other.encode())[1] >= wm.MATCH_THRESHOLD:
            return "OTHER", (f"other payload {other!r}, expected {expected!r} ({accuracy:.0%} of the expected "
                             f"payload's bits match)")
    return "MISSING", f"read {shown}, expected {expected!r}, {accuracy:.0%} of bits match"


def cmd_finetune(args) -> int:
    from jobs.console import log, terminal_line
    from actors.train.config import TrainConfig
    from jobs.finetune import run_finetune

    values = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    try:
        # which flags were given, not only their values: another method's flag is refused even at its default
        context = {"given": args.given & set(TrainConfig.model_fields)} if hasattr(args, "given") else None
        cfg = TrainConfig.model_validate(values, context=context)
    except ValidationError as exc:
        print(f"sdfleet finetune: error: {terminal_line(_config_message(exc))}", file=sys.stderr)
        return EXIT_ERROR
    summary = run_finetune(cfg)
    if summary.get("already_finished"):
        log(f"nothing to train: {cfg.out} holds this fine-tune, finished at step {summary['steps']} on "
            f"{summary.get('finished_at', 'an earlier run')}; its {cfg.method} output is there (a new --out "
            "trains it again)")
        return EXIT_OK
    # as the user spells it (a local folder as a path, not file:///...); finetune.json keeps the URI
    log(f"done in {summary['wall_seconds']:.1f} s: {summary['steps']} steps; {cfg.method} written to {cfg.out}")
    return EXIT_OK


def cmd_dataset_build(args) -> int:
    from jobs.console import log
    from jobs.dataset import build_dataset
    from manifests.dataset import DatasetError
    from manifests.stores import gone_at_exit_reason, process_local

    if process_local(args.out):  # it would be said written, and be gone with this process
        raise DatasetError(gone_at_exit_reason("-o", args.out, "the dataset"))
    summary = build_dataset(args.images, args.out, captions=args.captions, resolution=args.resolution,
                            min_size=args.min_size, log=log)
    log(f"wrote {summary['rows']} samples at {summary['resolution']} px to {args.out}; "
        f"{len(summary['skipped'])} file(s) skipped")
    return EXIT_ROWS if summary["skipped"] else EXIT_OK


def cmd_eval(args) -> int:
    from jobs.console import terminal_line, without_passwords
    from jobs.evaluate import evaluate, report

    summary = evaluate(args.manifests, args.out)
    out = without_passwords(args.out.rstrip("/"))
    contradicting, shared = summary["columns_contradict_prompt"], summary["shared_ids"]
    unclear = summary["not_scored"] - contradicting - shared
    if not summary["scored"]:
        print(terminal_line(f"sdfleet eval: error: nothing to score: {unclear} row(s) name no "
                            f"colour/shape/background (or have an id generate refuses), {shared} share their id "
                            f"with another row, {contradicting} have columns their prompt contradicts, "
                            f"{summary['missing_images']} "
                            f"have no readable image under {out}/images, {summary['images_of_another_prompt']} an "
                            f"image drawn for another prompt, {summary['images_without_parameters']} an image "
                            f"without generate's parameters and {summary['not_ok_in_ledger']} are failed or invalid "
                            "in its ledger"), file=sys.stderr)
        return EXIT_ERROR
    print(report(summary))
    if summary["not_ok_in_ledger"]:
        print(f"not scored: {summary['not_ok_in_ledger']} row(s) failed or invalid in the run's ledger (an image "
              "there is an earlier version's)")
    if summary["images_of_another_prompt"]:
        print(f"not scored: {summary['images_of_another_prompt']} image(s) drawn for another prompt than the "
              "manifest's (the manifest changed since; rerun generate)")
    if shared:
        print(f"not scored: {shared} row(s) whose id another row of these manifests has too (generate draws none "
              "of them)")
    if contradicting:
        first = summary["contradicting_rows"][0]
        said = ", ".join(f"{k} {v!r}" for k, v in first["columns"].items())
        print(terminal_line(f"not scored: {contradicting} row(s) whose color/shape/background columns their prompt "
                            f"contradicts (such as {first['id']!r}: {said}, but its prompt is {first['prompt']!r}): "
                            "the image follows the prompt; correct the columns"))
    if summary["images_without_parameters"]:
        print(f"not scored: {summary['images_without_parameters']} image(s) without the parameters generate "
              "writes in each PNG (not drawn by generate, or re-saved without them)")
    if "not_written" in summary:
        print(f"sdfleet eval: error: {terminal_line(without_passwords(summary['not_written']))}", file=sys.stderr)
        return EXIT_ERROR
    print(terminal_line(f"wrote {out}/eval.json"))
    return EXIT_OK


def cmd_model_export(args) -> int:
    import diffusers
    import transformers

    from actors.models import export_preset
    from jobs.console import log

    for library in (diffusers, transformers):  # their progress bars and notices are not sdfleet's to print
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    export_preset(args.preset, args.directory)
    log(f"wrote preset {args.preset} to {os.path.abspath(os.path.expanduser(args.directory))}")
    return EXIT_OK


if __name__ == "__main__":
    run()
