"""The shipped default model: loads with plain transformers, is an 8-expert top-2 MoE, is a trained
language model (perplexity on held-out Python docs below a measured bound) and has no dead experts."""

import math

import pytest

from compressor.assets import DEFAULT_MODEL_DIR, HELDOUT_TEXTS

# Measured at ship time on the first 2,048 tokens of heldout_pydocs (8 windows of 256): 368.2.
# The bound is 1.3x that, deliberately below the unigram level of the held-out text (1,117, see
# default_model/TRAINING.md), so an untrained or broken model (random init: ~8,000) fails.
MEASURED_PPL_2K = 368.2
PPL_BOUND = 480.0

_files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_missing = [f for f in _files if not (DEFAULT_MODEL_DIR / f).exists()]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"default model files absent from {DEFAULT_MODEL_DIR}: {_missing}")


@pytest.fixture(scope="module")
def model_and_ids():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    text = HELDOUT_TEXTS["pydocs"].read_text(encoding="utf-8")[:12_000]
    ids = tok(text, return_tensors="pt")["input_ids"][0][: 8 * 256]
    assert ids.numel() == 8 * 256
    return model.float().eval(), tok, ids.view(8, 256), torch


def test_size_and_format():
    import json

    total = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir() if f.is_file())
    assert total <= 40 * 2**20, total
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["dtype"] == "float16"
    assert "auto_map" not in cfg  # no remote code
    tcfg = json.loads((DEFAULT_MODEL_DIR / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_loads_as_moe(model_and_ids):
    model, tok, _, _ = model_and_ids
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 8
    assert model.config.num_experts_per_tok == 2
    for g in (model.config.hidden_size, model.config.intermediate_size):
        assert g % 128 == 0
    assert tok.eos_token is not None and tok.bos_token is not None
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_perplexity_and_live_experts(model_and_ids):
    model, _, batch, torch = model_and_ids
    cfg = model.config
    with torch.no_grad():
        out = model(input_ids=batch, output_router_logits=True, use_cache=False)
        logits = out.logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    ppl = math.exp(nll.item())
    assert math.isfinite(ppl)
    assert ppl < PPL_BOUND, f"perplexity {ppl:.1f} on 2k held-out pydocs tokens, expected about {MEASURED_PPL_2K}"
    for layer, router_logits in enumerate(out.router_logits):
        top = router_logits.topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
        counts = torch.bincount(top, minlength=cfg.num_local_experts)
        assert (counts > 0).all(), f"dead expert in layer {layer}: {counts.tolist()}"
