"""Invisible watermark (invisible-watermark's `dwtDctSvd`): embed a text payload, read it back.

`dwtDctSvd` hides bits in the singular values of DCT blocks of the image's DWT band. The plain `dwtDct`
is 4x faster but loses the mark on flat, bright images: on `tiny`'s clean shapes on a white background
it read back only 62-70% of the bits. Both refuse images of fewer pixels than 256x256, so smaller sizes
cannot carry a mark and generation says so instead of silently skipping it.

The library embeds block by block in Python (~0.1 s for a 768 px image alone, 0.3-0.4 s beside other
threads). `embed` computes the same mark with whole-array numpy: the Haar approximation band of the U
channel, then one batched SVD of all its 4x4 blocks. The library takes each block's SVD after an
orthonormal DCT, which leaves singular values unchanged and rotates the singular vectors, so moving the
top singular value of the block itself changes the same pixels. The library's own decoder reads what
`embed` writes; tests hold its pixels within a stated tolerance of the library's encoder.

A mark is lost where pixels clip: on white (or black) backgrounds the U-channel change pushes RGB past
255 (below 0) and the clip erases it. `embed_checked` reads every mark back and, only if bits are lost,
compresses the extremes by a few levels (a knee that leaves mid-tones alone) until all bits read back.
"""

from __future__ import annotations

import numpy as np

from actors import opencv
from manifests.schema import WATERMARK_MATCH as MATCH_THRESHOLD
from manifests.schema import (WATERMARK_MAX_BYTES, WATERMARK_MIN_BYTES, too_small_for_the_mark,
                              watermark_payload_problem)

METHOD = "dwtDctSvd"
OLDER_METHODS = ("dwtDct",)  # what images drawn before 2026-11-27 carry; verify still reads them
DEFAULT_PAYLOAD = "sdfleet"
# The library's dwtDctSvd settings: only the U channel (YUV index 1) carries the mark, quantised in steps
# of 36 on the top singular value of each 4x4 block of the Haar approximation band.
SCALE = 36.0
BLOCK = 4
# Levels kept free at each end of the range when a mark does not read back whole; tried in order, the
# first that reads back every bit wins (0: the image as drawn).
HEADROOM_STEPS = (0, 2, 3, 4, 6, 8, 12, 16)


class WatermarkError(ValueError):
    """The image cannot carry the watermark (too small, empty payload)."""


def _payload_bytes(payload: str | bytes) -> bytes:
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    if not data:
        raise WatermarkError("watermark payload is empty")
    return data


def _payload_bits(payload: str | bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(_payload_bytes(payload), np.uint8))


def _check_size(rgb: np.ndarray) -> None:
    too_small = too_small_for_the_mark(rgb.shape[1], rgb.shape[0])
    if too_small:
        raise WatermarkError(too_small)


