"""fp16 scales: the rounding every format applies to its scales before codes are computed, and the absmean scale
of ternary groups. A leaf module (no package imports), shared by grid.py and ggml.py."""
import torch

FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): scales never round to 0
FP16_MAX = 65504.0


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round positive scales to fp16 (kept as float32), clamped into fp16's positive range."""
    return x.clamp(FP16_TINY, FP16_MAX).half().float()


def ternary_scale(x: torch.Tensor) -> torch.Tensor:
    """x [..., g] -> s [...]: mean |x| (absmean, BitNet b1.58 / MoTE), fp16-exact; a group already in {-m, 0, m} (a
    MoTE checkpoint) keeps s = m exactly, so ternary quantization is idempotent."""
    a = x.float().abs()
    m = a.amax(-1)
    on_grid = ((a == 0) | (a == m[..., None])).all(-1) & (m > 0) & (fp16_round(m) == m)
    return torch.where(on_grid, m, fp16_round(a.mean(-1)))
