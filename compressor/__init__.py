"""moe-compressor: post-training compression for Mixture-of-Experts language models.

Data flow (see README, "Architecture"):
arch (find experts) -> calibration (per-expert statistics) -> analysis (importance, error tables)
-> allocation (per-expert format under a byte budget) -> quantize (GPTQ / RTN / ternary)
-> io (packed checkpoint) -> runtime (load, dequantize per expert, dynamic pruning).

Dependency rule: quantize/, allocation/ and analysis/ import torch/numpy and the core types only,
never transformers. Only arch/, io/, upcycle/, api.py and cli.py import transformers.
"""

__version__ = "0.1.0"