def _u_channel(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(YUV image as OpenCV converts it, its U channel cropped to multiples of 4 as float64)."""
    cv2 = opencv.load()
    yuv = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, ::-1]), cv2.COLOR_BGR2YUV)
    h, w = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    return yuv, yuv[:h, :w, 1].astype(np.float64)


def _blocks(u: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The 4x4 blocks of the Haar approximation band of `u`, row by row as the library walks them."""
    ll = (u[0::2, 0::2] + u[0::2, 1::2] + u[1::2, 0::2] + u[1::2, 1::2]) / 2.0  # pywt's haar cA
    rows, cols = ll.shape[0] // BLOCK, ll.shape[1] // BLOCK
    blocks = ll[:rows * BLOCK, :cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK).swapaxes(1, 2)
    return blocks.reshape(-1, BLOCK, BLOCK), (rows, cols)


def embed(rgb: np.ndarray, payload: str | bytes) -> np.ndarray:
    """Return a copy of an HxWx3 uint8 RGB image carrying `payload` (dwtDctSvd, computed with numpy)."""
    _check_size(rgb)
    bits = _payload_bits(payload)
    yuv, u = _u_channel(rgb)
    blocks, (rows, cols) = _blocks(u)
    # Move each block's top singular value to the middle of the lower (bit 0) or upper (bit 1) half of its
    # quantisation step: the library's s[0] = (s[0] // scale + 0.25 + 0.5 * bit) * scale.
    left, sing, right = np.linalg.svd(blocks)
    top = sing[:, 0]
    want = bits[np.arange(len(top)) % len(bits)]
    moved = (np.floor(top / SCALE) + 0.25 + 0.5 * want) * SCALE
    change = (moved - top)[:, None, None] * left[:, :, :1] * right[:, :1, :]
    band = np.zeros((u.shape[0] // 2, u.shape[1] // 2))
    band[:rows * BLOCK, :cols * BLOCK] = change.reshape(rows, cols, BLOCK, BLOCK).swapaxes(1, 2).reshape(
        rows * BLOCK, cols * BLOCK)
    # The inverse Haar step spreads a change of the approximation band by half over its 2x2 pixels. The
    # library hands pywt.idwt2 the detail bands as (v, h, d) where dwt2 gave (h, v, d), which swaps the
    # off-diagonal pixels of every 2x2 cell of U; done here too, so the pixels match the library's.
    half = band / 2.0
    out = np.empty_like(u)
    out[0::2, 0::2] = u[0::2, 0::2] + half
    out[0::2, 1::2] = u[1::2, 0::2] + half
    out[1::2, 0::2] = u[0::2, 1::2] + half
    out[1::2, 1::2] = u[1::2, 1::2] + half
    yuv[:u.shape[0], :u.shape[1], 1] = np.clip(np.floor(out), 0, 255).astype(np.uint8)
    cv2 = opencv.load()
    return np.ascontiguousarray(cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)[:, :, ::-1])


def _votes(rgb: np.ndarray) -> np.ndarray:
    """Each block's vote for the payload bit it carries (1.0 or 0.0), as the library's decoder reads them."""
    _, u = _u_channel(rgb)
    blocks, _ = _blocks(u)
    top = np.linalg.svd(blocks, compute_uv=False)[:, 0]
    return (np.mod(top, SCALE) > SCALE * 0.5).astype(np.float64)


def decode_bits(rgb: np.ndarray, num_bits: int) -> np.ndarray:
    """The payload bits the library's dwtDctSvd decoder reads from an RGB image (one vote per block)."""
    votes = _votes(rgb)
    index = np.arange(len(votes)) % num_bits
    share = np.bincount(index, weights=votes, minlength=num_bits) / np.bincount(index, minlength=num_bits)
    return (share * 255 > 127).astype(np.uint8)


# `other_payload`'s bars. A guess of the expected payload's length may agree as little as a busy or re-encoded
# image's mark does (0.57 on noise marked by invisible-watermark itself, 0.9 on a JPEG copy): 3 votes in 4 for
# each bit's majority on average, and CHANCE_MARGIN times what independent votes agree by chance. Its bits that
# differ from the expected payload must then vote as firmly as the rest (OWN_STRENGTH): in a worn mark of the
# expected payload the flipped bits are the weak ones (their strength at most 0.69 of the rest's over 102 worn
# copies, JPEG 60-70 and WebP 70-80; 0.98-1.01 for a real other payload). A guess of another length has nothing
# to be weighed against, so it must agree on MATCH_THRESHOLD, as a clean mark does.
GUESS_AGREEMENT = 0.5
CHANCE_MARGIN = 4.0
OWN_STRENGTH = 0.85


def other_payload(rgb: np.ndarray, expected: str, min_votes: int = 4) -> str | None:
    """The dwtDctSvd payload other than `expected` that `rgb` carries, read without knowing it (for `watermark
    verify` to tell "another payload" from "no mark", where a PNG's text was stripped), or None: no mark, a worn
    mark of `expected`, or nothing that can be told apart from either.

    The mark repeats its bits block after block, so at the payload's own length each bit's votes agree.
    Agreement is the mean over bits of |2 * share - 1| (1: every vote the same). Of the lengths a payload may
    have (WATERMARK_MIN_BYTES to WATERMARK_MAX_BYTES, each bit on at least `min_votes` blocks), the shortest
    that agrees about as well as the best is read (a payload's multiples agree as well); it must be a valid
    payload (printable UTF-8, watermark_payload_problem) and pass the bars above."""
    votes = _votes(rgb)
    reads = {}
    for n in range(WATERMARK_MIN_BYTES, min(WATERMARK_MAX_BYTES, len(votes) // (8 * min_votes)) + 1):
        index = np.arange(len(votes)) % (8 * n)
        counts = np.bincount(index)
        share = np.bincount(index, weights=votes) / counts
        chance = float(np.sqrt(2 / (np.pi * counts.mean())))  # independent votes, at random
        reads[n] = (float(np.abs(2 * share - 1).mean()), share, chance)
    if not reads:
        return None
    best = max(agree for agree, _, _ in reads.values())
    n, (agree, share, chance) = next((n, r) for n, r in reads.items() if r[0] >= best - 0.02)
    bits = (share > 0.5).astype(np.uint8)
    try:
        text = np.packbits(bits).tobytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text == expected or not text.isprintable() or watermark_payload_problem(text):
        return None
    if n != len(expected.encode()):
        return text if agree >= MATCH_THRESHOLD else None
    if agree < max(GUESS_AGREEMENT, CHANCE_MARGIN * chance):
        return None
    differ = bits != _payload_bits(expected)
    if differ.mean() <= 1 - MATCH_THRESHOLD:  # as close as a worn read of `expected` itself (verify says so)
        return None
    strength = np.abs(2 * share - 1)
    return text if strength[differ].mean() >= OWN_STRENGTH * strength[~differ].mean() else None


def bits_read(rgb: np.ndarray, payload: str | bytes) -> float:
    """Share of `payload`'s bits that the dwtDctSvd decoder reads back from `rgb` (1.0: all of them)."""
    bits = _payload_bits(payload)
    return float((decode_bits(rgb, len(bits)) == bits).mean())


def with_headroom(rgb: np.ndarray, levels: int) -> np.ndarray:
    """`rgb` with its top and bottom `4 * levels` levels squeezed into `3 * levels`: 255 becomes
    255 - levels and 0 becomes levels; values between 4 * levels and 255 - 4 * levels are unchanged."""
    if levels <= 0:
        return rgb
    knee = 4 * levels
    x = np.arange(256, dtype=np.float64)
    lut = np.where(x > 255 - knee, (255 - knee) + (x - (255 - knee)) * 0.75, x)
    lut = np.where(x < knee, levels + x * 0.75, lut)
    return np.rint(lut).astype(np.uint8)[rgb]


def embed_checked(rgb: np.ndarray, payload: str | bytes) -> tuple[np.ndarray, float, int]:
    """(marked image, share of bits read back, headroom levels used): the least headroom that reads back
    every bit, or, if none does, the try that read back the most."""
    best = None
    for levels in HEADROOM_STEPS:
        marked = embed(with_headroom(rgb, levels), payload)
        share = bits_read(marked, payload)
        if best is None or share > best[1]:
            best = (marked, share, levels)
        if share == 1.0:
            break
    return best


def library_embed(rgb: np.ndarray, payload: str | bytes) -> np.ndarray:
    """The same mark through invisible-watermark's own encoder: the reference `embed` is tested against."""
    opencv.load()
    from imwatermark import WatermarkEncoder  # here, not at the top: the package imports torch (for RivaGAN)

    _check_size(rgb)
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", _payload_bytes(payload))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # the library works in OpenCV's BGR order
    return np.ascontiguousarray(encoder.encode(bgr, METHOD)[:, :, ::-1])


def load_decoder() -> None:
    """Import invisible-watermark's decoder, saying what OpenCV lacks (imwatermark imports cv2 itself); not at
    the top of this module: the package imports torch (for RivaGAN). Once before threads read marks."""
    opencv.load()
    import imwatermark  # noqa: F401


def read_bits(rgb: np.ndarray, num_bytes: int, method: str = METHOD) -> bytes:
    """Decode `num_bytes` of payload from an RGB image (garbage if it carries no mark)."""
    load_decoder()
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", num_bytes * 8)
    return bytes(decoder.decode(np.ascontiguousarray(rgb[:, :, ::-1]), method))


def bit_accuracy(found: bytes, expected: bytes) -> float:
    """Share of payload bits read back right: 1.0 is a perfect read, ~0.5 is no mark."""
    if len(found) != len(expected) or not expected:
        return 0.0
    same = sum(8 - bin(a ^ b).count("1") for a, b in zip(found, expected))
    return same / (8 * len(expected))


def read(rgb: np.ndarray, payload: bytes) -> tuple[bytes, float]:
    """(what was read, share of `payload`'s bits that match), by METHOD, else by the best of OLDER_METHODS."""
    reads = []
    for method in (METHOD, *OLDER_METHODS):
        found = read_bits(rgb, len(payload), method)
        reads.append((found, bit_accuracy(found, payload)))
        if reads[-1][1] >= MATCH_THRESHOLD:
            break
    return max(reads, key=lambda read: read[1])
