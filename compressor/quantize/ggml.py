"""GGML block formats (the weight types of GGUF files, run by llama.cpp) as formats of this package.

Each type stores a row of weights as consecutive blocks of `block` weights (32 or 256), each block a fixed number
of bytes holding its integer codes and its scale header. Within a block, every `sub` consecutive weights share one
affine map w = a * q (+ b), with a and b derived from the header in float32 by exactly the operations llama.cpp's
and gguf-py's dequantizers perform, so `dequantize` here equals `gguf.quants.dequantize` bit for bit (tested):

  type   block bytes  sub  codes q     header (per block)                       a, b per sub-block
  q4_0    32    18    32   [-8, 7]     d fp16                                   a = d
  q4_1    32    20    32   [0, 15]     d, m fp16                                a = d, b = m
  q5_0    32    22    32   [-16, 15]   d fp16                                   a = d
  q5_1    32    24    32   [0, 31]     d, m fp16                                a = d, b = m
  q8_0    32    34    32   [-128, 127] d fp16                                   a = d
  q2_k   256    84    16   [0, 3]      d, dmin fp16; 16 x (sc, m) 4-bit         a = d sc, b = -(dmin m)
  q3_k   256   110    16   [-4, 3]     d fp16; 16 x sc 6-bit signed [-32, 31]   a = d sc
  q4_k   256   144    32   [0, 15]     d, dmin fp16; 8 x (sc, m) 6-bit          a = d sc, b = -(dmin m)
  q5_k   256   176    32   [0, 31]     d, dmin fp16; 8 x (sc, m) 6-bit          a = d sc, b = -(dmin m)
  q6_k   256   210    16   [-32, 31]   d fp16; 16 x sc int8                     a = d sc
  tq1_0  256    54   256   {-1, 0, 1}  d fp16 (codes base-3, 5 per byte)        a = d
  tq2_0  256    66   256   {-1, 0, 1}  d fp16 (codes 2-bit)                     a = d

A matrix [out, in] in type t is `qweight` uint8 [out, in / block * bytes]: its rows exactly as a GGUF tensor stores
them, so exporting is a copy. Rows must be a whole number of blocks (in % block == 0): the k-quant and ternary types
need rows of a multiple of 256, the 32-weight types of 32.

`fit` chooses the header of each block from its weights: each sub-block's step (and offset) by a search for the
least weighted squared rounding error (quantize/scale_search.py; importance uniform, or a Hessian's diagonal), the
super-block scales by rounding those, absmean for ternary as in quantize/grid.py (q8_0: absmax); `quantize_codes`
then rounds each weight on its sub-block's (a, b). GPTQ (quantize/gptq.py) fits each block's header when its sweep reaches the block
and rounds column by column on it, so what GPTQ evaluates is what is written. Pure torch; the layouts were read off
ggml's block definitions (facts of the format), the code is this project's own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .scale_search import search_affine, search_symmetric
from .scales import FP16_MAX, ternary_scale

Header = dict[str, torch.Tensor]


def _half(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (kept as float32), clamped into fp16's finite range; the sign is kept."""
    return x.clamp(-FP16_MAX, FP16_MAX).half().float()


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 (fp16-exact) [...] -> uint8 [..., 2], little-endian fp16."""
    return x.half().contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _fp16_from(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _pack_planes(v: torch.Tensor, width: int, run: int) -> torch.Tensor:
    """Unsigned codes [..., n] of `width` bits -> bytes [..., n * width / 8]: element c*P*run + s*run + j (P = 8 / width
    planes) sits in byte c*run + j at bit s*width. This one rule is every ggml code and scale layout but two."""
    planes = 8 // width
    x = v.to(torch.int32).unflatten(-1, (-1, planes, run))  # [..., chunks, P, run]
    shifts = (width * torch.arange(planes, dtype=torch.int32, device=x.device))[:, None]
    return (x << shifts).sum(-2, dtype=torch.int32).flatten(-2).to(torch.uint8)


def _unpack_planes(b: torch.Tensor, width: int, run: int) -> torch.Tensor:
    """Inverse of _pack_planes: bytes [..., m] -> unsigned codes uint8 [..., m * 8 / width]."""
    planes = 8 // width
    x = b.to(torch.int32).unflatten(-1, (-1, 1, run))  # [..., chunks, 1, run]
    shifts = (width * torch.arange(planes, dtype=torch.int32, device=x.device))[:, None]
    return ((x >> shifts) & (2 ** width - 1)).flatten(-3).to(torch.uint8)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim, with its sign."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _sub(importance: torch.Tensor | None, t: "GGMLType") -> torch.Tensor | None:
    """Importance [..., nb, block] -> [..., nb, nsub, sub], as the weights are split into sub-blocks."""
    return None if importance is None else importance.unflatten(-1, (t.nsub, t.sub))


def _ratio(x: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(x / d) clamped to [lo, hi]; 0 where d == 0."""
    safe = torch.where(d == 0, 1.0, d)
    return torch.where(d == 0, 0.0, torch.round(x / safe)).clamp(lo, hi)


