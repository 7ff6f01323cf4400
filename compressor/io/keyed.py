"""Safetensors files that carry the key they were written for (the pass-1 measurement cache, the pass-2 journal):
written atomically (beside, then renamed, so a kill mid-write never leaves a half file under the real name) and read
back only when complete and written for the expected key. Nothing is unpickled."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import environment_error


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, whose errors carry no path: a full disk or a read-only location is an OutputError
    naming the file."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as err:  # SafetensorError('... No space left on device (os error 28)'), OSError
        raise environment_error(err, str(path)) or err


def write_keyed(path: Path, tensors: dict[str, torch.Tensor], key: str, meta: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_safetensors({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, {**(meta or {}), "key": key})
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def read_keyed(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of the file at `path` if it exists, parses and was written for `key`; else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError):
        return None


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
