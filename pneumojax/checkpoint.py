"""Orbax checkpoints of Flax variables with a manifest that says what they are."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from pneumojax.io import existing_folder, remove_stale_staging, replace_folder, write_text_atomic

MANIFEST = "manifest.json"


class CheckpointError(Exception):
    """A checkpoint folder is missing, half-written or for another model."""


def save_variables(
    directory: str | Path, variables: dict, manifest: dict, overwrite: bool = False
) -> Path:
    """Saves ``variables`` under ``directory/variables`` and writes ``manifest.json`` last.

    Everything is written into a folder beside ``directory`` first and put in its place when
    complete and on disk; a folder it replaces stays until then (a kill -9 at any moment leaves
    one complete copy). A folder without a manifest is known to be incomplete.
    """
    directory = Path(directory).absolute()
    if existing_folder(directory).exists() and not overwrite:
        raise CheckpointError(f"{directory} already exists; pass --overwrite to replace it")
    staging = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    # what a killed save of this folder left (its process gone): removed, not kept for ever
    remove_stale_staging(directory.parent, rf"\.{re.escape(directory.name)}\.tmp(?P<pid>\d+)")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
        ckptr.save(staging / "variables", jax.tree.map(np.asarray, variables))
    write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    replace_folder(staging, directory)
    return directory


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a checkpoint folder, with a clear error when it is not one."""
    directory = existing_folder(Path(directory))
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    path = directory / MANIFEST
    if not path.exists():
        raise CheckpointError(
            f"{directory} has no {MANIFEST}: the checkpoint is incomplete "
            "(interrupted while saving?) or not a pneumojax checkpoint"
        )
    return json.loads(path.read_text())


def load_variables(directory: str | Path) -> tuple[dict, dict]:
    """Restores ``(variables, manifest)`` saved by :func:`save_variables` as numpy arrays."""
    directory = existing_folder(Path(directory).absolute())
    manifest = read_manifest(directory)
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
        variables = ckptr.restore(directory / "variables")
    return jax.tree.map(np.asarray, variables), manifest


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """These folders hold host (numpy) arrays that one process saves or restores by itself;
    by default orbax would wait for every process of a ``--distributed`` run at its barriers."""
    i = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=i, active_processes={i})