@dataclass(frozen=True)
class GGMLType:
    name: str     # the format name in plans ("q4_k")
    gguf: str     # the GGMLQuantizationType name ("Q4_K")
    type_id: int  # its number in GGUF files
    block: int    # weights per block
    nbytes: int   # bytes per block
    sub: int      # weights sharing one (a, b)
    qmin: int
    qmax: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.block

    @property
    def nsub(self) -> int:
        return self.block // self.sub

    def row_bytes(self, n: int) -> int:
        if n % self.block:
            raise ValueError(f"format {self.name} stores rows in blocks of {self.block} weights; a row of {n} is not "
                             f"a whole number of blocks (allowed for this width: {', '.join(formats_for_width(n)) or 'none'})")
        return n // self.block * self.nbytes

    # --- the header <-> (a, b) ---------------------------------------------------------------------------------
    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> Header:
        """W [..., nb, block] float32 -> the header of each block: the sub-block steps (and offsets) that minimise
        the squared rounding error weighted by `importance` (broadcast to W; None: uniform), by
        quantize/scale_search.py, then stored as the type stores them."""
        raise NotImplementedError

    def affine(self, h: Header) -> tuple[torch.Tensor, torch.Tensor | None]:
        """a, b [..., nb, nsub] float32 (b None: no offset), by the dequantizer's own float operations."""
        raise NotImplementedError

    # --- bytes ---------------------------------------------------------------------------------------------------
    def encode(self, q: torch.Tensor, h: Header) -> torch.Tensor:
        """codes [..., nb, block] (int, in [qmin, qmax]) and header -> bytes uint8 [..., nb, nbytes]."""
        raise NotImplementedError

    def decode(self, raw: torch.Tensor) -> tuple[torch.Tensor, Header]:
        """bytes uint8 [..., nb, nbytes] -> codes int8 [..., nb, block], header."""
        raise NotImplementedError


# --- the 32-weight types: one fp16 scale (and min) per block -------------------------------------------------------

class _Legacy(GGMLType):
    """q4_0, q4_1, q5_0, q5_1, q8_0: w = d * q, or d * q + m (with a min); low 4 bits of the codes as nibbles
    (element j and j + 16 share a byte), the 5th bit of q5 in a 32-bit mask, q8_0 plain int8."""

    @property
    def has_min(self) -> bool:
        return self.qmin == 0

    @property
    def offset(self) -> int:  # the stored unsigned code is q + offset
        return 0 if self.has_min or self.qmin == -128 else -self.qmin

    def fit(self, W, importance=None):
        if self.has_min:
            a, b = search_affine(W, self.qmax, importance)
            return {"d": _half(a), "m": _half(b)}
        if self.qmin == -128:  # q8_0
            return {"d": _half(W.abs().amax(-1) / 127)}
        return {"d": _half(search_symmetric(W, self.qmin, self.qmax, importance))}

    def affine(self, h):
        return h["d"][..., None], (h["m"][..., None] if self.has_min else None)

    def encode(self, q, h):
        parts = [_fp16_bytes(h["d"])] + ([_fp16_bytes(h["m"])] if self.has_min else [])
        if self.qmin == -128:
            return torch.cat(parts + [q.to(torch.int8).view(torch.uint8)], -1)
        u = (q.to(torch.int32) + self.offset).to(torch.uint8)
        if self.qmax - self.qmin == 31:  # q5: the 5th bits, one per element
            parts.append(_pack_planes(u >> 4, 1, 1))
        return torch.cat(parts + [_pack_planes(u & 15, 4, 16)], -1)

    def decode(self, raw):
        h = {"d": _fp16_from(raw[..., 0:2])}
        at = 2
        if self.has_min:
            h["m"], at = _fp16_from(raw[..., 2:4]), 4
        if self.qmin == -128:
            return raw[..., at:].contiguous().view(torch.int8), h
        u = _unpack_planes(raw[..., -16:], 4, 16)
        if self.qmax - self.qmin == 31:
            u = u | (_unpack_planes(raw[..., at:at + 4], 1, 1) << 4)
        return (u.to(torch.int16) - self.offset).to(torch.int8), h


