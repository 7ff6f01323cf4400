"""A model directory checked before the long work: config.json is one object of a consistent architecture, every
safetensors file is whole (its header parses, its tensors tile the data exactly, nothing is cut off), and the
checkpoint holds every tensor the architecture of config.json needs, of the right shape and kind.

Damage found here would otherwise surface as safetensors' own error deep inside pass 1 or 2, or (for a missing
tensor loaded by `from_pretrained`) not at all: transformers initialises it at random. Only headers are read.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import excerpt
from .models import ModelDirError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
DAMAGED = ("the file is damaged or incomplete (an interrupted download or copy?): download or save the model "
           "again")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32,
          "U64": torch.uint64, "BOOL": torch.bool}
SHOWN = 5  # names listed in a message


@dataclass(frozen=True)
class TensorHeader:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def damaged(path: Path, problem: str) -> ModelDirError:
    return ModelDirError(f"{path}: {problem}; {DAMAGED}")


def read_header(path: Path) -> dict[str, TensorHeader]:
    """The tensors a safetensors file holds, from its header, checked against the file's size: a ModelDirError
    naming the file and the damage (truncated, a garbage length, offsets that disagree with shapes)."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise damaged(path, f"it is {size} bytes long, too short for a safetensors file")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise damaged(path, f"its header length field says {n:,} bytes, but {size - 8:,} bytes follow it")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        raise damaged(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise damaged(path, "its header is not a JSON object")
    out, spans = {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        out[key] = _entry(path, key, entry, spans)
    data, end = size - 8 - n, 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise damaged(path, f"tensor {key!r} starts at byte {begin:,} of the data, expected {end:,} (a gap or an "
                                "overlap between tensors)")
        end = stop
    if end > data:
        raise damaged(path, f"it is truncated: its header describes {end:,} bytes of tensor data, the file holds "
                            f"{data:,}")
    if end < data:
        raise damaged(path, f"{data - end:,} bytes follow its last tensor")
    return out


def _entry(path: Path, key: str, entry, spans: list) -> TensorHeader:
    ok = isinstance(entry, dict) and entry.get("dtype") in DTYPES
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
    ok = ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if not ok:
        raise damaged(path, f"the header entry of tensor {key!r} is malformed")
    dtype = DTYPES[entry["dtype"]]
    nbytes, (begin, stop) = math.prod(shape) * dtype.itemsize, offsets
    if not 0 <= begin <= stop or stop - begin != nbytes:
        raise damaged(path, f"tensor {key!r} of shape {shape} ({entry['dtype']}) is {nbytes:,} bytes, but its offsets "
                            f"{offsets} span {stop - begin:,}")
    spans.append((begin, stop, key))
    return TensorHeader(path, dtype, tuple(shape))


def checkpoint_headers(model_dir: Path) -> dict[str, TensorHeader]:
    """Every tensor of the checkpoint in `model_dir` (one file or shards with an index), each file checked whole;
    the index must list exactly the tensors its shards hold."""
    from .checkpoint import INDEX, _weight_files

    model_dir = Path(model_dir)
    out: dict[str, TensorHeader] = {}
    for f in _weight_files(model_dir):
        for key, h in read_header(f).items():
            if key in out:
                raise damaged(f, f"tensor {key!r} is also in {out[key].file.name}")
            out[key] = h
    index = model_dir / INDEX
    if index.is_file():
        listed = _weight_map(index)
        wrong = [k for k, f in listed.items() if k not in out or out[k].file.name != Path(f).name]
        if wrong:
            raise ModelDirError(f"{index} lists tensors its shards do not hold ({_names(wrong)}); a shard is missing "
                                "or from another download: download or save the model again")
    return out


def _weight_map(index: Path) -> dict[str, str]:
    try:
        wmap = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError):
        wmap = None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise damaged(index, "it is not a safetensors index (a JSON object with a 'weight_map' of tensor -> file)")
    return wmap


