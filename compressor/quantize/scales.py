"""fp16 scales: the rounding every format applies to its scales before codes are computed, and the absmean scale
of ternary groups. A leaf module (no package imports), shared by grid.py and ggml.py."""
import torch

FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): scales never round to 0
FP16_MAX = 65504.0
# Scales stored in fp16 and loaded by a runtime in a bf16 model's dtype (vLLM casts them to the model's dtype) must be
# values both hold: bf16's 8 significant bits within fp16's normal range, where every such value is an fp16 value too
BF16_IN_FP16_MIN = 2.0 ** -14  # smallest normal fp16 (a power of two: exact in bf16)
BF16_IN_FP16_MAX = 65280.0     # largest bf16 value below fp16's maximum (255 * 2^8)
SCALE_DTYPES = ("float16", "bfloat16")


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round positive scales to fp16 (kept as float32), clamped into fp16's positive range."""
    return x.clamp(FP16_TINY, FP16_MAX).half().float()


def round_scales(x: torch.Tensor, scale_dtype: str = "float16") -> torch.Tensor:
    """Positive scales rounded to the values their storage (fp16) and the runtime's `scale_dtype` both hold (kept as
    float32): fp16 itself, or for "bfloat16" the nearest bf16 value within fp16's normal range."""
    if scale_dtype == "float16":
        return fp16_round(x)
    if scale_dtype == "bfloat16":  # both clamp bounds are bf16 values, so the rounding stays within them
        return x.clamp(BF16_IN_FP16_MIN, BF16_IN_FP16_MAX).bfloat16().float()
    raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")


def ternary_scale(x: torch.Tensor) -> torch.Tensor:
    """x [..., g] -> s [...]: mean |x| (absmean, BitNet b1.58 / MoTE), fp16-exact; a group already in {-m, 0, m} (a
    MoTE checkpoint) keeps s = m exactly, so ternary quantization is idempotent."""
    a = x.float().abs()
    m = a.amax(-1)
    on_grid = ((a == 0) | (a == m[..., None])).all(-1) & (m > 0) & (fp16_round(m) == m)
    return torch.where(on_grid, m, fp16_round(a.mean(-1)))
