// Shared by the kernels (packed.cpp): the matrix descriptor, float conversions, code access, activations.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define MC_BF16 1
#endif

enum Kind : int32_t { KIND_INT = 0, KIND_TERNARY = 1, KIND_GGML = 2, KIND_F16 = 3, KIND_BF16 = 4 };
enum Out : int32_t { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

struct Mat {
  int32_t kind;
  int32_t bits;  // KIND_INT: 2, 3, 4, 5, 6, 8; KIND_GGML: the GGUF type id
  int64_t N, K;
  const uint8_t* q;  // [N, rowbytes]; KIND_F16 / KIND_BF16: the 16-bit weights [N, K]
  int64_t rowbytes;
  const uint16_t* scales;  // fp16 [N, G] (int, ternary)
  const uint16_t* zeros;   // fp16 [N, G] (asymmetric int), else null
  int64_t G, gs;
};

static inline float bits2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f2bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float h2f(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f;
  uint32_t m = h & 0x3ff;
  if (e == 31) return bits2f(sign | 0x7f800000u | (m << 13));
  if (e != 0) return bits2f(sign | ((e + 112) << 23) | (m << 13));
  const float v = (float)m * 5.9604644775390625e-08f;  // subnormal: m * 2^-24, exact
  return sign ? -v : v;
}

static inline uint16_t f2bf(float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t u = f2bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}
static inline float bf2f(uint16_t b) { return bits2f((uint32_t)b << 16); }

static inline uint16_t f2h(float f) {  // round to nearest even (normal, subnormal, overflow to inf)
  const uint32_t u = f2bits(f), sign = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00);
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  // rounds past 65504
  if (a < 0x38800000u) return (uint16_t)(sign | (uint32_t)std::nearbyint(bits2f(a) * 16777216.0f));
  return (uint16_t)(sign | ((a + 0xfff + ((a >> 13) & 1) - 0x38000000u) >> 13));
}

#include "ggml_blocks.h"

static inline int code_at(const uint8_t* row, int64_t k, int bits, int64_t rowbytes) {
  const int64_t bit = k * bits, byte = bit >> 3;
  const int sh = (int)(bit & 7);
  uint32_t v = row[byte];
  if (sh + bits > 8 && byte + 1 < rowbytes) v |= (uint32_t)row[byte + 1] << 8;
  return (int)((v >> sh) & ((1u << bits) - 1));
}

// ---- activations ------------------------------------------------------------------------------------------------

struct Acts {
  int64_t M, K, ldx;
  const float* x;              // [M, ldx]
  std::vector<uint16_t> hi, lo;  // bf16 [M, K]: hi = bf16(x), lo = bf16(x - hi)
  bool has_lo;                 // false when x is exactly bf16 (a bf16 model): one dot product instead of two
  std::vector<float> xsum;     // [M, G]: sum of x over each group (zero points)
  bool oct;                    // hi / lo also in the order of dec128 (int2/3/4 with groups of whole 128-chunks)
  std::vector<uint16_t> ohi, olo;
};

// dec128's order: within each chunk of 128, position 32t + 2i + h holds element 8i + t + 4h
static inline int64_t oct_source(int64_t k) {
  const int64_t c = k & ~int64_t(127), r = k & 127, t = r >> 5, i = (r & 31) >> 1, h = r & 1;
  return c + 8 * i + t + 4 * h;
}

static Acts make_acts(const Mat& A, int64_t M, const float* x, int64_t ldx) {
  Acts a{M, A.K, ldx, x, {}, {}, false, std::vector<float>(M * A.G, 0.0f), false, {}, {}};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < A.G; ++g) {
      float t = 0.0f;
      for (int64_t k = g * A.gs; k < std::min(A.K, (g + 1) * A.gs); ++k) t += x[m * ldx + k];
      a.xsum[m * A.G + g] = t;
    }
#if defined(MC_BF16)
  a.hi.resize(M * A.K);
  a.lo.resize(M * A.K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < A.K; ++k) {
      const float v = x[m * ldx + k];
      const uint16_t h = f2bf(v), l = f2bf(v - bf2f(h));
      a.hi[m * A.K + k] = h;
      a.lo[m * A.K + k] = l;
      a.has_lo |= (l & 0x7fff) != 0;
    }
  a.oct = A.kind == KIND_INT && A.bits <= 4 && A.gs % 128 == 0 && A.K >= 128;
  if (a.oct) {
    const int64_t full = A.K & ~int64_t(127);
    a.ohi.resize(M * full);
    a.olo.resize(M * full);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < full; ++k) {
        a.ohi[m * full + k] = a.hi[m * A.K + oct_source(k)];
        a.olo[m * full + k] = a.lo[m * A.K + oct_source(k)];
      }
  }
#endif
  return a;
}