# --- k-quants: 256-weight super-blocks of sub-blocks with quantized scales ----------------------------------------

class _KMin(GGMLType):
    """q2_k, q4_k, q5_k: w = (d sc) q - (dmin m), sc and m unsigned (4 bits for q2_k, 6 bits otherwise)."""

    @property
    def scmax(self) -> int:
        return 15 if self.name == "q2_k" else 63

    def fit(self, W, importance=None):
        x = W.unflatten(-1, (self.nsub, self.sub))
        a, b = search_affine(x, self.qmax, _sub(importance, self), zero_in_range=True)  # [..., nb, nsub]
        ml = -b
        d, dmin = _half(a.amax(-1) / self.scmax), _half(ml.amax(-1) / self.scmax)
        return {"d": d, "dmin": dmin, "sc": _ratio(a, d[..., None], 0, self.scmax).to(torch.uint8),
                "m": _ratio(ml, dmin[..., None], 0, self.scmax).to(torch.uint8)}

    def affine(self, h):
        return h["d"][..., None] * h["sc"].float(), -(h["dmin"][..., None] * h["m"].float())

    def encode(self, q, h):
        u = q.to(torch.uint8)
        d, dmin = _fp16_bytes(h["d"]), _fp16_bytes(h["dmin"])
        if self.name == "q2_k":
            scales = _pack_planes(torch.cat([h["sc"], h["m"]], -1), 4, 16)
            return torch.cat([scales, _pack_planes(u, 2, 32), d, dmin], -1)
        parts = [d, dmin, _pack_scale_min(h["sc"], h["m"])]
        if self.name == "q5_k":
            parts.append(_pack_planes(u >> 4, 1, 32))
        return torch.cat(parts + [_pack_planes(u & 15, 4, 32)], -1)

    def decode(self, raw):
        if self.name == "q2_k":
            sm = _unpack_planes(raw[..., :16], 4, 16)
            h = {"sc": sm[..., :16], "m": sm[..., 16:], "d": _fp16_from(raw[..., 80:82]),
                 "dmin": _fp16_from(raw[..., 82:84])}
            return _unpack_planes(raw[..., 16:80], 2, 32).to(torch.int8), h
        sc, m = _unpack_scale_min(raw[..., 4:16])
        h = {"d": _fp16_from(raw[..., 0:2]), "dmin": _fp16_from(raw[..., 2:4]), "sc": sc, "m": m}
        u = _unpack_planes(raw[..., -128:], 4, 32)
        if self.name == "q5_k":
            u = u | (_unpack_planes(raw[..., 16:48], 1, 32) << 4)
        return u.to(torch.int8), h