def check_original(model_dir: Path, config) -> dict[str, TensorHeader]:
    """An original (transformers) checkpoint against the architecture its config.json describes: every tensor the
    model needs is present (tied ones once), of the shape it needs once transformers' own key conversions (e.g.
    Mixtral's per-expert w1/w2/w3 fused into gate_up_proj) are applied, and floating where the model's is. Run on
    the meta device: only headers are read. Tensors the model does not use are ignored, as from_pretrained does."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model, rename_source_key
    from transformers.modeling_utils import LoadStateDictConfig

    from .checkpoint import skeleton
    from .streaming import _conversions, _quiet, _split

    headers = checkpoint_headers(model_dir)
    model = skeleton(config)
    tied = _tied_groups(model)
    meta = model.state_dict()
    renamings, converters = _split(_conversions(model))
    kinds, sources = [], defaultdict(lambda: defaultdict(list))  # target -> source pattern -> shapes
    for key, h in headers.items():
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if target not in meta:
            continue
        sources[target][pattern or key].append(h.shape)
        if meta[target].is_floating_point() and not h.dtype.is_floating_point:
            kinds.append(f"{key} is {h.dtype} where the model holds floating-point weights")
    state = {k: torch.empty(h.shape, dtype=h.dtype, device="meta") for k, h in headers.items()}
    with _quiet():
        info, _ = convert_and_load_state_dict_in_model(
            model, state, LoadStateDictConfig(device_map={"": "meta"}, weight_mapping=_conversions(model)))
    problems = kinds + _extra_layers(model, info.unexpected_keys)
    failed = set(info.conversion_errors) | {k for k, _, _ in info.mismatched_keys}
    missing = sorted(k for k in info.missing_keys - failed if not (tied.get(k, set()) - info.missing_keys))
    lines = load_problems(info, sorted(failed))  # one per failed parameter, then transformers' other messages
    problems += [f"{k} cannot be built from the checkpoint's {_sources(sources[k])}"
                 if k in info.conversion_errors and sources[k] else line
                 for k, line in zip(sorted(failed), lines)] + lines[len(failed):]
    if missing or problems:
        raise mismatch(model_dir, missing, problems)
    return headers


def _extra_layers(model: nn.Module, unexpected: set[str]) -> list[str]:
    """Checkpoint tensors of decoder layers the config does not have (config.json's layer count lowered): tensors the
    model does not use are otherwise ignored, as from_pretrained ignores them, unless its class says to (DeepSeek-V3's
    multi-token-prediction layer is one past num_hidden_layers)."""
    from ..arch.view import decoder_layers, layers_prefix

    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    pattern = re.compile(rf"^{re.escape(layers_prefix(model))}\.(\d+)\.")
    n = len(decoder_layers(model))
    extra = sorted({int(m.group(1)) for k in unexpected if (m := pattern.match(k)) and int(m.group(1)) >= n
                    and not any(p.search(k) for p in ignore)})
    if not extra:
        return []
    return [f"the checkpoint holds decoder layer(s) {extra[:SHOWN]} beyond config.json's {n} (num_hidden_layers)"]


def _sources(patterns: dict[str, list]) -> str:
    """The checkpoint tensors a converted parameter is built from: how many of each pattern, of which shapes."""
    def shapes(found: list) -> str:
        counts = defaultdict(int)
        for s in found:
            counts[tuple(s)] += 1
        return ", ".join(f"{list(s)} x{n}" for s, n in counts.items())
    return "; ".join(f"{len(found)} x {pattern}: {shapes(found)}" for pattern, found in sorted(patterns.items()))


def check_state(model_dir: Path, model: nn.Module) -> None:
    """A checkpoint whose keys are the model's own state-dict keys (a compressed or an up-cycled model, written by
    this project) against the model built from its config.json (on the meta device): every tensor present (tied
    ones once), of its shape, floating where the model's is and of exactly its dtype where it is not (packed codes)."""
    headers = checkpoint_headers(model_dir)
    tied = _tied_groups(model)
    state = model.state_dict()
    missing = {k for k in state if k not in headers}
    missing = sorted(k for k in missing if not (tied.get(k, set()) - missing))
    problems = [f"unexpected tensor {k}" for k in headers if k not in state]
    for k, t in state.items():
        h = headers.get(k)
        if h is None:
            continue
        if h.shape != tuple(t.shape):
            problems.append(f"{k}: checkpoint {list(h.shape)}, model {list(t.shape)}")
        elif h.dtype != t.dtype and not (h.dtype.is_floating_point and t.dtype.is_floating_point):
            problems.append(f"{k}: checkpoint {h.dtype}, model {t.dtype}")
    if missing or problems:
        raise mismatch(model_dir, missing, problems)


