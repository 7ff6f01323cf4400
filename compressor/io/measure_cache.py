"""Pass-1 measurements kept on disk, so that plans differing only in budget, scope or objective, and a compress
interrupted after pass 1, do not measure the model again (on the 692M-parameter reference MoE pass 1 took 11 of a
budget compress's ~16 minutes here).

An entry is keyed by everything the measurements depend on: the model's files (name, size, modification time of
config.json and the weight files), the calibration token windows themselves (so text, tokenizer, samples, length and
seed), the quantization grid, the requested formats, the eps quantizer (and GPTQ's options when it is GPTQ) and
MEASURE_VERSION, raised whenever pass 1 changes what it computes. It is one safetensors file (tensors, plus the
rest as JSON metadata): nothing is unpickled, and a file that does not parse or does not match its key is measured
again, never trusted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..measure import BlockMeasurement
from .journal import Journal
from ..targets import target
from .keyed import read_keyed, write_keyed
from .outputs import after_failure, remove_stale_files

MEASURE_VERSION = 2  # 2: ggml types fit their scales by search (quantize/scale_search.py)
SENSITIVITY_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def _stat(path: Path) -> list:
    s = path.stat()
    return [path.name, s.st_size, s.st_mtime_ns]


def model_fingerprint(model_dir: Path) -> list:
    """config.json, the weight files and their index: what a re-trained or re-written model changes."""
    return sorted(_stat(p) for p in Path(model_dir).iterdir()
                  if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("tokenizer"))


def cache_key(model_dir: Path, recipe, windows: torch.Tensor) -> tuple[str, dict]:
    """(hex digest, the inputs it digests): the inputs are stored with the entry so it explains itself."""
    q, a = recipe.quantization, recipe.allocation
    inputs = {
        "version": MEASURE_VERSION,
        "model": str(Path(model_dir).resolve()),
        "files": model_fingerprint(model_dir),
        "windows": windows_digest(windows),
        "group_size": q.group_size,
        "sym": q.sym,
        "formats": list(a.formats),
        "eps_quantizer": a.eps_quantizer,
        "per_projection": target(a.target).per_projection,
        "gptq": {"gptq": q.gptq_options, "imatrix": {"damp": q.damp}}.get(a.eps_quantizer),
    }
    if q.scale_dtype != "float16":  # only when set, so that the keys of entries measured before it existed still hold
        inputs["scale_dtype"] = q.scale_dtype
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24], inputs


def sensitivity_key(model_dir: Path, windows: torch.Tensor) -> tuple[str, dict]:
    """The layer sensitivity depends on the model files and its token windows only."""
    inputs = {"version": SENSITIVITY_VERSION, "kind": "layer sensitivity", "model": str(Path(model_dir).resolve()),
              "files": model_fingerprint(model_dir), "windows": windows_digest(windows)}
    return "s-" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24], inputs


def windows_digest(windows: torch.Tensor) -> list:
    """Token windows, or the pixel values of calibration images (floating: digested as they are)."""
    data = windows.float() if windows.is_floating_point() else windows.long()
    return [list(windows.shape), hashlib.sha256(data.contiguous().numpy().tobytes()).hexdigest()]


def _pack(measurements: list[BlockMeasurement]) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, the rest as JSON)."""
    tensors, blocks = {}, []
    for i, m in enumerate(measurements):
        for field in ("count", "weight_sum", "eps_sq", "hess_err", "eps_proj"):
            if getattr(m, field) is not None:
                tensors[f"{i}.{field}"] = getattr(m, field)
        blocks.append({"name": m.name, "layer_idx": m.layer_idx, "formats": m.formats,
                       "total_tokens": m.total_tokens, "out_energy": m.out_energy})
    return tensors, json.dumps(blocks)


def _unpack(tensors: dict[str, torch.Tensor], blocks_json: str) -> list[BlockMeasurement] | None:
    try:
        return [BlockMeasurement(b["name"], b["layer_idx"], b["formats"], tensors[f"{i}.count"],
                                 tensors[f"{i}.weight_sum"], b["total_tokens"], tensors[f"{i}.eps_sq"],
                                 tensors[f"{i}.hess_err"], b["out_energy"], tensors.get(f"{i}.eps_proj"))
                for i, b in enumerate(json.loads(blocks_json))]
    except (KeyError, ValueError, TypeError):
        return None


def save(path: Path, key: str, inputs: dict, measurements: list[BlockMeasurement],
         ternary: dict[str, list[bool]]) -> None:
    """Atomic: a half-written entry is never read (written beside, then renamed)."""
    tensors, blocks = _pack(measurements)
    write_keyed(path, tensors, key, {"inputs": json.dumps(inputs), "blocks": blocks, "ternary": json.dumps(ternary)})


def load(path: Path, key: str) -> tuple[list[BlockMeasurement], dict[str, list[bool]]] | None:
    """The entry at `path` if it is a complete entry for `key`; None otherwise (then pass 1 runs)."""
    hit = read_keyed(path, key)
    if hit is None or "blocks" not in hit[1] or "ternary" not in hit[1]:
        return None
    tensors, meta = hit
    out = _unpack(tensors, meta["blocks"])
    try:
        ternary = json.loads(meta["ternary"])
    except ValueError:
        return None
    return (out, ternary) if out is not None else None


