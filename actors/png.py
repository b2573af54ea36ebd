"""PNG files that carry their generation parameters, encoded fast.

OpenCV's encoder (installed with invisible-watermark) at a low zlib level does the pixels; Pillow builds
the iTXt chunk that holds the parameters as UTF-8 JSON, and that chunk goes in right after the header,
where Pillow's reader (and `read_png_parameters`) finds it. Pillow's own `save` at its default level
costs 4.5-5x as much per image (`python -m benchmarks.bench_finish` measures both).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from actors import opencv

PNG_KEY = "parameters"
# zlib level 1: files ~14% larger than Pillow's default level 6 (benchmarks/bench_finish.py).
LEVEL = 1
_SIGNATURE_AND_HEADER = 8 + 25  # PNG signature, then the IHDR chunk (4 length + 4 type + 13 data + 4 CRC)


def png_bytes(rgb: np.ndarray, parameters: dict[str, Any], level: int = LEVEL) -> bytes:
    """Encode an HxWx3 uint8 RGB image as PNG with `parameters` as UTF-8 JSON in an iTXt chunk."""
    cv2 = opencv.load()
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} image as PNG")
    data = encoded.tobytes()
    chunk = io.BytesIO()
    for cid, body, _ in _parameters_info(parameters).chunks:
        PngImagePlugin.putchunk(chunk, cid, body)
    return data[:_SIGNATURE_AND_HEADER] + chunk.getvalue() + data[_SIGNATURE_AND_HEADER:]


def pillow_png_bytes(rgb: np.ndarray, parameters: dict[str, Any]) -> bytes:
    """The same file through Pillow's `save` at its default level: the encoder `png_bytes` replaced,
    kept as the benchmark's baseline."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=_parameters_info(parameters))
    return buf.getvalue()


def _parameters_info(parameters: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """The parameters as UTF-8 JSON in an iTXt chunk, as Pillow writes it."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PNG_KEY, json.dumps(parameters, ensure_ascii=False, sort_keys=True))
    return info


def parameters_from_text(text: str | bytes) -> dict[str, Any] | None:
    """A parameters chunk's text as a dict; None when it is not a JSON object (damaged, another tool's, or nested
    past Python's stack)."""
    try:
        found = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return found if isinstance(found, dict) else None


def image_parameters(image: Image.Image) -> dict[str, Any]:
    """The generation parameters an open image carries; {} when it has none (another tool's PNG, a JPEG)."""
    text = getattr(image, "text", {}).get(PNG_KEY)
    return (parameters_from_text(text) if text is not None else None) or {}


def read_png_parameters(data: bytes) -> dict[str, Any]:
    """The generation parameters stored in a PNG written by `png_bytes`."""
    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text[PNG_KEY])


def read_parameters_from(fs, path: str) -> dict[str, Any] | None:
    """The parameters chunk of the PNG at `path`, reading only the chunks before the pixels (a few KB, not
    the image); None when the file is not a PNG or carries no parameters. What `generate` uses to tell
    whether an image it finds is the one a row would draw."""
    import struct
    import zlib

    with fs.open(path, "rb", block_size=64 * 1024) as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND"):  # the parameters come before the pixels
                return None
            if kind != b"iTXt":
                f.seek(length + 4, 1)  # the chunk and its CRC
                continue
            body = f.read(length)
            f.seek(4, 1)
            keyword, _, rest = body.partition(b"\0")
            if keyword.decode("latin-1") != PNG_KEY or len(rest) < 2:
                continue
            compressed = rest[0] == 1
            _language, _, rest = rest[2:].partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            try:
                return parameters_from_text(zlib.decompress(text) if compressed else text)
            except zlib.error:
                return None
