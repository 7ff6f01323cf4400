"""Calibration and evaluation text -> token windows. Takes any tokenizer with __call__ (duck typed)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MissingFile, SettingError, TextError


def read_text(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        raise TextError(f"{path} is a directory; pass a text file")
    if not path.is_file():
        raise MissingFile(f"text file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise TextError(f"text file is empty: {path}; pass a file of plain text")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:  # [N] int64
    """The whole text as one id sequence (cut into windows later, so the model's maximum length does not apply:
    `verbose=False` keeps the tokenizer from warning that it is exceeded)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets: [samples, seq_len].
    A text shorter than the request yields fewer, non-overlapping windows (never fewer than one)."""
    if ids.numel() < seq_len:
        raise TextError(f"the calibration text has {ids.numel():,} tokens, fewer than one window of --seq-len "
                        f"{seq_len:,}: use a longer text (--calib) or a smaller --seq-len")
    max_windows = ids.numel() // seq_len
    if samples >= max_windows:
        return ids[: max_windows * seq_len].view(max_windows, seq_len)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def check_eval_settings(seq_len: int, batch_size: int) -> None:
    if seq_len < 2:
        raise SettingError(f"--seq-len {seq_len}: a window needs at least 2 tokens (one to predict from, one to predict)")
    if batch_size < 1:
        raise SettingError(f"--batch-size {batch_size}: at least 1 window per batch")


def eval_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows covering the text; the tail shorter than seq_len is dropped: [n, seq_len]."""
    check_eval_settings(seq_len, 1)
    n = ids.numel() // seq_len
    if n == 0:
        raise TextError(f"the text has {ids.numel():,} tokens, fewer than one window of --seq-len {seq_len:,}: use a "
                        "longer text or a smaller --seq-len")
    return ids[: n * seq_len].view(n, seq_len)
