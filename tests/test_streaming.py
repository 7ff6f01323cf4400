"""Pass 1 streamed from the safetensors one decoder layer at a time (io/streaming.py): the same measurements and
plans as with the model in memory, only one layer resident at a time, sharded checkpoints, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor import api
from compressor.pipeline import inputs
from compressor.arch.view import decoder_layers, dense_linears, find_moe_blocks
from compressor.calibration.layerwise import layerwise
from compressor.config import Recipe
from compressor.io.accounting import predict_bytes
from compressor.io.checkpoint import INDEX
from compressor.io.models import ModelDirError, load_model, load_tokenizer
from compressor.io.streaming import StreamedModel
from compressor.measure import MeasurePass
from tiny import budget_recipe as recipe, file_tensor_bytes, save_tiny

FORMATS = ["int2", "int3", "int4", "ternary"]
QUIET = dict(log=lambda *_: None)
F16 = torch.float16


def windows(n: int = 5, length: int = 48) -> torch.Tensor:  # 48 > GPT-OSS's sliding window of 32
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(0))


def pass1(model, resident=None, check=None):
    """MeasurePass over every layer; `check(i)` runs while layer i is resident."""
    blocks = find_moe_blocks(model)
    measure = MeasurePass(blocks, FORMATS, 16, False)

    def on_layer(i, layer, inputs):
        if check:
            check(i)
        return measure(i, layer, inputs)

    layerwise(model, windows(), on_layer, batch_size=2, **({"resident": resident} if resident else {}))
    return measure.results


def assert_same(streamed, in_memory):
    assert [m.name for m in streamed] == [m.name for m in in_memory] and streamed
    for s, m in zip(streamed, in_memory):
        assert torch.equal(s.count, m.count) and s.total_tokens == m.total_tokens
        torch.testing.assert_close(s.weight_sum, m.weight_sum)
        torch.testing.assert_close(s.eps_sq, m.eps_sq, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(s.hess_err, m.hess_err, rtol=1e-5, atol=1e-9)
        assert s.out_energy == pytest.approx(m.out_energy, rel=1e-6)


def streamed_pass1(src):
    """Pass 1 on a StreamedModel, checking at every layer that only that layer (and the stem) is in memory."""
    stream = StreamedModel(src, F16)
    layers = decoder_layers(stream.model)
    stem = stream.resident_bytes()
    assert stem > 0 and stream.model.get_output_embeddings().weight.is_meta, "the LM head is never read"
    assert all(p.is_meta for p in layers.parameters())
    peaks = []

    def check(i):
        assert all(p.is_meta for j, layer in enumerate(layers) if j != i for p in layer.parameters())
        assert not any(p.is_meta for p in layers[i].parameters())
        peaks.append(stream.resident_bytes() - stem)

    results = pass1(stream.model, stream.resident, check)
    assert all(p.is_meta for p in layers.parameters()), "every layer released after its turn"
    assert stream.resident_bytes() == stem
    largest = max(sum(p.numel() * 4 for p in layer.parameters()) for layer in layers)  # fp32 while worked on
    assert 0 < max(peaks) <= largest
    return stream, results


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_streamed_measurements_equal_in_memory(model_type, tmp_path):
    src = save_tiny(model_type, tmp_path / model_type)
    model = load_model(src, F16)
    stream, streamed = streamed_pass1(src)
    for name, buf in model.named_buffers():  # rotary inv_freq: not in the checkpoint, computed as from_pretrained does
        got = stream.model.get_buffer(name)
        if not got.is_meta:
            assert got.dtype == buf.dtype and torch.equal(got, buf), name
    assert stream.model.get_buffer("model.rotary_emb.inv_freq").abs().sum() > 0
    assert_same(streamed, pass1(model))


def test_sharded_checkpoint_streams_layer_by_layer(tmp_path):
    src = save_tiny("mixtral", tmp_path / "sharded", max_shard_size="100KB")
    shards = json.loads((src / INDEX).read_text())["weight_map"].values()
    assert len(set(shards)) > 2 and not (src / "model.safetensors").exists()
    stream, streamed = streamed_pass1(src)
    for part, keys in stream.keys.items():  # each layer reads exactly its own checkpoint keys
        if isinstance(part, int):
            assert keys and all(f".layers.{part}." in k for k in keys)
    assert sum(len(k) for k in stream.keys.values()) == len(list(shards))
    assert_same(streamed, pass1(load_model(src, F16)))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe"))




def in_memory_plan(r: Recipe):
    """The plan and predicted bytes with the whole model loaded (pass 1 in memory)."""
    model = load_model(r.model, F16)
    blocks = find_moe_blocks(model)
    dense = dense_linears(model, blocks)
    windows = api.calibration_data(r, load_tokenizer(r.model))
    plan = api.make_plan(r, model, blocks, dense, windows, F16)
    return plan, sum(predict_bytes(model, blocks, dense, plan, F16).values())


def no_full_load(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(api, "load_model", refuse)


def test_dry_run_streams_and_plans_as_in_memory(src, tmp_path, monkeypatch):
    r = recipe(src, tmp_path / "d", **{"allocation.budget": "3bits", "allocation.scope": "experts"})
    no_full_load(monkeypatch)
    streamed = json.loads((api.compress(r, dry_run=True, **QUIET) / "plan.json").read_text())
    monkeypatch.undo()
    plan, predicted = in_memory_plan(r)
    assert streamed["experts"] == plan.experts and streamed["dense"] == plan.dense
    assert len({f for fs in plan.experts.values() for f in fs}) > 1, "a mixed plan, not uniform"
    assert streamed["budget_bytes"] == plan.budget_bytes and streamed["predicted_bytes"] == predicted
    assert streamed["allocation"]["cost"] == pytest.approx(plan.allocation["cost"], rel=1e-6)


def test_streamed_plan_predicts_the_written_bytes(src, tmp_path, monkeypatch):
    over = {"allocation.budget": "10bits", "allocation.scope": "model"}
    r = recipe(src, tmp_path / "d", **over)
    no_full_load(monkeypatch)
    dry = api.compress(r, dry_run=True, **QUIET)
    monkeypatch.undo()
    plan = json.loads((dry / "plan.json").read_text())
    out = api.compress(recipe(src, tmp_path / "q", **{"allocation.plan": str(dry / "plan.json")}), **QUIET)
    assert file_tensor_bytes(out) == plan["predicted_bytes"] <= plan["budget_bytes"]
    # a real budget compress streams both passes, and plans the same
    used = []
    monkeypatch.setattr(inputs, "StreamedModel", lambda *a: used.append(a) or StreamedModel(*a))
    again = api.compress(recipe(src, tmp_path / "b", **over), **QUIET)
    assert used and json.loads((again / "plan.json").read_text())["experts"] == plan["experts"]
    assert file_tensor_bytes(again) == plan["predicted_bytes"]


def test_tied_embeddings_stream_with_exact_bytes(tmp_path, monkeypatch):
    tied = save_tiny("mixtral", tmp_path / "tied", tie_word_embeddings=True)
    r = recipe(tied, tmp_path / "d", **{"allocation.budget": "4bits", "allocation.scope": "model"})
    no_full_load(monkeypatch)
    streamed = json.loads((api.compress(r, dry_run=True, **QUIET) / "plan.json").read_text())
    monkeypatch.undo()
    plan, predicted = in_memory_plan(r)
    assert streamed["predicted_bytes"] == predicted and streamed["experts"] == plan.experts


def test_ternary_experts_are_found_while_streaming(tmp_path, monkeypatch):
    """A MoTE checkpoint (ternary experts) planned without ternary among the formats: the streamed pass finds
    them on the way and measures again with ternary, so they stay ternary as with the model in memory."""
    from compressor.upcycle import ternarize

    src = tmp_path / "mote"
    model = load_model(save_tiny("qwen2_moe", tmp_path / "dense"))
    with torch.no_grad():
        for b in find_moe_blocks(model):
            b.experts.gate_up_proj.copy_(ternarize(b.experts.gate_up_proj, 16))
            b.experts.down_proj.copy_(ternarize(b.experts.down_proj, 16))
    model.to(F16).save_pretrained(src)
    load_tokenizer(tmp_path / "dense").save_pretrained(src)
    (src / "calib.txt").write_text((tmp_path / "dense" / "calib.txt").read_text())
    over = {"allocation.formats": ["keep", "int8", "int4"], "allocation.scope": "experts"}
    no_full_load(monkeypatch)
    budget = json.loads((api.compress(recipe(src, tmp_path / "b", **over, **{"allocation.budget": "3bits"}),
                                      dry_run=True, **QUIET) / "plan.json").read_text())
    uniform = json.loads((api.compress(recipe(src, tmp_path / "u", **over), dry_run=True, **QUIET)
                          / "plan.json").read_text())
    monkeypatch.undo()
    assert all(f == "ternary" for fs in budget["experts"].values() for f in fs)
    assert all(f == "ternary" for fs in uniform["experts"].values() for f in fs)
    assert budget["experts"] == in_memory_plan(recipe(src, tmp_path / "m", **over, **{"allocation.budget": "3bits"})
                                               )[0].experts


def test_missing_weights_are_errors_naming_the_fix(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((save_tiny("mixtral", tmp_path / "m") / "config.json").read_text())
    with pytest.raises(ModelDirError, match=r"no \*\.safetensors"):
        StreamedModel(empty, F16)
    # a decoder layer's tensor is missing: the error names the tensor before any layer is read (io/validate.py)
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    gone = next(k for k in tensors if ".layers.1." in k and "q_proj" in k)
    save_file({k: v for k, v in tensors.items() if k != gone}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelDirError, match=r"missing model\.layers\.1\.self_attn\.q_proj\.weight"):
        StreamedModel(tmp_path / "m", F16)
    # a shard named by the index is gone
    sharded = save_tiny("mixtral", tmp_path / "s", max_shard_size="100KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelDirError, match=f"missing weight file {shard.name}"):
        StreamedModel(sharded, F16)


def tensors_of(directory) -> dict:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("model_type,over", [
    ("mixtral", {"quantization.bits": 3}),
    ("qwen2_moe", {"allocation.budget": "10bits", "allocation.scope": "model"}),  # shared experts, dense linears
    ("gpt_oss", {"quantization.bits": 2, "calibration.seq_len": 48}),
    ("mixtral", {"quantization.method": "rtn", "tie_word_embeddings": True}),
])
def test_streamed_pass_2_writes_what_the_loaded_model_writes(model_type, over, tmp_path, monkeypatch):
    """compress never holds the 16-bit model whole (pass 2 reads each layer and keeps it quantized, then the LM
    head), and writes exactly the tensors it writes with the model loaded."""
    over = dict(over)
    tied = over.pop("tie_word_embeddings", False)
    src = save_tiny(model_type, tmp_path / "src", **({"tie_word_embeddings": True} if tied else {}))
    reads, held = [], []
    real_load = StreamedModel._load

    def load(self, part):
        reads.append(part)
        held.append(self.resident_bytes())  # before this part is read
        return real_load(self, part)

    monkeypatch.setattr(StreamedModel, "_load", load)
    no_full_load(monkeypatch)
    streamed = api.compress(recipe(src, tmp_path / "s", **over), **QUIET)
    monkeypatch.undo()
    layers = [p for p in reads if isinstance(p, int)]
    n = len(decoder_layers(load_model(src)))
    assert layers[-n:] == list(range(n)) and reads[-1] == "head", "pass 2 reads every layer once, in order, then the head"
    whole = sum(t.nbytes for t in tensors_of(src).values())  # the 16-bit checkpoint
    assert max(held) < whole - sum(t.nbytes for k, t in tensors_of(src).items() if ".layers.1." in k)
    monkeypatch.setattr(api, "streamed_model", lambda *a, **k: None)  # the whole model loaded
    loaded = api.compress(recipe(src, tmp_path / "l", **over), **QUIET)
    a, b = tensors_of(streamed), tensors_of(loaded)
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((streamed / "plan.json").read_text())["experts"] == json.loads(
        (loaded / "plan.json").read_text())["experts"]