class MeasureJournal:
    """Pass 1 layer by layer, in `<cache>/<key>.partial/`: MeasurePass reads the layers an interrupted run measured
    and writes each new one; the entry's key keys the journal too, so it is valid exactly when the entry would be."""

    def __init__(self, directory: Path, key: str, log=print):
        self.journal = Journal(directory, key, log, what="pass 1")
        self.dir = self.journal.dir

    def load(self, i: int) -> list[BlockMeasurement] | None:
        hit = self.journal.load(i)
        return None if hit is None or "blocks" not in hit[1] else _unpack(hit[0], hit[1]["blocks"])

    def save(self, i: int, measurements: list[BlockMeasurement]) -> None:
        tensors, blocks = _pack(measurements)
        self.journal.save(i, tensors, {"blocks": blocks})

    def remove(self) -> None:
        self.journal.remove()


class MeasurementCache:
    """`directory/<key>.safetensors`; `directory` None: no cache (every call measures)."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory is not None else None
        self.outcome = "measured"  # of the last call, for the plan's record: measured / reused <entry> / kept in <entry>

    def get_or_measure(self, model_dir: Path, recipe, windows: torch.Tensor, measure, log=print):
        """`measure(journal)` -> (measurements, ternary flags), run only when no valid entry exists; `journal` (a
        MeasureJournal, None without a cache) lets an interrupted pass 1 resume at the layer where it stopped."""
        entry = self.entry(model_dir, recipe, windows, log)
        return entry.hit if entry.hit is not None else entry.measure(measure, entry.journal(), log)

    def entry(self, model_dir: Path, recipe, windows: torch.Tensor, log=print) -> "Entry":
        """The entry for these inputs, read if valid (entry.hit), or the place to measure into."""
        if self.directory is None:
            self.outcome = "measured"
            return Entry(self, None, None, None)
        key, inputs = cache_key(model_dir, recipe, windows)
        entry = Entry(self, self.directory / f"{key}.safetensors", key, inputs)
        entry.hit = load(entry.path, key)
        if entry.hit is not None:
            self.outcome = f"reused {entry.path}"
            log(f"pass 1: reusing the measurements in {entry.path}")
        else:
            remove_stale_files(self.directory)  # a killed run's half-written entry
        return entry

    def get_or_compute_sensitivity(self, model_dir: Path, windows: torch.Tensor, compute, log=print) -> torch.Tensor:
        """`compute()` -> the layer sensitivity [layers] (calibration/sensitivity.py), run only when no valid entry
        exists; kept beside the measurements."""
        path, key, inputs, hit = self.sensitivity_entry(model_dir, windows, log)
        if hit is not None:
            return hit
        s = compute()
        self.keep_sensitivity(path, key, inputs, s, log)
        return s

    def sensitivity_entry(self, model_dir: Path, windows: torch.Tensor, log=print):
        """(path, key, inputs, the sensitivity if cached else None); path None without a cache."""
        if self.directory is None:
            return None, None, None, None
        key, inputs = sensitivity_key(model_dir, windows)
        path = self.directory / f"{key}.safetensors"
        hit = read_keyed(path, key)
        if hit is not None and "sensitivity" in hit[0]:
            log(f"layer sensitivity: reusing {path}")
            return path, key, inputs, hit[0]["sensitivity"]
        return path, key, inputs, None

    @staticmethod
    def keep_sensitivity(path: Path | None, key: str, inputs: dict, s: torch.Tensor, log=print) -> None:
        if path is not None:
            write_keyed(path, {"sensitivity": s}, key, {"inputs": json.dumps(inputs)})
            log(f"layer sensitivity: kept in {path}")


class Entry:
    """One cache entry: `hit` (measurements, ternary flags) when valid; otherwise measured into `path`, journaled
    beside it. `path` None: no cache."""

    def __init__(self, cache: MeasurementCache, path: Path | None, key: str | None, inputs: dict | None):
        self.cache, self.path, self.key, self.inputs = cache, path, key, inputs
        self.hit = None

    def journal(self, log=print) -> MeasureJournal | None:
        return MeasureJournal(self.path.with_suffix(".partial"), self.key, log) if self.path is not None else None

    def measure(self, measure, journal, log=print):
        """`measure(journal)`, kept in the entry and its journal removed (by the process that writes the cache)."""
        try:
            measurements, ternary = measure(journal)
        except BaseException as err:
            if journal is not None:
                after_failure(err, journal.dir, log)  # kept only if resumable, and then said so
            raise
        if self.path is not None:
            save(self.path, self.key, self.inputs, measurements, ternary)
            journal.remove()
            self.cache.outcome = f"measured, kept in {self.path}"
            log(f"pass 1: measurements kept in {self.path}")
        return measurements, ternary
