"""Loading models from local directories, with errors that say what is wrong and how to fix it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..arch.families import family_for
from ..errors import UserError
from ..runtime.moe import CONFIG_KEY as MOE_MODULES

QUANT_METHOD = "moe-compressor"


class ModelDirError(UserError, ValueError):
    pass


def read_config(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise ModelDirError(f"{model_dir} is a file: pass the model directory (config.json and its weights); a "
                            "config.json alone is planned by `compress CONFIG.json --dry-run --synthetic-stats`")
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory not found: {model_dir}")
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise ModelDirError(f"{model_dir} has no config.json: pass a transformers model directory (save_pretrained output)")
    return read_config_file(cfg)


def read_config_file(cfg: Path) -> dict:
    """A config.json file: one JSON object."""
    try:
        config = json.loads(Path(cfg).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelDirError(f"{cfg} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{cfg} holds a JSON {type(config).__name__}, not an object: it must be the config.json of a "
                            "transformers model (save_pretrained output)")
    return config


def is_compressed(model_dir: str | Path) -> bool:
    qc = read_config(model_dir).get("quantization_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _check_weights(model_dir: Path) -> None:
    if any(model_dir.glob("*.safetensors")):
        return
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelDirError(
            f"{model_dir} holds only pickle weights (.bin/.pt), which moe-compressor does not load (pickle can run "
            "code). Convert them once, in an environment you trust, with save_pretrained(..., safe_serialization=True)."
        )
    raise ModelDirError(f"{model_dir} has no *.safetensors weights")


def architecture_class(architectures: list[str] | None):
    """The transformers model class a config.json's `architectures` names, looked up in transformers itself
    (never remote code): how models of any type holding up-cycled MLPMoE blocks are built."""
    import transformers

    name = (architectures or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelDirError(f"config.json names architecture {name!r}, which is not a model class of transformers "
                            f"{transformers.__version__}")
    return cls


def check_supported(config: dict, where: str | Path = "config.json") -> None:
    """An error listing the supported families unless config.json is one of them (or lists up-cycled MLP blocks,
    which any architecture may hold)."""
    if MOE_MODULES not in config:
        family_for(config.get("model_type", "<missing model_type>"))
        from .validate import check_architecture, check_config_values

        check_config_values(config, where)
        check_architecture(config, where)


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               dynamic_pruning: bool = True) -> nn.Module:
    """Any supported model: an original transformers checkpoint, one up-cycled with MLPMoE blocks
    (`upcycle --modules`, any architecture), or one this project compressed (with its saved
    dynamic-pruning rule applied unless `dynamic_pruning` is False)."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    check_supported(config, model_dir / "config.json")
    if is_compressed(model_dir):
        from .checkpoint import load_compressed

        return load_compressed(model_dir, dtype, dynamic_pruning)
    _check_weights(model_dir)
    if MOE_MODULES in config:
        from .checkpoint import load_upcycled

        return load_upcycled(model_dir, dtype)
    from .validate import check_checkpoint

    check_checkpoint(model_dir, trust_remote_code)  # damaged or mismatched weights: an error, not a random init
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except ImportError as err:  # another tool's quantization_config whose package is not installed, and the like
        raise ModelDirError(f"{model_dir}: transformers cannot load this model here: {str(err)[:300]}") from None
    return model.eval()


SIDECAR_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                 "preprocessor_config.json", "processor_config.json", "chat_template.*", "generation_config.json")


def copy_sidecars(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and processor files of a model directory (the ones present) unchanged: for models
    whose tokenizer the pipeline never loads (an up-cycled vision tower or LLaVA)."""
    import shutil

    names = sorted({f.name for pattern in SIDECAR_FILES for f in Path(src).glob(pattern) if f.is_file()})
    for name in names:
        shutil.copy2(Path(src) / name, Path(dst) / name)
    return names


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelDirError(f"{model_dir}: no usable tokenizer files ({err})") from None
