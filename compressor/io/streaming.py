"""A model streamed from its safetensors one decoder layer at a time: compression without the 16-bit model in memory.

The architecture is built on the meta device from config.json. The stem (everything outside the decoder
layers but the LM head: embeddings, rotary tables, final norm) is read at once; it is what runs before the
first layer. Each decoder layer's tensors are read when `resident` enters it (only those keys, from whichever
shard holds them) and released back to the meta device when it exits. Checkpoint keys go through transformers'
own conversion (Mixtral's per-expert w1/w2/w3 fused into gate_up_proj/down_proj, GPT-OSS's transposed storage
as it is), so a layer holds exactly what `from_pretrained` would give it; non-persistent buffers (rotary
inv_freq) are computed as `from_pretrained` computes them.

Pass 1 (`resident`) releases each layer after its turn: peak memory is the stem, one layer (16-bit while read,
fp32 while worked on) and the calibration activations, whatever the number of layers. Pass 2 (`kept`) keeps each
layer once it is quantized, since it is part of the output: the compressed model grows layer by layer, and the
16-bit model is never whole in memory; `complete()` then reads the LM head.
"""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from ..arch.view import decoder_layers, layers_prefix
from .checkpoint import INDEX, _weight_files, init_non_persistent_buffers, skeleton
from .models import ModelDirError, _check_weights
from .validate import check_original, load_problems

STEM = "stem"  # the part of the model outside the decoder layers that runs before them
HEAD = "head"  # the output embeddings (LM head): read by complete() and, for a moment, by head()


