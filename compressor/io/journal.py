"""Pass 2 resumes where it stopped.

Each decoder layer, once quantized, is written to a journal beside the output, `<parent>/.<name>.partial/`: one
safetensors file per layer with its packed experts and packed dense linears (their tensors exactly as pass 2 left
them) and the layer's report as metadata. The journal is keyed by a digest of everything pass 2's result depends on:
the plan's formats and grid, the quantization and calibration settings, the model's files and the calibration
windows. A compress that finds a journal with its own digest loads the journaled layers instead of quantizing them
again; since a layer's outputs are computed from what it holds, the layers after it see exactly the inputs they would
have seen, and the output is the one an uninterrupted run writes (tested). A journal with another digest is
discarded; the journal is removed once the output is committed. Files are written atomically (beside, then renamed),
so a kill mid-write leaves at most a stray temporary file, never a half layer; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from .keyed import read_keyed, write_keyed, write_text_atomic
from .outputs import remove_stale_files

JOURNAL_VERSION = 1


def journal_digest(plan: dict, recipe, model_fingerprint: list, windows_digest: list | None) -> str:
    """What pass 2's output depends on (`plan`: the plan as a dict; its allocation record and analysis do not matter)."""
    inputs = {"version": JOURNAL_VERSION, "experts": plan["experts"], "dense": plan["dense"],
              "group_size": plan["group_size"], "sym": plan["sym"], "dtype": recipe.dtype,
              "quantization": recipe.quantization.model_dump(mode="json"),
              "calibration": recipe.calibration.model_dump(mode="json"),
              "model": model_fingerprint, "windows": windows_digest}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def journal_bytes(predicted: dict[str, int], blocks, dense) -> int:
    """Bytes the journal will hold (from accounting.predict_bytes): the packed experts and dense linears."""
    return (sum(predicted[f"{b.name}.{e}"] for b in blocks for e in range(b.num_experts))
            + sum(predicted[f"{n}.packed"] for n in dense))


def beside(out_dir: Path) -> Path:
    """Pass 2's journal directory for the output `out_dir`: `<parent>/.<name>.partial`."""
    out_dir = Path(out_dir).resolve()
    return out_dir.parent / f".{out_dir.name}.partial"


class Journal:
    """Per-layer results in `directory`, valid for `digest` only. Pass 2 journals beside its output (`beside`);
    pass 1 journals in the measurement cache (io/measure_cache.py). `what` names the pass in messages."""

    def __init__(self, directory: Path, digest: str, log=print, what: str = "pass 2"):
        self.dir, self.digest = Path(directory), digest
        meta = self.dir / "journal.json"
        if self.dir.exists() and _digest_of(meta) != digest:
            log(f"{what}: discarding {self.dir} (written for other settings or another plan)")
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_files(self.dir)  # a killed run's half-written layer file
        if not meta.exists():
            write_text_atomic(meta, json.dumps({"digest": digest}))
        self.done = sorted(i for i in (self._index(p) for p in self.dir.glob("layer-*.safetensors")) if i is not None)
        if self.done:
            log(f"{what}: resuming, {len(self.done)} layer(s) done before kept in {self.dir}")

    @staticmethod
    def _index(path: Path) -> int | None:
        stem = path.name[len("layer-"):-len(".safetensors")]
        return int(stem) if stem.isdigit() else None

    def _path(self, i: int) -> Path:
        return self.dir / f"layer-{i}.safetensors"

    def save(self, i: int, tensors: dict[str, torch.Tensor], report: dict) -> None:
        write_keyed(self._path(i), tensors, self.digest, {"report": json.dumps(report)})

    def load(self, i: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Layer i's tensors and report, or None if it is not journaled (or its file is damaged)."""
        hit = read_keyed(self._path(i), self.digest) if i in self.done else None
        if hit is None or "report" not in hit[1]:
            return None
        return hit[0], json.loads(hit[1]["report"])

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _digest_of(meta: Path) -> str | None:
    try:
        return json.loads(meta.read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None