def _pack_scale_min(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """8 scales and 8 mins of 6 bits [..., 8] each -> 12 bytes: bytes 0-3 hold sc 0-3 and bytes 4-7 m 0-3 in their
    low 6 bits, with the top 2 bits of sc / m 4-7 above them; bytes 8-11 hold the low 4 bits of sc 4-7 (low
    nibble) and of m 4-7 (high nibble)."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    lo = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6)], -1)
    hi = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return torch.cat([lo, hi], -1).to(torch.uint8)


def _unpack_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = b.to(torch.int32)
    s, mm, hi = x[..., 0:4], x[..., 4:8], x[..., 8:12]
    sc = torch.cat([s & 63, (hi & 15) | ((s >> 6) << 4)], -1)
    m = torch.cat([mm & 63, (hi >> 4) | ((mm >> 6) << 4)], -1)
    return sc.to(torch.uint8), m.to(torch.uint8)


class _KSym(GGMLType):
    """q3_k, q6_k: w = (d sc) q with signed sub-block scales (q3_k: 6 bits stored + 32; q6_k: int8)."""

    @property
    def sc_range(self) -> tuple[int, int]:
        return (-32, 31) if self.name == "q3_k" else (-128, 127)

    def fit(self, W, importance=None):
        x = W.unflatten(-1, (self.nsub, self.sub))
        a = search_symmetric(x, self.qmin, self.qmax, _sub(importance, self))  # [..., nb, nsub], signed
        lo, hi = self.sc_range
        d = _half(_signed_absmax(a) / lo)  # the largest scale lands on the most negative sc
        return {"d": d, "sc": _ratio(a, d[..., None], lo, hi).to(torch.int8)}

    def affine(self, h):
        return h["d"][..., None] * h["sc"].float(), None

    def encode(self, q, h):
        d = _fp16_bytes(h["d"])
        if self.name == "q3_k":
            u = (q.to(torch.int32) + 4).to(torch.uint8)  # [0, 7]: 2 low bits and a high bit
            s = (h["sc"].to(torch.int32) + 32).to(torch.uint8)
            scales = torch.cat([_pack_planes(s & 15, 4, 8), _pack_planes(s >> 4, 2, 4)], -1)
            return torch.cat([_pack_planes(u >> 2, 1, 32), _pack_planes(u & 3, 2, 32), scales, d], -1)
        u = (q.to(torch.int32) + 32).to(torch.uint8)  # [0, 63]: 4 low bits and 2 high bits
        return torch.cat([_pack_planes(u & 15, 4, 64), _pack_planes(u >> 4, 2, 32),
                          h["sc"].to(torch.int8).view(torch.uint8), d], -1)

    def decode(self, raw):
        if self.name == "q3_k":
            hbit, low = _unpack_planes(raw[..., 0:32], 1, 32), _unpack_planes(raw[..., 32:96], 2, 32)
            s = _unpack_planes(raw[..., 96:104], 4, 8) | (_unpack_planes(raw[..., 104:108], 2, 4) << 4)
            h = {"d": _fp16_from(raw[..., 108:110]), "sc": (s.to(torch.int16) - 32).to(torch.int8)}
            return ((low | (hbit << 2)).to(torch.int16) - 4).to(torch.int8), h
        u = _unpack_planes(raw[..., 0:128], 4, 64) | (_unpack_planes(raw[..., 128:192], 2, 32) << 4)
        h = {"d": _fp16_from(raw[..., 208:210]), "sc": raw[..., 192:208].contiguous().view(torch.int8)}
        return (u.to(torch.int16) - 32).to(torch.int8), h


# --- ternary: {-1, 0, 1} times one fp16 scale per 256 weights ------------------------------------------------------

_POW3 = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32)


class _Ternary(GGMLType):
    """tq2_0: codes + 1 as 2-bit planes. tq1_0: five codes + 1 per byte as a base-3 fraction scaled to 256 (byte =
    ceil(v * 256 / 243), v the five digits read as a base-3 number, first digit most significant); the digit k of a
    byte is then ((byte * 3^k mod 256) * 3) >> 8. Bytes 0-31 hold elements 32 i + j (digit i of byte j), bytes 32-47
    elements 160 + 16 i + j, bytes 48-51 elements 240 + 4 i + j (four digits and a zero)."""

    def fit(self, W, importance=None):  # absmean by design (MoTE / BitNet), whatever the importance
        return {"d": ternary_scale(W)}  # absmean; a block already in {-m, 0, m} keeps m exactly

    def affine(self, h):
        return h["d"][..., None], None

    def encode(self, q, h):
        u = (q.to(torch.int32) + 1)
        d = _fp16_bytes(h["d"])
        if self.name == "tq2_0":
            return torch.cat([_pack_planes(u.to(torch.uint8), 2, 32), d], -1)
        a = u[..., :160].unflatten(-1, (5, 32))
        b = u[..., 160:240].unflatten(-1, (5, 16))
        c = torch.nn.functional.pad(u[..., 240:].unflatten(-1, (4, 4)), (0, 0, 0, 1))  # 5th digit 0
        v = torch.cat([(x * _POW3.to(x.device)[:, None]).sum(-2) for x in (a, b, c)], -1)  # [..., 52] base-3 values < 243
        return torch.cat([((v * 256 + 242) // 243).to(torch.uint8), d], -1)

    def decode(self, raw):
        h = {"d": _fp16_from(raw[..., -2:])}
        if self.name == "tq2_0":
            return (_unpack_planes(raw[..., :64], 2, 32).to(torch.int16) - 1).to(torch.int8), h
        x = raw[..., :52].to(torch.int32)
        digits = (((x[..., None, :] * _POW3.to(x.device).flip(0)[:, None]) & 255) * 3) >> 8  # [..., 5, 52]: digit k of byte j
        a = digits[..., :, :32].flatten(-2)
        b = digits[..., :, 32:48].flatten(-2)
        c = digits[..., :4, 48:52].flatten(-2)
        return (torch.cat([a, b, c], -1) - 1).to(torch.int8), h


GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    _Legacy("q4_0", "Q4_0", 2, 32, 18, 32, -8, 7),
    _Legacy("q4_1", "Q4_1", 3, 32, 20, 32, 0, 15),
    _Legacy("q5_0", "Q5_0", 6, 32, 22, 32, -16, 15),
    _Legacy("q5_1", "Q5_1", 7, 32, 24, 32, 0, 31),
    _Legacy("q8_0", "Q8_0", 8, 32, 34, 32, -128, 127),
    _KMin("q2_k", "Q2_K", 10, 256, 84, 16, 0, 3),
    _KSym("q3_k", "Q3_K", 11, 256, 110, 16, -4, 3),
    _KMin("q4_k", "Q4_K", 12, 256, 144, 32, 0, 15),
    _KMin("q5_k", "Q5_K", 13, 256, 176, 32, 0, 31),
    _KSym("q6_k", "Q6_K", 14, 256, 210, 16, -32, 31),
    _Ternary("tq1_0", "TQ1_0", 34, 256, 54, 256, -1, 1),
    _Ternary("tq2_0", "TQ2_0", 35, 256, 66, 256, -1, 1),
)}


def formats_for_width(n: int) -> list[str]:
    """The ggml types a row of n weights can take (a whole number of blocks)."""
    return [name for name, t in GGML_TYPES.items() if n % t.block == 0]


# --- matrices: [..., out, in] <-> blocks -----------------------------------------------------------------------------

def per_column(t: GGMLType, h: Header) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The header's a, b expanded to every column: [..., out, nb * block]."""
    a, b = t.affine(h)
    expand = lambda p: None if p is None else p.repeat_interleave(t.sub, dim=-1).flatten(-2)
    return expand(a), expand(b)


def quantize_codes(t: GGMLType, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Float codes of w on (a, b), all broadcast together: round((w - b) / a) clamped to the type's range (0 where
    a == 0, where every code gives the same weight)."""
    x = w if b is None else w - b
    return _ratio(x, a, t.qmin, t.qmax)


def dequantize_codes(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """w = a * q (+ b), in float32: the dequantizer's own operations."""
    w = a * q.float()
    return w if b is None else w + b


def fit_matrix(t: GGMLType, W: torch.Tensor, importance: torch.Tensor | None = None) -> Header:
    """W [..., out, in] -> header [..., out, nb, ...]. `importance` [in] (or broadcastable to W): each column's
    weight in the fitted error, e.g. a Hessian's diagonal; None: the weights' own squared error."""
    t.row_bytes(W.shape[-1])
    if importance is not None:
        importance = importance.float().unflatten(-1, (-1, t.block))
    return t.fit(W.float().unflatten(-1, (-1, t.block)), importance)


def quantize_matrix(t: GGMLType, W: torch.Tensor, h: Header) -> torch.Tensor:
    """Codes int8 [..., out, in] of W on the given header (round to nearest)."""
    a, b = per_column(t, h)
    return quantize_codes(t, W.float(), a, b).to(torch.int8)


def dequantize_matrix(t: GGMLType, q: torch.Tensor, h: Header) -> torch.Tensor:
    a, b = per_column(t, h)
    return dequantize_codes(q, a, b)


def encode_matrix(t: GGMLType, q: torch.Tensor, h: Header) -> torch.Tensor:
    """codes [..., out, in] + header -> qweight uint8 [..., out, row_bytes]: the rows of a GGUF tensor."""
    return t.encode(q.unflatten(-1, (-1, t.block)), h).flatten(-2).contiguous()


def decode_matrix(t: GGMLType, raw: torch.Tensor, n: int) -> tuple[torch.Tensor, Header]:
    """qweight uint8 [..., out, row_bytes] -> codes int8 [..., out, n], header."""
    if raw.shape[-1] != t.row_bytes(n):
        raise ValueError(f"{t.name}: a row of {n} weights is {t.row_bytes(n)} bytes, got {raw.shape[-1]}")
    q, h = t.decode(raw.unflatten(-1, (-1, t.nbytes)))
    return q.flatten(-2), h
