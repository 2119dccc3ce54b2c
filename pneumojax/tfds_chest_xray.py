"""TFDS builder for "Chest X-Ray Images (Pneumonia)" (Kermany, Zhang, Goldbaum 2018).

The data must be downloaded by hand (see ``MANUAL_DOWNLOAD_INSTRUCTIONS``).

Usage::

    import tensorflow_datasets as tfds
    from pneumojax.tfds_chest_xray import ChestXrayPneumonia

    builder = ChestXrayPneumonia(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="~/Downloads/chest-xray-pneumonia"))
    train = builder.as_dataset(split="train")

The files are found with :func:`pneumojax.data.find_images` and patients named with
:func:`pneumojax.data.patient_id`, so the TFDS splits hold exactly what the rest of pneumojax sees.
The splits are the official folders (``val`` is the official 16-image one); carve a
patient-grouped validation split with :func:`pneumojax.data.make_splits` for honest evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pneumojax import data

_CITATION = """\
@article{kermany2018identifying,
  title   = {Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning},
  author  = {Kermany, Daniel S. and Goldbaum, Michael and Cai, Wenjia and others},
  journal = {Cell},
  volume  = {172},
  number  = {5},
  pages   = {1122--1131},
  year    = {2018},
  doi     = {10.1016/j.cell.2018.02.010}
}
@misc{kermany2018data,
  title     = {Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for
               Classification},
  author    = {Kermany, Daniel S. and Zhang, Kang and Goldbaum, Michael},
  publisher = {Mendeley Data},
  version   = {2},
  year      = {2018},
  doi       = {10.17632/rscbjbr9sj.2},
  note      = {License: CC BY 4.0}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the data set by hand (it needs a Kaggle login, or comes from Mendeley Data):

* Kaggle: https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia
  (`kaggle datasets download -d paultimothymooney/chest-xray-pneumonia`), or
* Mendeley Data, doi:10.17632/rscbjbr9sj.2 (https://data.mendeley.com/datasets/rscbjbr9sj/2),
  file ChestXRay2017.zip.

Unpack it into the manual folder (`manual_dir`, by default ~/tensorflow_datasets/downloads/manual/)
so that `<manual_dir>/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/` exists. The folders
`{train,val,test}/` placed directly in `<manual_dir>` are accepted too.
License: CC BY 4.0 (Kermany, Zhang, Goldbaum 2018); attribution is required.
"""


class ChestXrayPneumonia(tfds.core.GeneratorBasedBuilder):
    """Pediatric chest X-rays (Guangzhou Women and Children's Medical Center), NORMAL vs PNEUMONIA.

    5,856 JPEG images in the official folders train (1,341 + 3,875), val (8 + 8) and test
    (234 + 390). Images are RGB (grayscale files are expanded to three equal channels).
    ``patient`` is read from the file name, so that splits can be grouped by patient.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: official train/val/test folders, patient ids."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    # tfds 4.9.10 finds a builder's file through `importlib_resources`, a package it no longer
    # installs on Python >= 3.9 (download_and_prepare then fails with ModuleNotFoundError); the
    # answer is simply this file.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=list(data.CLASS_NAMES)),
                    "filename": tfds.features.Text(),
                    "patient": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia",
            citation=_CITATION,
            license="CC BY 4.0",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        source = data.find_images(kaggle_root(os.fspath(dl_manager.manual_dir)))
        if source.layout != "kaggle":
            raise data.DataError(
                f"{source.root} holds NORMAL/ and PNEUMONIA/ directly; this builder expects the "
                f"Kaggle layout.\n{_MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        return {
            name: self._generate_examples(items, source.root)
            for name, items in source.splits.items()
            if items
        }

    def _generate_examples(self, items, root: Path):
        for path, label in items:
            key = Path(path).relative_to(root).as_posix()
            yield (
                key,
                {
                    "image": _encodable_image(path),
                    "label": label,
                    "filename": Path(path).name,
                    "patient": data.patient_id(path),
                },
            )


def kaggle_root(manual_dir: str | os.PathLike) -> Path:
    """``manual_dir/chest_xray`` when the archive was unpacked there, else ``manual_dir``."""
    nested = Path(manual_dir) / "chest_xray"
    return nested if nested.is_dir() else Path(manual_dir)


def _encodable_image(path: str):
    """The file itself when TFDS can decode it to RGB, else an RGB array (stored as PNG).

    JPEG/PNG in mode L or RGB are kept byte for byte (no second lossy encoding, grayscale stays
    small on disk): TFDS decodes with ``channels=3``, which expands grayscale to RGB. Other modes
    (16-bit, CMYK, palette) and DICOM are converted the way :func:`pneumojax.data.decode_image`
    does.
    """
    with data.open_image(path) as image:
        if image.format in ("JPEG", "PNG") and image.mode in ("L", "RGB"):
            return path
        converted = data.to_8bit_rgb_or_gray(image).convert("RGB")
        return np.asarray(converted)
