"""Decoding images to uint8 arrays of the model's input size, and the cache of decoded images.

JPEG, PNG and any format PIL reads, and DICOM (:mod:`pneumojax.data.dicom`), are made 8-bit
grayscale or RGB, shrunk cheaply when large and resized (:mod:`pneumojax.data.resize`). Decoded,
resized images are cached as ``.npy`` files (DESIGN.md, principle 4). This module also says why a
file cannot be decoded (:func:`_reason`), for the checks and for the errors of
:func:`load_images`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from pneumojax.data._common import DataError, Item, _default_warn, _item_path
from pneumojax.data.resize import RESIZE_METHODS, resize_image
from pneumojax.io import allocate, array_digest, check_space, write_text_atomic
from pneumojax.progress import progress_bar

# DICOM (.dcm, .dicom) is read with pydicom, see pneumojax.data.dicom; any file that holds DICOM
# (the 'DICM' marker after its 128-byte preamble) is read as DICOM, whatever its name.
DICOM_EXTENSIONS = (".dcm", ".dicom")

# Bump when decoding changes, so that stale caches are not reused.
_DECODER_VERSION = "1"

# Images with more pixels are refused as unreadable (16384 x 16384: far beyond any radiograph
# detector; a grayscale image this size takes 256 MiB to decode). PIL's own decompression-bomb
# limit (89 Mpx, a warning; twice that, an error) is raised to this at import so that a large but
# sane image such as 12000 x 12000 decodes quietly; larger ones are refused with a clear reason.
# The limit in force is the package's copy, pneumojax.data.MAX_IMAGE_PIXELS (_max_image_pixels).
MAX_IMAGE_PIXELS = 16384 * 16384
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Images with more pixels than this are shrunk before they are fully decoded and converted (JPEG:
# DCT-scaled decoding via Image.draft; other formats: Image.reduce), so that their decoding needs
# about one byte per stored pixel and no more. Smaller images (every image of the Kaggle set,
# at most ~3000 x 2700) decode exactly as before.
_LARGE_PIXELS = 4096 * 4096


def _max_image_pixels() -> int:
    # Read at call time from the package, which re-exports MAX_IMAGE_PIXELS: messages name
    # pneumojax.data.MAX_IMAGE_PIXELS, so that is where a user changes the limit.
    return sys.modules[__package__].MAX_IMAGE_PIXELS


class _Unusable(Exception):
    """An image file PIL opens but pneumojax refuses; the message is the reason."""


# What PIL's decoders raise on bad files (fuzzing finds all of these); not AssertionError and the
# like, which are bugs rather than bad data.
_DECODE_ERRORS = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    MemoryError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    _Unusable,
)


def _reason(error: BaseException, path: str | os.PathLike) -> str:
    """A short, plain reason for a failure to open or decode ``path``."""
    if isinstance(error, _Unusable):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):  # over PIL's limit (raised at import)
        return f"too large for PIL ({error}); shrink it first"
    if isinstance(error, Image.UnidentifiedImageError):
        try:
            if os.path.getsize(path) == 0:
                return "empty file (0 bytes)"
        except OSError:
            pass
        return "not an image (neither DICOM nor JPEG, PNG or another format PIL can identify)"
    if isinstance(error, OSError) and error.strerror:  # the file system's own error
        return error.strerror[0].lower() + error.strerror[1:]
    text = str(error) or type(error).__name__
    if isinstance(error, (OSError, SyntaxError, EOFError)):  # PIL's ways of saying "broken data"
        return f"corrupt or truncated image data: {text}"
    return f"cannot decode ({type(error).__name__}: {text})"


def decode_image(path: str | os.PathLike, image_size: int, resize: str = "antialias") -> np.ndarray:
    """One image as uint8 ``(S, S, 3)`` RGB, resized (aspect ratio not kept) by ``resize``:
    ``antialias`` (PIL bilinear, antialiased when downscaling) or ``keras`` (exactly
    ``tf.image.resize``'s bilinear without antialiasing, the study's pipeline; see
    :mod:`pneumojax.data.resize`), rounded to uint8.

    Images over 16 Mpx are first shrunk to about twice the output size (JPEG: decoded at reduced
    scale, never in full), so a 12000 x 12000 image needs no more memory than its stored pixels
    (PNG) or a small fraction of that (JPEG). DICOM is decoded in full (pydicom has no
    reduced-scale decoding), made 8-bit (:mod:`pneumojax.data.dicom`) and then shrunk the same
    way (so ``keras`` equals ``tf.image.resize`` of the full image up to 16 Mpx: every image of the
    Kaggle set, at most ~3000 x 2700). Raises PIL's errors for unreadable files
    (:func:`load_images` turns them into :class:`DataError`).
    """
    with open_image(path) as image:
        image = to_8bit_rgb_or_gray(_shrink(image, image_size))
        array = resize_image(image, image_size, resize)
    # Grayscale is resized on one channel (a third of the work) and replicated afterwards.
    return np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array


def decode_image_or_reason(
    path: str | os.PathLike, image_size: int, resize: str = "antialias"
) -> tuple[np.ndarray | None, str | None]:
    """:func:`decode_image` of ``path``, or ``(None, reason)`` with a short, plain reason
    (``"empty file (0 bytes)"``, ``"corrupt or truncated image data: ..."``) when it does not
    decode: what a server answers for a bad upload."""
    try:
        return decode_image(path, image_size, resize), None
    except _DECODE_ERRORS as error:
        return None, _reason(error, path)


def to_8bit_rgb_or_gray(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit ``L`` or ``RGB``, whatever mode it was stored in.

    16-bit and 32-bit integer grayscale is scaled from 0..65535 to 0..255 (PIL's own conversion
    clips instead, which turns most X-rays white); float images are clipped to 0..255. The
    arithmetic runs on blocks of rows, so no float64 copy of the whole image is ever made.
    """
    if image.mode in ("L", "RGB"):
        return image
    if image.mode.startswith("I"):
        # round(v / 257) == (v + 128) // 257 for integers (257 is odd: no ties), clipped to 0..255.
        return _to_8bit(image, lambda a: np.clip((a.astype(np.int64) + 128) // 257, 0, 255))
    if image.mode == "F":
        return _to_8bit(image, lambda a: np.clip(np.rint(a), 0, 255))
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    return image.convert("RGB")  # CMYK, P, RGBA, YCbCr, LAB, ...


def _to_8bit(image: Image.Image, scale: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    array = np.asarray(image)
    out = np.empty(array.shape, np.uint8)
    rows = max(1, (1 << 20) // max(1, array.shape[1]))  # ~1 Mpx per block
    for start in range(0, array.shape[0], rows):
        out[start : start + rows] = scale(array[start : start + rows])
    return Image.fromarray(out, "L")


def open_image(path: str | os.PathLike) -> Image.Image:
    """``Image.open(path)``, refusing images over :data:`MAX_IMAGE_PIXELS` with a clear reason.

    DICOM files are decoded to an 8-bit ``L`` or ``RGB`` image by
    :func:`pneumojax.data.dicom.to_image` (modality LUT, VOI LUT or window, MONOCHROME1 inverted),
    their size checked before their pixel data is read. Raises PIL's errors for files that are no
    image; use it as a context manager.
    """
    if _holds_dicom(path):
        return _open_dicom(path)
    try:
        image = Image.open(path)
    except Image.UnidentifiedImageError:
        if Path(path).suffix.lower() in DICOM_EXTENSIONS and os.path.getsize(path) > 0:
            raise _Unusable(
                "not a DICOM file (no 'DICM' marker after the 128-byte preamble) and no image "
                "PIL can read either"
            ) from None
        raise
    _check_size(*image.size, close=image.close)
    return image


def _check_size(width: int, height: int, close: Callable[[], None] = lambda: None) -> None:
    limit = _max_image_pixels()
    if width * height > limit:
        close()
        raise _Unusable(
            f"too large: {width} x {height} = {width * height:,} pixels, over pneumojax's limit "
            f"of {limit:,} (pneumojax.data.MAX_IMAGE_PIXELS); shrink it first"
        )
    if width < 1 or height < 1:
        close()
        raise _Unusable(f"empty image ({width} x {height} pixels)")


def _holds_dicom(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _open_dicom(path: str | os.PathLike) -> Image.Image:
    from pneumojax.data import dicom  # pydicom is imported only once a DICOM file is met

    try:
        ds = dicom.read(path)
        _check_size(*dicom.size(ds))
        return dicom.to_image(ds)
    except dicom.DicomError as error:
        raise _Unusable(str(error)) from error


def _shrink(image: Image.Image, image_size: int, always: bool = False) -> Image.Image:
    """``image`` reduced cheaply to no less than ``2 * image_size`` a side, when it is large.

    Only images over ``_LARGE_PIXELS`` are touched unless ``always``. JPEG is decoded at a reduced
    scale (``Image.draft``: 1/2, 1/4 or 1/8, never below the target), so the full-size image is
    never in memory; other formats are decoded and then reduced by an integer factor (box filter).
    """
    width, height = image.size
    if not always and width * height <= _LARGE_PIXELS:
        return image
    target = 2 * image_size
    if image.format == "JPEG":
        image.draft(None, (target, target))  # takes effect on load
        return image
    factor = min(width, height) // target
    if factor < 2:
        return image
    try:
        return image.reduce(factor)
    except ValueError:  # modes reduce() lacks (I;16, P, 1): resize, box filter (P/1: nearest)
        size = (max(1, width // factor), max(1, height // factor))
        return image.resize(size, Image.Resampling.BOX)


def load_images(
    items: Sequence[Item] | Sequence[str | os.PathLike],
    image_size: int,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int = 2,
    resize: str = "antialias",
) -> np.ndarray:
    """Decode ``items`` (``(path, label)`` pairs or paths) into uint8 ``(N, S, S, 3)``, in order,
    resized by ``resize`` (see :func:`decode_image`).

    With ``cache_dir`` the array is stored there as ``.npy`` under a key over the image size, the
    resize method and each file's absolute path, size and mtime; a later call with the same
    files returns it memory-mapped read-only without decoding. Decoding runs on ``workers``
    threads (PIL releases the GIL while decoding and resizing).
    """
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize {resize!r}: expected one of {', '.join(RESIZE_METHODS)}")
    paths = [os.path.abspath(_item_path(item)) for item in items]
    if cache_dir is None:
        out = np.empty((len(paths), image_size, image_size, 3), np.uint8)
        _decode_into(out, paths, image_size, progress, workers, resize)
        return out
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(paths, image_size, resize)
    cache_file = cache_dir / f"images-{image_size}px-{resize}-{len(paths)}-{key}.npy"
    expected_shape = (len(paths), image_size, image_size, 3)
    if cache_file.exists():
        cached, problem = _open_cache(cache_file, expected_shape)
        if cached is not None:
            return cached
        _default_warn(f"image cache {cache_file} is damaged ({problem}): decoding the images again")
    _write_cache(cache_file, expected_shape, paths, image_size, progress, workers, resize)
    return np.load(cache_file, mmap_mode="r")


def _digest_file(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.name + ".sha256")


def _open_cache(cache_file: Path, shape: tuple) -> tuple[np.ndarray | None, str]:
    """The cached array, memory-mapped, if it is whole: the expected shape and dtype, and the
    SHA-256 of its pixels equal to the one written beside it when it was complete (a
    truncated, zero-filled or overwritten file fails one of these). Else (None, why)."""
    try:
        cached = np.load(cache_file, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:
        return None, f"unreadable: {error}"
    if cached.shape != shape or cached.dtype != np.uint8:
        return None, f"holds {cached.dtype} {cached.shape}, expected uint8 {shape}"
    try:
        expected = _digest_file(cache_file).read_text().strip()
    except OSError:
        return None, "no checksum beside it (written by an older pneumojax, or cut short)"
    if array_digest(cached) != expected:
        return None, "its pixels do not match the checksum written with it"
    return cached, ""


def image_set_key(paths: Sequence[str], image_size: int, resize: str = "antialias") -> str:
    """Identifies decoded images: file paths, sizes and mtimes, the output size and the resize
    method."""
    return _cache_key(paths, image_size, resize)


def _cache_key(paths: Sequence[str], image_size: int, resize: str) -> str:
    return _key(f"pneumojax-images:{_DECODER_VERSION}:{image_size}:{resize}", paths)


def _key(header: str, paths: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{header}\n".encode())
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise DataError(
                f"cannot read image file {path}: {_reason(error, path)}\n"
                "the data folder changed after the images were listed: check it and run again"
            ) from error
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _write_cache(
    cache_file: Path,
    shape: tuple,
    paths: Sequence[str],
    image_size: int,
    progress: bool,
    workers: int,
    resize: str,
) -> None:
    # Decode straight into a memory-mapped temp file (no second copy in RAM), then publish it
    # with an atomic rename so a reader never sees a half-written cache. Its blocks are
    # allocated first: a full disk is an error now, not a SIGBUS in the middle of decoding.
    check_space(cache_file.parent, math.prod(shape) + 4096)
    fd, tmp_name = tempfile.mkstemp(
        prefix=cache_file.name + ".", suffix=".tmp", dir=cache_file.parent
    )
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp_name, mode="w+", dtype=np.uint8, shape=shape)
        allocate(tmp_name)
        _decode_into(out, paths, image_size, progress, workers, resize)
        out.flush()
        digest = array_digest(out)
        del out
        # the checksum first, then the array: a cache file is only ever used with its own
        write_text_atomic(_digest_file(cache_file), digest + "\n")
        os.replace(tmp_name, cache_file)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _decode_into(
    out: np.ndarray,
    paths: Sequence[str],
    image_size: int,
    progress: bool,
    workers: int,
    resize: str = "antialias",
) -> None:
    def decode(path: str) -> np.ndarray:
        try:
            return decode_image(path, image_size, resize)
        except _DECODE_ERRORS as error:
            raise DataError(
                f"cannot decode {path}: {_reason(error, path)}\n"
                "remove or replace the file (pneumojax.data.check_images finds all such files)"
            ) from error

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        decoded = pool.map(decode, paths)  # map yields in input order
        bar = progress_bar(
            decoded,
            total=len(paths),
            desc=f"decoding {image_size}px",
            unit="img",
            disable=not progress,
        )
        for index, image in enumerate(bar):
            out[index] = image
    finally:
        # On an error, do not decode the rest of a large set before reporting it.
        pool.shutdown(wait=True, cancel_futures=True)
