"""DICOM radiographs as 8-bit images, the way a viewer shows them.

For grayscale (``MONOCHROME1``/``MONOCHROME2``) the chain of PS3.3 C.11 runs on the stored values:

1. the modality LUT: *Modality LUT Sequence* or *Rescale Slope*/*Rescale Intercept*
   (:func:`pydicom.pixels.apply_modality_lut`);
2. the VOI: the first *VOI LUT Sequence* item, else the first *Window Center*/*Window Width*
   with its *VOI LUT Function* (LINEAR, LINEAR_EXACT, SIGMOID; :func:`pydicom.pixels.apply_voi_lut`),
   whose output range (everything below the window to everything above it) is mapped onto
   0..255. A file with neither, or with an unusable window (width below 1), is scaled from the
   image's own minimum..maximum after the modality LUT to 0..255 (min-max), except 8-bit stored
   values with no modality LUT, which are display values already and are kept as they are (so an
   8-bit image written losslessly to DICOM decodes to its own pixels);
3. ``MONOCHROME1`` (low values are white) is inverted, ``255 - v``, so that bone is bright in
   every image, as in the Kaggle JPEGs.

*Presentation LUT Shape* and *Pixel Padding Value* are not applied. Colour images (``RGB``,
``YBR_*``, which pydicom converts to RGB, and ``PALETTE COLOR`` through its palette) are scaled
from their *Bits Stored* to 8 bits; the modality and VOI LUTs do not apply to colour (PS3.3 C.11).

Compressed transfer syntaxes are decoded by pydicom's plugins: RLE and deflate always, JPEG
baseline/extended 8-bit and JPEG 2000 through Pillow; the others (JPEG lossless, 12-bit JPEG,
JPEG-LS, HTJ2K) need an extra package, which the error names (:data:`CODEC_PACKAGES`).
The arithmetic runs on blocks of rows, so no float64 copy of a whole image is ever made.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

# pip packages that add a decoder for a compressed transfer syntax (pydicom's own message names
# import names, such as "gdcm" for the pip package python-gdcm).
CODEC_PACKAGES = {
    **dict.fromkeys(uid.JPEGTransferSyntaxes, "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    **dict.fromkeys(uid.JPEGLSTransferSyntaxes, "pyjpegls (or python-gdcm)"),
    **dict.fromkeys(uid.JPEG2000TransferSyntaxes, "pylibjpeg pylibjpeg-openjpeg"),
}

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_BLOCK_PIXELS = 1 << 20  # pixels per block of rows: float64 temporaries stay near 8 MiB


class DicomError(Exception):
    """A DICOM file that pneumojax cannot use; the message is the reason, in one line."""


def read(path: str | os.PathLike) -> pydicom.Dataset:
    """The DICOM data set at ``path``, its pixel data not yet read (it is read on decoding)."""
    try:
        # Large values (the pixel data) are read only when used: the size can be checked first.
        return pydicom.dcmread(os.fspath(path), defer_size="1 MB")
    except pydicom.errors.InvalidDicomError as error:
        raise DicomError(f"not a DICOM file ({error})") from error
    except (OSError, MemoryError):
        raise
    except Exception as error:  # pydicom's parser on damaged files: many kinds, all bad data
        raise DicomError(f"corrupt DICOM file: {_one_line(error)}") from error


def size(ds: pydicom.Dataset) -> tuple[int, int]:
    """``(width, height)`` of the image in ``ds``, from *Columns* and *Rows*."""
    if not any(tag in ds for tag in _PIXEL_TAGS):
        kind = ds.SOPClassUID.name if "SOPClassUID" in ds else "no SOP class"
        raise DicomError(f"DICOM file without pixel data ({kind}), not an image")
    try:
        return int(ds.Columns), int(ds.Rows)
    except (AttributeError, TypeError, ValueError) as error:
        raise DicomError("DICOM file without a valid image size (Rows, Columns)") from error


def to_image(ds: pydicom.Dataset) -> Image.Image:
    """The image in ``ds`` as an 8-bit PIL image, mode ``L`` or ``RGB`` (see the module doc)."""
    size(ds)
    frames = ds.get("NumberOfFrames", 1)
    if int(frames or 1) > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames); pneumojax reads single images")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    pixels = _pixels(ds)
    if photometric in ("MONOCHROME1", "MONOCHROME2") and pixels.ndim == 2:
        gray = _gray_to_8bit(pixels, ds)
        if photometric == "MONOCHROME1":
            np.subtract(255, gray, out=gray)
        return Image.fromarray(gray, "L")
    if photometric == "PALETTE COLOR" and pixels.ndim == 2:
        pixels = _pydicom(apply_color_lut, pixels, ds)
        bits = 8 * pixels.dtype.itemsize  # the palette's entries span their whole type
    else:
        bits = int(ds.get("BitsStored") or 8 * pixels.dtype.itemsize)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise DicomError(
            f"unsupported DICOM image: PhotometricInterpretation {photometric or 'missing'!r} "
            f"with pixel array shape {pixels.shape}"
        )
    return Image.fromarray(_color_to_8bit(pixels, bits), "RGB")


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None:
        raise DicomError("DICOM file without a Transfer Syntax UID (0002,0010) in its file meta")
    syntax = uid.UID(str(syntax))
    name = f"{syntax.name} ({syntax})" if syntax.name != str(syntax) else str(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as error:
        raise DicomError(
            f"pixel data in transfer syntax {name}, which pydicom cannot decode"
        ) from error
    if not decoder.is_available:
        packages = CODEC_PACKAGES.get(syntax)
        how = f"pip install {packages}" if packages else "; ".join(decoder.missing_dependencies)
        raise DicomError(f"pixel data compressed as {name} needs a decoder: {how}")
    try:
        pixels = ds.pixel_array
    except MemoryError:
        raise
    except Exception as error:  # truncated or damaged pixel data, or a plugin that refuses it
        reason = f"corrupt or undecodable pixel data ({name}): {_one_line(error)}"
        if syntax in CODEC_PACKAGES:  # Pillow refuses 12-bit JPEG, say; another plugin may not
            reason += f"; another decoder may read it: pip install {CODEC_PACKAGES[syntax]}"
        raise DicomError(reason) from error
    for tag in _PIXEL_TAGS:  # the encoded bytes are not needed any more: free them now
        if tag in ds:
            delattr(ds, tag)
    return pixels


def _gray_to_8bit(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    def modality(block):
        return _pydicom(apply_modality_lut, block, ds)

    voi = _voi(ds)
    if voi is None and _display_values(pixels, ds):
        return pixels.copy()
    if voi is None:  # no VOI: the image's own range after the modality LUT
        transform = modality
        ranges = [(np.min(v), np.max(v)) for _, v in _row_blocks(pixels, modality)]
        low, high = float(min(r[0] for r in ranges)), float(max(r[1] for r in ranges))
    else:
        function, low, high = voi

        def transform(block):
            return function(modality(block))

    scale = 255.0 / (high - low) if high != low else 0.0
    out = np.empty(pixels.shape, np.uint8)
    for rows, values in _row_blocks(pixels, transform):
        out[rows] = np.clip(np.rint((np.asarray(values, np.float64) - low) * scale), 0, 255)
    return out


def _display_values(pixels: np.ndarray, ds: pydicom.Dataset) -> bool:
    """Whether ``pixels`` are 8-bit values that no modality LUT changes."""
    if pixels.dtype != np.uint8 or int(ds.get("BitsStored") or 8) != 8:
        return False
    if ds.get("ModalityLUTSequence"):
        return False
    slope, intercept = ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)
    return float(1 if slope is None else slope) == 1 and float(intercept or 0) == 0


def _voi(ds: pydicom.Dataset) -> tuple[Callable, float, float] | None:
    """``(function, low, high)``: the VOI transform and the values it maps to 0 and 255."""
    item = (ds.get("VOILUTSequence") or [None])[0]
    if item is not None and None not in (item.get("LUTDescriptor"), item.get("LUTData")):
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 1 << 16
        if bits == 8 and first + entries > 256:
            # pydicom 3.0.2 computes the table index in the entries' own type, so an index over
            # 255 wraps for 8-bit entries; 16-bit entries hold the same values without that.
            item.LUTDescriptor = [item.LUTDescriptor[0], first, 16]

        def lut(values):  # a table: indexed by integers
            return _pydicom(apply_voi_lut, np.rint(values).astype(np.int64), ds, prefer_lut=True)

        table = lut(np.arange(first, first + entries))
        return lut, float(table.min()), float(table.max())
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None

    def window(values):
        return _pydicom(apply_voi_lut, values, ds, prefer_lut=False)

    # pydicom maps the window onto an output range of its own choosing (that of the stored or
    # rescaled values); values far below and above the window give that range's two ends.
    try:
        with np.errstate(over="ignore"):
            low, high = window(np.array([-1e300, 1e300]))
    except DicomError:  # an unusable window (width < 1, unknown function): min..max instead
        return None
    return window, float(low), float(high)


def _color_to_8bit(pixels: np.ndarray, bits: int) -> np.ndarray:
    if pixels.dtype == np.uint8 and bits == 8:
        return pixels
    scale = 255.0 / (2**bits - 1)
    out = np.empty(pixels.shape, np.uint8)
    for rows, block in _row_blocks(pixels):
        out[rows] = np.clip(np.rint(block * scale), 0, 255)
    return out


def _row_blocks(pixels: np.ndarray, function: Callable = lambda block: block):
    """``(rows, function(pixels[rows]))`` for blocks of ~1 Mpx, top to bottom."""
    step = max(1, _BLOCK_PIXELS // max(1, int(np.prod(pixels.shape[1:]))))
    for start in range(0, len(pixels), step):
        rows = slice(start, start + step)
        yield rows, function(pixels[rows])


def _pydicom(function: Callable, *args, **kwargs) -> np.ndarray:
    """A pydicom LUT function; its errors on bad LUT or window values become :class:`DicomError`."""
    try:
        return function(*args, **kwargs)
    except MemoryError:
        raise
    except Exception as error:
        raise DicomError(f"unusable {function.__name__} values: {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    """pydicom's message on one line (it lists each plugin's failure on a line of its own)."""
    return " ".join(str(error).split()) or type(error).__name__
