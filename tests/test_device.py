"""Device-agnostic execution: every decoder layer runs on the device the pipeline chooses, with its inputs there, and
nothing is allocated on a hard-coded device. No GPU here: tests/elsewhere.py gives a real second device on the CPU
(PyTorch's PrivateUse1 slot backed in Python) on which mixing host and device tensors fails as it does on CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import api
from compressor.io.checkpoint import read_tensors
from elsewhere import DEVICE, HOST, elsewhere_factories
from tiny import budget_recipe, save_tiny

QUIET = dict(log=lambda *_: None)


def use_device(monkeypatch, device: torch.device) -> None:
    """The driver's device, patched to `device` (what `--device cuda` gives on a GPU machine)."""
    from compressor.pipeline import driver

    monkeypatch.setattr(driver, "resolve", lambda _name: device)


def layer_devices() -> tuple[list, object]:
    """(seen, handle): for each decoder layer call that computes (not a capture's identity), the devices of the layer's
    tensors and of its positional tensor inputs (the hidden states)."""
    seen = []

    def hook(module, args):
        if type(module).__name__.endswith("DecoderLayer") and "forward" not in module.__dict__:
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            seen.append({t.device for t in [*module.parameters(), *module.buffers(), *inputs]})

    return seen, torch.nn.modules.module.register_module_forward_pre_hook(hook)


@pytest.mark.parametrize("family", ["qwen2_moe"])  # routed experts, a shared expert and its dense linears
def test_layers_run_on_the_chosen_device_and_write_what_the_host_writes(family, tmp_path, monkeypatch):
    src = save_tiny(family, tmp_path / "m")
    config = json.loads((src / "config.json").read_text())  # eager attention: SDPA picks its kernel by device type,
    (src / "config.json").write_text(json.dumps({**config, "attn_implementation": "eager"}))  # the rest does not
    over = {"allocation.budget": "4bits", "allocation.scope": "experts", "calibration.samples": 4,
            "calibration.seq_len": 32, "allocation.reuse_measurements": False}
    on_host = api.compress(budget_recipe(src, tmp_path / "host", **over), **QUIET)
    use_device(monkeypatch, DEVICE)
    seen, handle = layer_devices()
    try:
        with elsewhere_factories():
            on_device = api.compress(budget_recipe(src, tmp_path / "device", **over), **QUIET)
    finally:
        handle.remove()
    assert len(seen) >= 3 * 2, "pass 1, the layer sensitivity and pass 2 ran every layer"
    assert all(devices == {DEVICE} for devices in seen), seen
    a, b = read_tensors(on_host), read_tensors(on_device)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the same tensors, back on the host"
    assert all(t.device == HOST for t in b.values())


def test_hessians_on_the_host_give_the_same_output(tmp_path, monkeypatch):
    src = save_tiny("mixtral", tmp_path / "m")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "attn_implementation": "eager"}))
    over = {"quantization.bits": 3, "calibration.samples": 4, "calibration.seq_len": 32}
    ref = api.compress(budget_recipe(src, tmp_path / "ref", **over), **QUIET)
    use_device(monkeypatch, DEVICE)
    with elsewhere_factories():
        out = api.compress(budget_recipe(src, tmp_path / "out", **over, **{"execution.hessians": "cpu"}), **QUIET)
    a, b = read_tensors(ref), read_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
