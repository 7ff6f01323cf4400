"""A short causal-LM training loop for up-cycled MoEs: LM loss + a per-layer load-balancing loss,
a tqdm bar (loss, tokens/s), checkpoints every N steps, resume after a kill.

Batches are a pure function of (seed, step), so a resumed run sees the same data as an uninterrupted one.
Checkpoints hold no pickle: `step-<N>/model.safetensors` (the full state dict, latent ternary weights
included), `optim.safetensors` (AdamW moments, flattened) and `state.json` written last (a checkpoint
without it is incomplete and ignored).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

STATE = "state.json"

from .build import UpcycleError


@dataclass
class TrainResult:
    start_step: int  # the step resumed from (0 for a fresh run)
    steps: int  # the last step done
    tokens: int  # training tokens seen in total (resumed part included)
    losses: list[float] = field(default_factory=list)  # LM loss per step (resumed part included)
    balance: list[float] = field(default_factory=list)  # load-balancing loss per step
    seconds: float = 0.0  # this run's wall time


def routers(model: nn.Module) -> list[nn.Module]:
    """The top-k routers of Mixtral / Qwen2-MoE style blocks (`<block>.gate` with `top_k` and `num_experts`)."""
    return [m for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "top_k")]


def balance_loss(logits: torch.Tensor, index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer load balancing for one layer: E * sum_i f_i * P_i, where f_i is the fraction
    of routed (token, slot) pairs sent to expert i and P_i its mean router probability. 1 when uniform."""
    probs = logits.float().softmax(-1)  # [T, E]
    f = F.one_hot(index, num_experts).float().mean(dim=(0, 1))  # [E]
    return num_experts * (f * probs.mean(0)).sum()


class RouterTap:
    """Forward hooks collecting (router logits, top-k index) per layer for the balance loss."""

    def __init__(self, model: nn.Module):
        self.seen: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.handles = [r.register_forward_hook(self._hook) for r in routers(model)]

    def _hook(self, module, args, out) -> None:
        logits, _, index = out
        self.seen.append((logits, index, module.num_experts))

    def pop_loss(self) -> torch.Tensor:
        losses = [balance_loss(*s) for s in self.seen]
        self.seen = []
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def batch_at(ids: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """[batch_size, seq_len + 1] windows at offsets drawn from (seed, step) only."""
    if ids.numel() < seq_len + 2:
        raise UpcycleError(f"training text has {ids.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}: use a longer "
                           "--train-text or a smaller --seq-len")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------- checkpoints

def latest_checkpoint(directory: Path) -> Path | None:
    done = [d for d in directory.glob("step-*") if (d / STATE).is_file()] if directory.is_dir() else []
    return max(done, key=lambda d: int(d.name.split("-")[1]), default=None)


def save_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict, keep: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{state['step']}"
    tmp = directory / f".tmp-step-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    moments = {}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            moments[f"{i}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    save_file(moments, tmp / "optim.safetensors")
    (tmp / STATE).write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    done = sorted((d for d in directory.glob("step-*") if (d / STATE).is_file()), key=lambda d: int(d.name.split("-")[1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    model.load_state_dict(load_file(path / "model.safetensors"))
    flat = load_file(path / "optim.safetensors")
    state: dict[int, dict] = {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return json.loads((path / STATE).read_text())


# ------------------------------------------------------------------------------------------------ training

def lr_at(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warmup, then cosine to 10% of lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(model: nn.Module, text_ids: torch.Tensor, steps: int, lr: float = 1e-4, batch_size: int = 4,
          seq_len: int = 128, balance_coef: float = 0.01, warmup: int = 0, weight_decay: float = 0.0,
          checkpoint_dir: str | Path | None = None, checkpoint_every: int = 50, resume: bool = True, seed: int = 0,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `model` (all its requires_grad parameters) for `steps` optimizer steps in total on windows of
    `text_ids` [N]. With `checkpoint_dir` it saves every `checkpoint_every` steps and at the end, and (with
    `resume`) continues from the latest complete checkpoint there. `on_step(step, loss)` runs after each step."""
    params = trainable(model)
    opt = torch.optim.AdamW([p for _, p in params], lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    state = {"step": 0, "tokens": 0, "losses": [], "balance": [], "seed": seed}
    last = latest_checkpoint(ckpt_dir) if ckpt_dir and resume else None
    if last is not None:
        state = load_checkpoint(last, model, opt)
        if state["seed"] != seed:
            raise UpcycleError(f"{last} was trained with seed {state['seed']}, not {seed}; pass the same seed or resume=False")
    start = state["step"]
    tap = RouterTap(model)
    model.train()
    t0, tokens0 = time.time(), state["tokens"]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="upcycle-train", disable=not progress)
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, lr, warmup, steps)
            batch = batch_at(text_ids, step, batch_size, seq_len, seed)
            with parametrize.cached():  # each ternary weight is ternarized once per step, not once per expert
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            bal = tap.pop_loss()
            opt.zero_grad(set_to_none=True)
            (lm + balance_coef * bal).backward()
            opt.step()
            state["step"], state["tokens"] = step + 1, state["tokens"] + batch_size * seq_len
            state["losses"].append(float(lm.detach()))
            state["balance"].append(float(bal.detach()))
            bar.set_postfix(loss=f"{state['losses'][-1]:.3f}", bal=f"{state['balance'][-1]:.3f}",
                            tok_s=f"{(state['tokens'] - tokens0) / max(time.time() - t0, 1e-9):.0f}")
            if ckpt_dir and (state["step"] % checkpoint_every == 0 or state["step"] == steps):
                save_checkpoint(ckpt_dir, model, opt, state)
            if on_step is not None:
                on_step(state["step"], state["losses"][-1])
    finally:
        tap.close()
        model.eval()
        bar.close()
    return TrainResult(start, state["step"], state["tokens"], state["losses"], state["balance"], time.time() - t0)

