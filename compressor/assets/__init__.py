"""Shipped assets: the default MoE model and the evaluation/calibration corpora.

Pure pathlib, no heavy imports, so anything (including tests and the CLI) can import it cheaply.

- ``DEFAULT_MODEL_DIR``: a small Mixtral-architecture MoE (4 layers, 8 experts, top-2) trained from
  scratch by ``evals/models/train_default_model.py``; load with
  ``AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)``.
- ``CALIB_TEXT``: calibration text (mixed sources). Use only for calibration, never for evaluation.
- ``HELDOUT_TEXTS``: held-out evaluation texts, name -> path. Disjoint (by document) from the
  calibration text and from the default model's training text.
- ``CACHE_DIR`` and what is built there, never shipped: the training text, the dense SmolLM2-135M and
  the reference MoE derived from it (``python -m evals.models.build_reference``), and pass-1 measurements
  kept for reuse (``MEASUREMENTS_DIR``).

Corpora are rebuilt by ``evals/data/build_corpora.py``; sources and licences are in
``corpora/SOURCES.md``.
"""

import os
from pathlib import Path

ASSETS_DIR: Path = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR: Path = ASSETS_DIR / "default_model"
CORPORA_DIR: Path = ASSETS_DIR / "corpora"
CALIB_TEXT: Path = CORPORA_DIR / "calib.txt"
# Built, not shipped: `MOE_COMPRESSOR_CACHE` or ~/.cache/moe-compressor
CACHE_DIR: Path = Path(os.environ.get("MOE_COMPRESSOR_CACHE", Path.home() / ".cache" / "moe-compressor"))
TRAIN_TEXT: Path = CACHE_DIR / "corpora" / "train.txt"  # evals/data/build_corpora.py
SMOLLM2_DIR: Path = CACHE_DIR / "smollm2-135m"  # dense SmolLM2-135M-Instruct, evals/models/build_reference.py
REFERENCE_MODEL_DIR: Path = CACHE_DIR / "reference-moe"  # the reference MoE derived from it, same script
REFERENCE_DROP_DIR: Path = CACHE_DIR / "reference-moe-drop"  # its drop-upcycled, trained variant (experts differ)
MEASUREMENTS_DIR: Path = CACHE_DIR / "measurements"  # pass-1 measurements, compressor/io/measure_cache.py
HELDOUT_TEXTS: dict[str, Path] = {
    "pydocs": CORPORA_DIR / "heldout_pydocs.txt",
    "austen": CORPORA_DIR / "heldout_austen.txt",
    "shakespeare": CORPORA_DIR / "heldout_shakespeare.txt",
}

__all__ = [
    "ASSETS_DIR",
    "DEFAULT_MODEL_DIR",
    "CORPORA_DIR",
    "CALIB_TEXT",
    "HELDOUT_TEXTS",
    "CACHE_DIR",
    "TRAIN_TEXT",
    "SMOLLM2_DIR",
    "REFERENCE_MODEL_DIR",
    "REFERENCE_DROP_DIR",
    "MEASUREMENTS_DIR",
]
