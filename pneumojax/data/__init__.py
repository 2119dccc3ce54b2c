"""Chest X-ray image folders: discovery, patient-grouped splits, decoding with a cache, demo data.

One module per concern; this package re-exports their public names (``from pneumojax import
data``, then ``data.find_images``, ``data.make_splits``, ...):

* :mod:`~pneumojax.data.layouts`: finding images, the ``kaggle`` and ``flat`` folder layouts;
* :mod:`~pneumojax.data.checks`: unreadable images, identical files across splits;
* :mod:`~pneumojax.data.patients`: the patient of a file, read from its name;
* :mod:`~pneumojax.data.splits`: patient-grouped train/val/test splits;
* :mod:`~pneumojax.data.decode`: decoding and resizing to uint8 arrays, the decoded-image cache,
  with :mod:`~pneumojax.data.dicom` (DICOM, imported only once a DICOM file is met) and
  :mod:`~pneumojax.data.resize` (the two resize methods);
* :mod:`~pneumojax.data.demo`: the synthetic demo data set;
* :mod:`~pneumojax.data._common`: the item type, the error and warning types, message helpers.

Splits are made by whole patients (the patient is read from the file name, see
:func:`patient_id`), so that no patient is in two splits (DESIGN.md, principle 6). Decoded, resized
images are cached as ``.npy`` files (principle 4).

Bad input gets a clear error: every :class:`DataError` says what is wrong and what to do in one or
two lines. Unreadable images (truncated, corrupt, not an image at all, too large) are found by
:func:`check_images` before any split is made and skipped with one warning (or, with
``strict=True``, stop everything with a :class:`DataError` naming the first), so that splits,
labels and cached arrays only ever hold images that decode.

``MAX_IMAGE_PIXELS`` here is the pixel limit in force: set it on this package to change it.
"""

from __future__ import annotations

from pneumojax.data._common import DataError, DataWarning, Item, Warn
from pneumojax.data.checks import check_images, duplicates_across_splits, image_problem
from pneumojax.data.decode import (
    DICOM_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    decode_image,
    decode_image_or_reason,
    image_set_key,
    load_images,
    open_image,
    to_8bit_rgb_or_gray,
)
from pneumojax.data.demo import demo_opacity_masks, make_demo_dataset
from pneumojax.data.layouts import (
    CLASS_NAMES,
    IMAGE_EXTENSIONS,
    KAGGLE_SPLITS,
    DataSource,
    find_images,
)
from pneumojax.data.patients import patient_id
from pneumojax.data.splits import Splits, make_splits, shared_patients

__all__ = [
    "CLASS_NAMES",
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "KAGGLE_SPLITS",
    "MAX_IMAGE_PIXELS",
    "DataError",
    "DataSource",
    "DataWarning",
    "Item",
    "Splits",
    "Warn",
    "check_images",
    "decode_image",
    "decode_image_or_reason",
    "duplicates_across_splits",
    "find_images",
    "image_problem",
    "image_set_key",
    "load_images",
    "demo_opacity_masks",
    "make_demo_dataset",
    "make_splits",
    "open_image",
    "patient_id",
    "shared_patients",
    "to_8bit_rgb_or_gray",
]