class StreamedModel:
    """`model` is on the meta device but for its stem; `resident(i, layer)` (the `resident` argument of
    calibration.layerwise.layerwise) holds decoder layer i's weights while it is worked on."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype):
        from transformers import AutoConfig

        _check_loader()
        self.model_dir, self.dtype = Path(model_dir), dtype
        _check_weights(self.model_dir)  # pickle-only or no weights: an error saying what to do
        config = AutoConfig.from_pretrained(self.model_dir)
        if getattr(config, "quantization_config", None):
            raise ModelDirError(f"{self.model_dir}: config.json has a quantization_config; streaming reads unquantized "
                                "16/32-bit safetensors only")
        check_original(self.model_dir, config)  # every tensor whole and of its shape, before pass 1 reads any
        self.model = skeleton(config, dtype).eval()
        self._layer_re = re.compile(rf"^{re.escape(layers_prefix(self.model))}\.(\d+)\.")
        head = self.model.get_output_embeddings()
        self._head = next((f"{n}." for n, m in self.model.named_modules() if m is head), None) if head else None
        self.files, self.keys = self._index()
        self._load(STEM)
        self.model.tie_weights()  # a tied LM head is the embedding again (ties are broken by loading)

    def part_of(self, name: str) -> str | int:
        """STEM, HEAD or the decoder layer index a module, parameter or buffer name belongs to."""
        m = self._layer_re.match(name + ".")
        if m:
            return int(m.group(1))
        return HEAD if self._head and (name + ".").startswith(self._head) else STEM

    def _index(self) -> tuple[dict[str, Path], dict[str | int, list[str]]]:
        """Every checkpoint key's file (safetensors headers only) and the part its converted name falls in."""
        from safetensors import safe_open
        from transformers.core_model_loading import rename_source_key

        files: dict[str, Path] = {}
        for f in _weight_files(self.model_dir):
            with safe_open(f, framework="pt") as h:
                files.update(dict.fromkeys(h.keys(), f))
        renamings, converters = _split(_conversions(self.model))
        meta, prefix = self.model.state_dict(), self.model.base_model_prefix
        keys: dict[str | int, list[str]] = defaultdict(list)
        for key in files:  # the same renaming as transformers' loader (convert_and_load_state_dict_in_model)
            target, _ = rename_source_key(key, renamings, converters, prefix, meta)
            if target not in meta and key in meta:
                target, _ = rename_source_key(key, [], [], prefix, meta)
            if target in meta:  # other keys are unexpected: from_pretrained ignores them too
                keys[self.part_of(target)].append(key)
        return files, dict(keys)

    def _load(self, part: str | int) -> None:
        """Read the part's checkpoint tensors into the model (converted as from_pretrained converts them), and
        compute its non-persistent buffers; an error names any tensor the checkpoint does not provide."""
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        init_non_persistent_buffers(self.model, only={m for n, m in self.model.named_modules() if self.part_of(n) == part})
        keys = self.keys.get(part, [])
        with ExitStack() as stack, _quiet():
            handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in {self.files[k] for k in keys}}
            state = {k: handles[self.files[k]].get_slice(k) for k in keys}  # lazy: only these keys are read
            config = LoadStateDictConfig(dtype=self.dtype, dtype_plan=self.model._get_dtype_plan(self.dtype),
                                         weight_mapping=_conversions(self.model))
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        missing = [n for n, t in self.model.state_dict().items() if self.part_of(n) == part and t.is_meta]
        problems = load_problems(info)
        if missing or problems:
            where = "the embeddings and other tensors outside the decoder layers" if part == STEM else f"decoder layer {part}"
            raise ModelDirError(
                f"{self.model_dir}: the checkpoint does not provide {where} as its config.json describes (missing "
                f"{missing[:5]}{', ...' if len(missing) > 5 else ''}; {'; '.join(problems[:3]) or 'no other problem'}). "
                f"Check that every shard in {INDEX} is present and that config.json belongs to these weights.")

    def _check_layer(self, i: int, layer: nn.Module) -> None:
        if layer is not decoder_layers(self.model)[i]:
            raise ValueError(f"layer {i} is not a decoder layer of this streamed model")

    @contextmanager
    def resident(self, i: int, layer: nn.Module):
        """Decoder layer i read from disk while the block runs, then released back to the meta device."""
        self._check_layer(i, layer)
        self._load(i)
        try:
            yield
        finally:
            layer.to_empty(device="meta")

    @contextmanager
    def kept(self, i: int, layer: nn.Module):
        """Decoder layer i read from disk (unless it already is) and kept: pass 2 replaces its experts by packed
        ones, and the layer stays as part of the compressed model."""
        self._check_layer(i, layer)
        if any(t.is_meta for t in layer.state_dict().values()):
            self._load(i)
        yield

    @contextmanager
    def head(self):
        """The LM head read from disk while the block runs (the loss of layer sensitivity), then released; a tied
        head is the embedding, already in memory."""
        if not self.keys.get(HEAD):
            yield
            return
        self._load(HEAD)
        try:
            yield
        finally:
            self.model.get_output_embeddings().to_empty(device="meta")

    def complete(self) -> nn.Module:
        """The model with every tensor in memory, once pass 2 has kept every layer: reads the LM head (tied heads
        are the embedding again). An error if a layer was never read."""
        self._load(HEAD)
        self.model.tie_weights()
        left = sorted({str(self.part_of(n)) for n, t in self.model.state_dict().items() if t.is_meta})
        if left:
            raise RuntimeError(f"internal error: parts {left} of the streamed model were never read")
        return self.model

    def resident_bytes(self) -> int:
        """Bytes of the tensors currently in memory (not on the meta device), tied tensors once."""
        seen = {}
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if not t.is_meta:
                seen[t.data_ptr()] = t.nbytes
        return sum(seen.values())


def _check_loader() -> None:
    """Streaming reuses transformers' own loader (key conversion and loading of a subset of a checkpoint)."""
    import transformers

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: F401
        from transformers.core_model_loading import convert_and_load_state_dict_in_model, rename_source_key  # noqa: F401
        from transformers.modeling_utils import LoadStateDictConfig  # noqa: F401
    except ImportError as err:
        raise ImportError(f"streaming a model needs transformers' weight loader (core_model_loading, tested with "
                          f"5.24), which transformers {transformers.__version__} lacks ({err}): "
                          "pip install 'transformers>=5.24,<6'") from None


def _conversions(model: nn.Module) -> list:
    """transformers' checkpoint conversions for this model (a fresh copy: the loader keeps state in them)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(model)


def _split(conversions: list) -> tuple[list, list]:
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    return ([c for c in conversions if isinstance(c, WeightRenaming)],
            [c for c in conversions if isinstance(c, WeightConverter)])


@contextmanager
def _quiet():
    """No 'Loading weights' progress bar per layer."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()