def load_problems(info, keys: list[str] | None = None) -> list[str]:
    """transformers' loading report (LoadStateDictInfo) as one short line per parameter (of `keys`, in that order;
    default all): shape mismatches and conversion errors, without the tracebacks transformers keeps in them."""
    lines = {k: f"{k}: checkpoint {list(a)}, model {list(b)}" for k, a, b in info.mismatched_keys}
    for k, text in info.conversion_errors.items():
        last = [line for line in str(text).strip().splitlines() if line.strip()][-2:]
        lines[k] = f"{k}: {' / '.join(last)}"
    out = [lines[k] for k in (keys if keys is not None else sorted(lines))]
    return out + [str(m).strip().splitlines()[-1] for m in info.error_msgs if str(m).strip()]


def mismatch(model_dir: Path, missing: list[str], problems: list[str]) -> ModelDirError:
    parts = ([f"missing {_names(missing)}"] if missing else []) + ([_names(problems, sep="; ")] if problems else [])
    return ModelDirError(f"{model_dir}: the weights do not match its config.json ({'; '.join(parts)}). Check that every "
                         "weight file is present and complete, and that config.json belongs to these weights")


def _names(items: list[str], sep: str = ", ") -> str:
    more = f"{sep}... ({len(items)} in all)" if len(items) > SHOWN else ""
    return sep.join(items[:SHOWN]) + more


def _tied_groups(model: nn.Module) -> dict[str, set[str]]:
    """state-dict key -> the keys that name the same tensor (a tied LM head and embedding)."""
    by_tensor = defaultdict(set)
    for k, t in model.state_dict(keep_vars=True).items():
        by_tensor[id(t)].add(k)
    return {k: group - {k} for group in by_tensor.values() for k in group}


SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts_per_tok")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2", "auto")


def check_config_values(config: dict, where: str | Path = "config.json") -> None:
    """The sizes of a supported MoE config.json are positive integers, top-k at most the expert count, the dtype a
    dtype, and transformers' own config class accepts the rest: a config.json edited into nonsense is refused here,
    not met as a division by zero or a top-k out of range inside the first layer."""
    from transformers import AutoConfig

    bad = [f"{k} {excerpt(config[k], 40)} (a positive integer)" for k in SIZE_KEYS + EXPERT_COUNT_KEYS
           if k in config and config[k] is not None and not (type(config[k]) is int and config[k] >= 1)]
    experts = next((config[k] for k in EXPERT_COUNT_KEYS if type(config.get(k)) is int), None)
    top_k = config.get("num_experts_per_tok")
    if not bad and type(top_k) is int and experts is not None and top_k > experts:
        bad.append(f"num_experts_per_tok {top_k} with {experts} experts (at most the number of experts)")
    if not isinstance(config.get("quantization_config") or {}, dict):
        bad.append(f"quantization_config {excerpt(config['quantization_config'], 40)} (expected an object)")
    dtype = config.get("dtype", config.get("torch_dtype"))
    if dtype is not None and dtype not in DTYPE_NAMES:
        bad.append(f"dtype {excerpt(dtype, 40)} (expected one of {', '.join(DTYPE_NAMES)})")
    if not bad:
        try:
            AutoConfig.for_model(**config)
        except Exception as err:  # noqa: BLE001 (transformers' own validation, of any kind)
            bad.append(str(err).strip().splitlines()[-1][:200] or type(err).__name__)
    if bad:
        raise ModelDirError(f"{where}: {'; '.join(bad[:SHOWN])}; fix it, or use the config.json that came with these "
                            "weights")


def check_architecture(config: dict, where: str | Path = "config.json") -> None:
    """`architectures` must name the causal LM class of `model_type` (a config.json edited by hand, or copied from
    another model, is refused rather than written back out with its wrong class)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = config.get("architectures")
    expected = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if names is None or expected is None:
        return
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ModelDirError(f"{where}: 'architectures' must be a list of class names, got {str(names)[:80]}")
    wrong = [n for n in names if n.lower() != expected.lower()]
    if wrong:
        raise ModelDirError(f"{where}: 'architectures' names {wrong}, but model_type {config['model_type']!r} is built "
                            f"as {expected}: config.json is inconsistent (edited, or from another model); set "
                            f"\"architectures\": [\"{expected}\"] or use the config.json that came with these weights")


def check_checkpoint(model_dir: Path, trust_remote_code: bool = False) -> None:
    """An original checkpoint about to be loaded by from_pretrained: check_original, or (a model whose classes are
    remote code, not built here) its files whole."""
    from transformers import AutoConfig

    if trust_remote_code:
        checkpoint_headers(model_dir)
    else:
        check_original(model_dir, AutoConfig.from_pretrained(model_dir))
