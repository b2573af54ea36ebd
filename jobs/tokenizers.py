"""Tokenizers for counting prompt tokens on the driver, one per model, loaded on first use."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path


def tokenizer_lookup(infos: dict):
    """A function model name -> tokenizer: the model's own, so a prompt's count is the one `generate` finds.

    Presets share the built-in tokenizer. A local directory's `tokenizer/` is loaded where it is; a model in a
    store (s3://, gs://, ...) has only its `tokenizer/` folder fetched (a few hundred KB, not the weights). A
    hub id's is asked of the hub (its cache first); where that fails, the lookup gives None: that model's
    prompts are not counted, rather than counted with another model's vocabulary (the built-in one spells
    ordinary English letter by letter, and counted SD 2.1 prompts ~2-3x too long).
    """
    from actors.presets import TOKENIZER_DIR
    from actors.tokenizer import load_tokenizer

    @functools.cache
    def lookup(name: str):
        from transformers.utils import logging as library_log

        library_log.set_verbosity_error()  # its notices (a torchvision it would use for images) are not ours to say
        info = infos[name]
        if info.kind == "preset":
            return load_tokenizer(TOKENIZER_DIR)
        if info.kind == "hub":  # at the revision the model was described at (its fingerprint: hub:REPO@SHA)
            return _hub_tokenizer(info.ref, info.fingerprint.rpartition("@")[2])
        if info.kind == "uri":
            with tempfile.TemporaryDirectory(prefix="sdfleet-tokenizer-") as folder:
                _fetch_tokenizer(name, info.ref, Path(folder))
                return _load(name, info.ref, Path(folder), f"{info.ref.rstrip('/')}/tokenizer")
        folder = Path(info.ref.removeprefix("file://")) / "tokenizer"
        return _load(name, info.ref, folder, str(folder)) if folder.is_dir() else load_tokenizer(TOKENIZER_DIR)

    return lookup


def _load(name: str, ref: str, folder: Path, shown: str):
    from transformers import CLIPTokenizer

    from actors.models import ModelError
    from manifests.schema import error_line

    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - damaged JSON, a missing vocabulary: many kinds
        raise ModelError(f"model {name}={ref}: its tokenizer ({shown}) does not load "
                         f"({error_line(exc)}); the model would not load either: export or copy it again") from exc


def _fetch_tokenizer(name: str, ref: str, into: Path) -> None:
    """Copy the files of `ref`/tokenizer (a model folder in a store) into the local folder `into`."""
    from actors.models import ModelError
    from manifests.schema import error_line
    from manifests.stores import folder_files, url_to_fs

    try:
        fs, root = url_to_fs(ref)
        files = folder_files(fs, f"{root.rstrip('/')}/tokenizer")
        for path in files:
            fs.get_file(path, str(into / path.rstrip("/").rsplit("/", 1)[-1]))
    except Exception as exc:  # noqa: BLE001 - a store that does not answer, a denied read: said as the model's
        raise ModelError(f"model {name}={ref}: its tokenizer folder cannot be read ({error_line(exc)})") from exc
    if not files:
        raise ModelError(f"model {name}={ref} has no tokenizer/ folder: the model would not load either")


def _hub_tokenizer(repo: str, revision: str):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer", revision=revision)
    except Exception:  # noqa: BLE001 - offline, gated, not a diffusers repo: not counted, said by the caller
        return None
