"""Where does a compressed model part from its original? Relative error of the residual stream after every decoder
layer, ||h_compressed - h_original|| / ||h_original||, on the first tokens of a held-out text.

    python -m evals.divergence ORIGINAL_DIR COMPRESSED_DIR [COMPRESSED_DIR ...] [--tokens 256] [--text pydocs]

A jump at one layer names the layer whose quantization broke something the rest of the model relies on (for
example the few tokens carrying a massive activation), which perplexity alone cannot locate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from compressor.assets import HELDOUT_TEXTS
from compressor.calibration.data import read_text, tokenize
from compressor.io.models import load_model, load_tokenizer


@torch.no_grad()
def hidden_states(model_dir: Path, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return load_model(model_dir)(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def relative_errors(compressed: tuple[torch.Tensor, ...], original: tuple[torch.Tensor, ...]) -> list[float]:
    """Per hidden state (embeddings first, then after each layer)."""
    return [float((c - o).norm() / o.norm()) for c, o in zip(compressed, original)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("original", type=Path)
    p.add_argument("compressed", type=Path, nargs="+")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--text", choices=list(HELDOUT_TEXTS), default="pydocs")
    a = p.parse_args()
    ids = tokenize(load_tokenizer(a.original), read_text(HELDOUT_TEXTS[a.text]))[: a.tokens][None]
    original = hidden_states(a.original, ids)
    width = max(len(d.name) for d in a.compressed)
    print(f"{'after layer':>{width}}:   emb " + " ".join(f"{i:>5d}" for i in range(len(original) - 1)))
    for d in a.compressed:
        errors = relative_errors(hidden_states(d, ids), original)
        print(f"{d.name:>{width}}: " + " ".join(f"{e:5.2f}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
