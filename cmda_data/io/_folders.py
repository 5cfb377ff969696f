"""Saving and loading of tensors + a JSON config (private).

Weights go to ``model.safetensors`` and settings to ``config.json``: no pickle anywhere,
so loading a folder from somebody else cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..core._validation import fail
from ..exceptions import ValidationError
from ._safetensors import load_file, save_file

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_folder", "read_config", "save_folder"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


def save_folder(path: PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into the folder ``path`` (created)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        fail("path", "a folder (or a path that does not exist yet)", str(folder), ValidationError, raw=True)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **dict(config)}
    try:
        text = json.dumps(payload, indent=2, sort_keys=True)
    except TypeError as error:
        fail("config", "JSON-serialisable values", str(error), ValidationError, raw=True)
    # clone: safetensors refuses shared or non-contiguous storage
    plain = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    save_file(plain, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
    return folder


def read_config(path: PathLike) -> Dict[str, Any]:
    """Read ``config.json`` of a saved folder."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        fail("path", f"a folder written by save() containing {CONFIG_NAME}", str(Path(path)), ValidationError,
             raw=True)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        fail(str(file), "valid JSON", str(error), ValidationError, raw=True)


def load_folder(path: PathLike, map_location: Optional[Union[str, torch.device]] = "cpu"
                ) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read ``config.json`` and ``model.safetensors`` written by :func:`save_folder`."""
    config = read_config(path)
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        fail("config.json format_version", str(FORMAT_VERSION), repr(version), ValidationError, raw=True)
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        fail("path", f"a folder containing {WEIGHTS_NAME}", str(Path(path)), ValidationError, raw=True)
    device = "cpu" if map_location is None else str(torch.device(map_location))
    tensors = {name: value.to(device) for name, value in load_file(file, mmap=False).items()}
    return config, tensors
