"""`cli.py upcycle`: load a dense model -> upcycle -> optional training -> save (safetensors + tokenizer),
written to a temporary directory beside the output and renamed when complete; never into the input.
A Llama language model goes to a transformers MoE layout (build.py); a model of any other architecture
(CLIP vision encoder, LLaVA) gets MLPMoE blocks in place of its two-layer MLPs (modules.py)."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from ..quantize.formats import DEFAULT_GROUP_SIZE
from .build import DEFAULT_TOP_K, SUPPORTED_DENSE, UpcycleError, bake_ternary, ternary_experts, upcycle
from ..quantize.ternary import is_ternary
from .train import train

UPCYCLE_JSON = "upcycle.json"


def checkpoint_dir_for(out_dir: Path) -> Path:
    """Where training checkpoints of `out_dir` live (beside it), so a killed run resumes when re-run."""
    out_dir = Path(out_dir).resolve()
    return out_dir.parent / f".{out_dir.name}.upcycle-ckpt"


def upcycle_cli(dense_dir: str | Path, out_dir: str | Path, experts: int = 8, top_k: int | None = None,
                ternary: bool = False, shared_expert: bool = False, train_text: str | Path | None = None,
                steps: int = 0, lr: float = 1e-4, modules: str | None = None, *, batch_size: int = 4,
                seq_len: int = 256, balance_coef: float = 0.01, checkpoint_every: int = 50,
                group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0, overwrite: bool = False,
                freeze_shared: bool = False, drop_ratio: float = 0.0, log=print) -> Path:
    """Returns the written directory. Training checkpoints go to checkpoint_dir_for(out_dir) and are
    removed once the model is saved; re-running the same command after a kill resumes from them."""
    from transformers import AutoModelForCausalLM

    from ..calibration.data import read_text, tokenize
    from ..io.checkpoint import commit_output, prepare_output
    from ..io.models import _check_weights, load_tokenizer, read_config
    from ..io.validate import checkpoint_headers

    check_arguments(experts, top_k, steps, lr, batch_size, seq_len, checkpoint_every, group_size, modules)
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    cfg = read_config(dense_dir)
    save_dtype = getattr(torch, str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"))  # the dense model's
    _check_weights(dense_dir)
    checkpoint_headers(dense_dir)  # a damaged file: an error naming it, before anything is loaded
    if cfg.get("model_type") not in SUPPORTED_DENSE:
        llama_only = [flag for flag, given in (("--ternary", ternary), ("--shared-expert", shared_expert),
                                               ("--train-text/--steps", train_text or steps),
                                               ("--freeze-shared", freeze_shared),
                                               ("--drop-ratio", drop_ratio)) if given]
        if llama_only:
            raise UpcycleError(f"{', '.join(llama_only)}: for Llama language models only; the two-layer MLPs of a "
                               f"{cfg.get('model_type')!r} model become plain copies (CuMo), untrained")
        return _upcycle_mlps(dense_dir, out_dir, cfg, save_dtype, experts, DEFAULT_TOP_K if top_k is None else top_k,
                             modules, seed, overwrite, log)
    if drop_ratio and not (train_text and steps):
        log(f"warning: --drop-ratio {drop_ratio} without --train-text/--steps writes experts whose re-initialised "
            "neurons were never trained (the model is worse than the dense one until they are)")
    tmp = prepare_output(out_dir, dense_dir, overwrite)  # refuses out_dir == / inside / containing dense_dir
    try:
        dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32, use_safetensors=True).eval()
        tokenizer = load_tokenizer(dense_dir)
        model = upcycle(dense, experts, top_k, ternary, shared_expert, modules, group_size=group_size, seed=seed,
                        drop_ratio=drop_ratio)
        del dense
        if freeze_shared:
            for n, p in model.named_parameters():
                if ".shared_expert." in n:
                    p.requires_grad_(False)
        info = {"source": str(dense_dir.resolve()), "experts": experts, "top_k": model.config.num_experts_per_tok,
                "ternary": ternary, "shared_expert": shared_expert, "modules": modules, "group_size": group_size,
                "model_type": model.config.model_type, "drop_ratio": drop_ratio, "steps": 0, "train_tokens": 0}
        if train_text and steps > 0:
            ids = tokenize(tokenizer, read_text(train_text))
            ckdir = checkpoint_dir_for(out_dir)
            r = train(model, ids, steps, lr, batch_size, seq_len, balance_coef, checkpoint_dir=ckdir,
                      checkpoint_every=checkpoint_every, seed=seed)
            info.update(steps=r.steps, train_tokens=r.tokens, resumed_from=r.start_step, lr=lr, seq_len=seq_len,
                        batch_size=batch_size, final_loss=r.losses[-1] if r.losses else None,
                        train_text=str(Path(train_text).resolve()))
            log(f"trained {r.steps} steps ({r.tokens:,} tokens), last LM loss {info['final_loss']:.4f}")
        parametrized = ternary_experts(model)
        bake_ternary(model)
        model = model.to(save_dtype)
        for m in parametrized:  # the saved model IS ternary: check it after the cast to the saved dtype
            for w in (m.gate_up_proj, m.down_proj):
                if not bool(is_ternary(w.detach(), group_size).all()):
                    raise AssertionError("internal error: baked ternary experts are not ternary after the cast")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / UPCYCLE_JSON).write_text(json.dumps(info, indent=1))
        commit_output(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(checkpoint_dir_for(out_dir), ignore_errors=True)
    log(f"wrote {out_dir} ({info['model_type']}, {experts} experts, top-{info['top_k']}"
        f"{', ternary routed experts' if ternary else ''}{', shared expert' if shared_expert else ''})")
    return out_dir


def check_arguments(experts: int, top_k: int | None, steps: int, lr: float, batch_size: int, seq_len: int,
                    checkpoint_every: int, group_size: int, modules: str | None) -> None:
    """The numbers and the regex of `cli.py upcycle`, before anything is loaded."""
    bad = [f"--{name} {value}" for name, value, ok in (
        ("experts", experts, experts >= 1), ("top-k", top_k, top_k is None or 1 <= top_k <= experts),
        ("steps", steps, steps >= 0), ("lr", lr, math.isfinite(lr) and lr > 0), ("batch-size", batch_size, batch_size >= 1),
        ("seq-len", seq_len, seq_len >= 2), ("checkpoint-every", checkpoint_every, checkpoint_every >= 1),
        ("group-size", group_size, group_size >= 1)) if not ok]
    if bad:
        raise UpcycleError(f"{', '.join(bad)}: out of range (experts, batch size, checkpoint interval and group size at "
                           f"least 1, top-k from 1 to the number of experts, steps at least 0, seq-len at least 2, "
                           "lr a positive number)")
    if modules is not None:
        try:
            re.compile(modules)
        except re.error as err:
            raise UpcycleError(f"--modules {modules!r} is not a regular expression: {err}") from None


def _upcycle_mlps(dense_dir: Path, out_dir: Path, cfg: dict, save_dtype: torch.dtype, experts: int, top_k: int,
                  modules: str | None, seed: int, overwrite: bool, log) -> Path:
    """Any architecture: the two-layer MLPs matching `modules` become MLPMoE blocks; written as safetensors
    with `moe_modules` in config.json (io.models.load_model rebuilds them), plus tokenizer / processor files."""
    from ..api import MAX_SHARD_BYTES
    from ..io.checkpoint import commit_output, prepare_output, save_model
    from ..io.models import architecture_class, copy_sidecars
    from ..runtime.moe import CONFIG_KEY, config_entry
    from .modules import upcycle_modules

    cls = architecture_class(cfg.get("architectures"))
    tmp = prepare_output(out_dir, dense_dir, overwrite)  # refuses out_dir == / inside / containing dense_dir
    try:
        model = cls.from_pretrained(dense_dir, dtype=torch.float32, use_safetensors=True).eval()
        names = upcycle_modules(model, experts, top_k, modules, seed=seed)
        save_model(model, tmp, save_dtype, MAX_SHARD_BYTES, {CONFIG_KEY: config_entry(model)})
        copy_sidecars(dense_dir, tmp)
        info = {"source": str(dense_dir.resolve()), "experts": experts, "top_k": top_k, "modules": modules,
                "upcycled": names, "model_type": cfg.get("model_type"), "architecture": cls.__name__, "steps": 0}
        (tmp / UPCYCLE_JSON).write_text(json.dumps(info, indent=1))
        commit_output(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir} ({cls.__name__}, {len(names)} MLPs up-cycled to {experts} experts, top-{top_k}: "
        f"{', '.join(names)})")
    return out_dir
