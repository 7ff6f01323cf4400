"""Compressed checkpoints: write atomically, load with experts kept packed.

Layout of an output directory:
  model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
  config.json        the model's config + quantization_config (format of every packed module)
  tokenizer files, plan.json, recipe.yaml, report.json, report.md
The checkpoint's tensors are the packed model's state dict: `<experts>.<e>.gate_up.qweight`, ...
An up-cycled model holding MLPMoE blocks (runtime/moe.py) is written the same way, unquantized: its state dict
as safetensors and config.json with `moe_modules`; `skeleton` rebuilds its structure for either kind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .. import __version__, prune
from ..arch.view import find_moe_blocks
from ..device import HOST
from ..errors import UserError
from ..runtime.experts import PackedExperts, PackedLinear, empty_packed_experts, empty_packed_linear
from ..runtime.moe import CONFIG_KEY as MOE_MODULES, MLPMoE, replace_module, two_layer_mlp
from .accounting import checkpoint_tensors
from .keyed import save_safetensors
from .models import QUANT_METHOD, ModelDirError, architecture_class

INDEX = "model.safetensors.index.json"


class OutputExists(UserError, FileExistsError):
    pass


def quantization_config(model: nn.Module, group_size: int, sym: bool, extra: dict | None = None) -> dict:
    experts = {n: m.formats() for n, m in model.named_modules() if isinstance(m, PackedExperts)}
    dense = {n: m.packed.spec.format for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    return {"quant_method": QUANT_METHOD, "version": __version__, "group_size": group_size, "sym": sym,
            "experts": experts, "dense": dense, **(extra or {})}


def check_output(out_dir: Path, model_dir: Path, overwrite: bool, log=print) -> None:
    """The rules of every output (dry runs too): never the input model, its parent or inside it; an existing output
    only with --overwrite; a location that can be written. Temporary directories of killed runs are cleaned first."""
    from .outputs import check_writable, remove_stale

    out_dir, model_dir = out_dir.resolve(), model_dir.resolve()
    if out_dir == model_dir or model_dir in out_dir.parents or out_dir in model_dir.parents:
        raise OutputExists(f"refusing to write {out_dir}: it is or contains the input model {model_dir}; choose another --output")
    remove_stale(out_dir, log)
    if out_dir.exists() and not overwrite:
        raise OutputExists(f"{out_dir} exists; pass --overwrite to replace it, or choose another --output")
    check_writable(out_dir)


def prepare_output(out_dir: Path, model_dir: Path, overwrite: bool, log=print) -> Path:
    """Checks, then a fresh temporary directory beside `out_dir` to write into."""
    check_output(out_dir, model_dir, overwrite, log)
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_output(tmp: Path, out_dir: Path) -> None:
    """Atomic replace: the finished temporary directory takes the output's name."""
    from .outputs import remove_path

    out_dir = out_dir.resolve()
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        remove_path(old)  # the previous output: a directory, or a file --overwrite replaces


def write_tensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> int:
    """safetensors, sharded past `max_shard_bytes`. Returns the tensor bytes written."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    meta = {"format": "pt", "producer": f"moe-compressor {__version__}"}
    if len(shards) == 1:
        save_safetensors(shards[0], directory / "model.safetensors", meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, directory / fname, meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.nbytes for t in tensors.values())
        (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return sum(t.nbytes for t in tensors.values())


def _weight_files(directory: Path) -> list[Path]:
    from .validate import _weight_map

    index = directory / INDEX
    files = sorted(set(_weight_map(index).values())) if index.exists() else ["model.safetensors"]
    for f in files:
        if not (directory / f).is_file():
            raise ModelDirError(f"{directory}: missing weight file {f}")
    return [directory / f for f in files]


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in _weight_files(Path(directory)):
        out.update(load_file(f))
    return out


def tensor_nbytes(directory: Path) -> dict[str, int]:
    """Bytes of every tensor in a checkpoint, from the safetensors headers alone (nothing is loaded)."""
    out = {}
    for f in _weight_files(Path(directory)):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        out.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    return out


def save_model(model: nn.Module, directory: Path, dtype: torch.dtype, max_shard_bytes: int,
               extra_config: dict | None = None) -> int:
    """The model's tensors (packed ones as they are, other floats in `dtype`) and its config.json."""
    nbytes = write_tensors(checkpoint_tensors(model, dtype), directory, max_shard_bytes)
    cfg = model.config.to_dict()
    cfg.update(extra_config or {})
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return nbytes


def save_compressed(model: nn.Module, tmp: Path, dtype: torch.dtype, qconfig: dict, max_shard_bytes: int) -> int:
    return save_model(model, tmp, dtype, max_shard_bytes, {"quantization_config": qconfig})


def skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture of a transformers config on the meta device: a causal LM of a supported family, or, when
    the config lists up-cycled modules (`moe_modules`), the class its `architectures` names with those modules
    replaced by MLPMoE blocks of the recorded experts and top-k. dtype None: the config's."""
    from transformers import AutoModelForCausalLM

    entry = getattr(config, MOE_MODULES, None)
    kw = {} if dtype is None else {"dtype": dtype}
    try:
        with torch.device("meta"):
            if not entry:
                return AutoModelForCausalLM.from_config(config, **kw)
            model = architecture_class(config.architectures)._from_config(config, **kw)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, ZeroDivisionError) as err:
        if isinstance(err, ModelDirError):
            raise
        where = getattr(config, "_name_or_path", "") or "the model"
        raise ModelDirError(f"{where}: transformers cannot build the model its config.json describes "
                            f"({type(err).__name__}: {str(err)[:160]}); use the config.json that came with these "
                            "weights") from None
    for name, spec in entry.items():
        try:
            mlp = two_layer_mlp(model.get_submodule(name))
        except AttributeError:
            mlp = None
        if mlp is None:
            raise ModelDirError(f"config.json lists {name!r} under {MOE_MODULES}, but {type(model).__name__} has no "
                                "two-layer MLP of that name; was the model written by another version?")
        replace_module(model, name, MLPMoE.like(mlp, spec["experts"], spec["top_k"]))
    return model


def load_upcycled(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An up-cycled model holding MLPMoE blocks (not compressed): skeleton, then its safetensors."""
    from transformers import AutoConfig

    model = skeleton(AutoConfig.from_pretrained(model_dir), dtype)
    _load_weights(model, Path(model_dir))
    return model.eval()


def load_compressed(model_dir: Path, dtype: torch.dtype = torch.float32, dynamic_pruning: bool = True) -> nn.Module:
    """Rebuild the architecture on the meta device, swap in packed modules of the recorded formats,
    and load the tensors: experts stay packed in memory and are dequantized per expert in the forward."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    qc = config.quantization_config
    del config.quantization_config
    model = skeleton(config, dtype)
    try:  # formats of modules the model does not have, or that do not exist: a config.json edited or damaged
        gs, sym = qc["group_size"], qc["sym"]
        for b in find_moe_blocks(model):
            b.block.experts = empty_packed_experts(b, qc["experts"][b.name], gs, sym, dtype)
        for name, fmt in qc["dense"].items():
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, empty_packed_linear(model.get_submodule(name), fmt, gs, sym, dtype))
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise ModelDirError(f"{model_dir}/config.json: its quantization_config does not describe this model "
                            f"({type(err).__name__}: {str(err)[:120]}); was it edited, or written by another version? "
                            "Compress the original model again") from None
    _load_weights(model, Path(model_dir))
    model.config.quantization_config = qc
    prune.apply_saved(model, enabled=dynamic_pruning)
    return model.eval()


def _load_weights(model: nn.Module, model_dir: Path) -> None:
    """Materialise a meta-device skeleton and load the checkpoint's tensors into it, exactly."""
    from .validate import check_state

    check_state(model_dir, model)  # before anything is read: damaged files, missing tensors, wrong shapes
    model.to_empty(device=HOST)
    init_non_persistent_buffers(model)
    missing, unexpected = model.load_state_dict(read_tensors(model_dir), strict=False)
    model.tie_weights()
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise ModelDirError(f"{model_dir}: checkpoint does not match its config (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}); was it written by another version?")


def init_non_persistent_buffers(model: nn.Module, only: set[nn.Module] | None = None) -> None:
    """Non-persistent buffers (rotary inv_freq, CLIP's position_ids) are not in a checkpoint: each module holding
    some is initialised by its innermost transformers model (a LLaVA's vision tower is a model of its own).
    `only`: just these modules (a part of a streamed model), whose buffers still on the meta device are allocated
    on the host first."""
    from transformers import PreTrainedModel

    owner = {}
    for top in (m for m in model.modules() if isinstance(m, PreTrainedModel)):  # outer models first
        for m in top.modules():
            if m._non_persistent_buffers_set and (only is None or m in only):
                owner[m] = top
    for m, top in owner.items():
        for name in m._non_persistent_buffers_set:
            if m._buffers.get(name) is not None and m._buffers[name].is_meta:
                m._buffers[name] = torch.empty_like(m._buffers[name], device=HOST)
        top._init_weights(m)


def _is_tied(model: nn.Module, key: str) -> bool:
    t = model.state_dict()[key]
    return any(o is not t and o.data_ptr() == t.data_ptr() for k, o in model.state_dict().items() if k != key)
