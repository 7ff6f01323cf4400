"""Shipped assets: the default MoE model and the evaluation/calibration corpora.

Pure pathlib, no heavy imports, so anything (including tests and the CLI) can import it cheaply.

- ``DEFAULT_MODEL_DIR``: a small Mixtral-architecture MoE (4 layers, 8 experts, top-2) trained from
  scratch by ``evals/models/train_default_model.py``; load with
  ``AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)``.
- ``CALIB_TEXT``: calibration text (mixed sources). Use only for calibration, never for evaluation.
- ``HELDOUT_TEXTS``: held-out evaluation texts, name -> path. Disjoint (by document) from the
  calibration text and from the default model's training text.

Corpora are rebuilt by ``evals/data/build_corpora.py``; sources and licences are in
``corpora/SOURCES.md``.
"""

from pathlib import Path

ASSETS_DIR: Path = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR: Path = ASSETS_DIR / "default_model"
CORPORA_DIR: Path = ASSETS_DIR / "corpora"
CALIB_TEXT: Path = CORPORA_DIR / "calib.txt"
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
]
