// Matrix products straight from the packed checkpoint layouts (compressor/quantize/formats.py, ggml.py): on the
// decode path no weight is written to memory; only the checkpoint's own bytes are read. Built at first use by
// compressor/runtime/kernels/native.py (g++ -O3 -march=native -fopenmp), called through ctypes.
//
//   mc_gemv    y[m, n] = sum_k x[m, k] W[n, k]   x, y float32; a few rows of x (decode, small batches)
//   mc_dequant W -> float32 / bfloat16 / float16 rows (the operand of a library GEMM for prefill)
//
// Formats (struct Mat): int2/3/4/8 (codes LSB-first along each row, fp16 scales and zero points per (row, group),
// w = (q - z) * s), ternary (5 trits per byte, w = t * s), the GGUF block types (ggml_blocks.h) and keep (fp16).
// Tiers, chosen at compile time: AVX512-BF16 + VBMI (codes become bf16 pairs by a table lookup, vdpbf16ps against x
// split into two bf16 halves, hi + lo = x to 2^-16), AVX512F (codes to fp32, FMA), scalar. Compiled with
// -ffp-contract=off, so mc_dequant equals the Python dequantization bit for bit.
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

enum Kind : int32_t { KIND_INT = 0, KIND_TERNARY = 1, KIND_GGML = 2, KIND_F16 = 3 };
enum Out : int32_t { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

struct Mat {
  int32_t kind;
  int32_t bits;  // KIND_INT: 2, 3, 4, 8; KIND_GGML: the GGUF type id
  int64_t N, K;
  const uint8_t* q;  // [N, rowbytes]; KIND_F16: the fp16 weights
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
  a.oct = A.kind == KIND_INT && A.bits != 8 && A.gs % 128 == 0 && A.K >= 128;
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

// ---- tier 1: AVX512-BF16 ------------------------------------------------------------------------------------------
#if defined(MC_BF16)
static const __m512i BF16_SMALL = [] {  // vpermw table: bf16 of 0..31
  alignas(64) uint16_t t[32];
  for (int c = 0; c < 32; ++c) t[c] = f2bf((float)c);
  return _mm512_load_si512(t);
}();

static __m512i bf16_table(int bits) {  // vpermw table: entry j = bf16(j mod 2^bits) (vpermw reads 5 index bits)
  alignas(64) uint16_t t[32];
  for (int j = 0; j < 32; ++j) t[j] = f2bf((float)(j & ((1 << bits) - 1)));
  return _mm512_load_si512(t);
}

// 128 codes from a byte boundary -> four bf16 pair vectors: P[t] lane i = codes (8i + t, 8i + 4 + t). Each 32-bit lane
// first gathers the 8 codes 8i .. 8i + 7, codes 8i .. 8i + 3 in its low half and 8i + 4 .. 8i + 7 in its high half;
// shifting by t codes then puts one code of each half in the index bits the table reads.
template <int B> static inline void dec128(const uint8_t* p, __m512i* P);
static const __m512i T2 = bf16_table(2), T3 = bf16_table(3), T4 = bf16_table(4);
static const __m512i GATHER3 = [] {  // dec128<3>: lane i = bytes 3i, 3i + 1, 3i + 2 (codes 8i .. 8i + 7)
  alignas(64) uint8_t t[64] = {0};
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 3; ++j) t[4 * i + j] = (uint8_t)(3 * i + j);
  return _mm512_load_si512(t);
}();

template <> inline void dec128<4>(const uint8_t* p, __m512i* P) {
  const __m512i T = T4;
  const __m512i v = _mm512_loadu_si512(p);  // lane i = bytes 4i .. 4i + 3 = codes 8i .. 8i + 7 already
  for (int t = 0; t < 4; ++t) P[t] = _mm512_permutexvar_epi16(_mm512_srli_epi32(v, 4 * t), T);
}
template <> inline void dec128<2>(const uint8_t* p, __m512i* P) {
  const __m512i T = T2;
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));  // lane i = codes 8i .. 8i + 7
  const __m512i v = _mm512_or_si512(w, _mm512_slli_epi32(w, 8));
  for (int t = 0; t < 4; ++t) P[t] = _mm512_permutexvar_epi16(_mm512_srli_epi32(v, 2 * t), T);
}
template <> inline void dec128<3>(const uint8_t* p, __m512i* P) {
  const __m512i T = T3, GATHER = GATHER3;
  const __m512i data = _mm512_maskz_loadu_epi8(0xffffffffffffull, p);
  const __m512i w = _mm512_maskz_permutexvar_epi8(0x7777777777777777ull, GATHER, data);
  const __m512i v = _mm512_ternarylogic_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0xfff)),
                                              _mm512_slli_epi32(w, 4), _mm512_set1_epi32(0xfff0000), 0xf8);
  for (int t = 0; t < 4; ++t) P[t] = _mm512_permutexvar_epi16(_mm512_srli_epi32(v, 3 * t), T);
}

// 32 codes from a byte boundary -> bf16 pairs: 32-bit lane i holds codes 2i and 2i + 1, as x's bf16 pairs do
template <int B> static inline __m512i dec32(const uint8_t* p);
template <> inline __m512i dec32<4>(const uint8_t* p) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  const __m512i idx = _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(0x0f)),
                                      _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0xf0)), 12));
  return _mm512_permutexvar_epi16(idx, BF16_SMALL);
}
template <> inline __m512i dec32<2>(const uint8_t* p) {
  const __m128i b = _mm_loadl_epi64((const __m128i*)p);
  const __m512i v = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)),
                                      _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4));
  const __m512i idx = _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(3)),
                                      _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0xc)), 14));
  return _mm512_permutexvar_epi16(idx, BF16_SMALL);
}
static const __m512i GATHER3_32 = [] {
    alignas(64) uint8_t t[64] = {0};
    for (int i = 0; i < 16; ++i) { t[4 * i] = (uint8_t)((6 * i) >> 3); t[4 * i + 1] = (uint8_t)(((6 * i) >> 3) + 1); }
    return _mm512_load_si512(t);
}();
static const __m512i SHIFT3_32 = [] {
  alignas(64) int32_t t[16];
  for (int i = 0; i < 16; ++i) t[i] = (6 * i) & 7;
  return _mm512_load_si512(t);
}();
template <> inline __m512i dec32<3>(const uint8_t* p) {  // lane i: bits [6i, 6i + 6): bytes 6i >> 3 and +1, >> 6i & 7
  const __m512i GATHER = GATHER3_32, SHIFT = SHIFT3_32;
  const __m512i data = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(0x0fff, p));
  const __m512i v = _mm512_srlv_epi32(_mm512_maskz_permutexvar_epi8(0x3333333333333333ull, GATHER, data), SHIFT);
  const __m512i idx = _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(7)),
                                      _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x38)), 13));
  return _mm512_permutexvar_epi16(idx, BF16_SMALL);
}
template <> inline __m512i dec32<8>(const uint8_t* p) {
  const __m256i b = _mm256_loadu_si256((const __m256i*)p);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(b, 1)));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

template <bool LO, int MB>
static inline void dot32(__m512* acc, __m512i w, const Acts& a, int64_t m0, int64_t k) {
  for (int m = 0; m < MB; ++m) {
    const int64_t at = (m0 + m) * a.K + k;
    acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)w, (__m512bh)_mm512_loadu_si512(a.hi.data() + at));
    if (LO) acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)w, (__m512bh)_mm512_loadu_si512(a.lo.data() + at));
  }
}

static uint16_t TRIT_BF16[256][5];  // byte -> its five trits (base-3 digits - 1, least significant first), bf16
#endif

static float TRIT_F32[256][5];
static const bool TRITS_READY = [] {
  for (int b = 0; b < 256; ++b)
    for (int i = 0, v = b; i < 5; ++i, v /= 3) {
      TRIT_F32[b][i] = (float)(v % 3 - 1);
#if defined(MC_BF16)
      TRIT_BF16[b][i] = f2bf(TRIT_F32[b][i]);
#endif
    }
  return true;
}();

// ---- int formats: y[m, n] = sum_g s (sum_k q x - z xsum_g) ---------------------------------------------------------

// rows n .. n + NB of W against rows m0 .. m0 + MB of x: NB * MB independent accumulator chains (one chain would wait
// on the latency of each dot product), x loaded once for the NB rows
template <int B, int MB, int NB, bool LO>
static inline void block_int(const Mat& A, const Acts& a, float* y, int64_t ldy, int64_t m0, int64_t n) {
  const float zdef = (float)(1 << (B - 1));
  float total[NB][MB] = {};
#if defined(MC_BF16)
  __m512 vt[NB][MB];
  #pragma GCC unroll 4
  for (int r = 0; r < NB; ++r)
    #pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) vt[r][m] = _mm512_setzero_ps();
#endif
  for (int64_t g = 0; g < A.G; ++g) {
    const int64_t k0 = g * A.gs, k1 = std::min(A.K, k0 + A.gs);
    int64_t k = k0;
#if defined(MC_BF16)
    if ((k0 * B) % 8 == 0 && k + 32 <= k1) {
      __m512 acc[NB][MB];
      #pragma GCC unroll 4
      for (int r = 0; r < NB; ++r)
        #pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
      if constexpr (B != 8) {
        const int64_t full = A.K & ~int64_t(127);
        for (; a.oct && k + 128 <= k1; k += 128)
          #pragma GCC unroll 4
          for (int r = 0; r < NB; ++r) {
            __m512i P[4];
            dec128<B>(A.q + (n + r) * A.rowbytes + k * B / 8, P);
            #pragma GCC unroll 4
            for (int m = 0; m < MB; ++m)
              #pragma GCC unroll 4
              for (int t = 0; t < 4; ++t) {
                const int64_t at = (m0 + m) * full + k + 32 * t;
                acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)P[t], (__m512bh)_mm512_loadu_si512(a.ohi.data() + at));
                if (LO)
                  acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)P[t], (__m512bh)_mm512_loadu_si512(a.olo.data() + at));
              }
          }
      }
      for (; k + 32 <= k1; k += 32) {
        __m512i xh[MB], xl[MB];
        #pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) {
          xh[m] = _mm512_loadu_si512(a.hi.data() + (m0 + m) * a.K + k);
          if (LO) xl[m] = _mm512_loadu_si512(a.lo.data() + (m0 + m) * a.K + k);
        }
        #pragma GCC unroll 4
        for (int r = 0; r < NB; ++r) {
          const __m512i w = dec32<B>(A.q + (n + r) * A.rowbytes + k * B / 8);
          #pragma GCC unroll 4
          for (int m = 0; m < MB; ++m) {
            acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w, (__m512bh)xh[m]);
            if (LO) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w, (__m512bh)xl[m]);
          }
        }
      }
      #pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const __m512 vs = _mm512_set1_ps(h2f(A.scales[(n + r) * A.G + g]));
        #pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) vt[r][m] = _mm512_fmadd_ps(vs, acc[r][m], vt[r][m]);
      }
    }
#endif
    #pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) {
      const uint8_t* row = A.q + (n + r) * A.rowbytes;
      const float s = h2f(A.scales[(n + r) * A.G + g]), z = A.zeros ? h2f(A.zeros[(n + r) * A.G + g]) : zdef;
      float part[MB] = {};
      for (int64_t j = k; j < k1; ++j) {
        const float c = (float)code_at(row, j, B, A.rowbytes);
        #pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) part[m] += c * a.x[(m0 + m) * a.ldx + j];
      }
      #pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) total[r][m] += s * (part[m] - z * a.xsum[(m0 + m) * A.G + g]);
    }
  }
  #pragma GCC unroll 4
  for (int r = 0; r < NB; ++r)
    #pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
#if defined(MC_BF16)
      total[r][m] += _mm512_reduce_add_ps(vt[r][m]);
#endif
      y[(m0 + m) * ldy + n + r] = total[r][m];
    }
}

template <int B, int MB, bool LO>
static void rows_int(const Mat& A, const Acts& a, float* y, int64_t ldy, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block_int<B, MB, 4, LO>(A, a, y, ldy, m0, n);
  for (; n < n1; ++n) block_int<B, MB, 1, LO>(A, a, y, ldy, m0, n);
}

// ---- ternary (AVX512-BF16): rows decoded to bf16 trits by a byte table, then blocked dot products -----------------
#if defined(MC_BF16)
template <int MB, int NB, bool LO>
static inline void block_ternary(const Mat& A, const Acts& a, const uint16_t* buf, int64_t stride, float* y,
                                 int64_t ldy, int64_t m0, int64_t n) {
  __m512 vt[NB][MB];
  float total[NB][MB] = {};
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) vt[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < A.G; ++g) {
    const int64_t k0 = g * A.gs, k1 = std::min(A.K, k0 + A.gs);
    __m512 acc[NB][MB];
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r)
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32)
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const __m512i w = _mm512_loadu_si512(buf + r * stride + k);
#pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) {
          const int64_t at = (m0 + m) * a.K + k;
          acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w, (__m512bh)_mm512_loadu_si512(a.hi.data() + at));
          if (LO) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w, (__m512bh)_mm512_loadu_si512(a.lo.data() + at));
        }
      }
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) {
      const float s = h2f(A.scales[(n + r) * A.G + g]);
      float part[MB] = {};
      for (int64_t j = k; j < k1; ++j)
        for (int m = 0; m < MB; ++m) part[m] += bf2f(buf[r * stride + j]) * a.x[(m0 + m) * a.ldx + j];
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        vt[r][m] = _mm512_fmadd_ps(_mm512_set1_ps(s), acc[r][m], vt[r][m]);
        total[r][m] += s * part[m];
      }
    }
  }
  for (int r = 0; r < NB; ++r)
    for (int m = 0; m < MB; ++m) y[(m0 + m) * ldy + n + r] = total[r][m] + _mm512_reduce_add_ps(vt[r][m]);
}

// 32 bytes = 160 trits -> their bf16 values in natural order (5 vectors of 32): output word t takes byte t / 5 (vpermb)
// and its digit t % 5 = floor(b / 3^d) - 3 floor(b / 3^(d+1)), each floor a 16-bit multiply-high by ceil(2^15 / 3^d)
// of 2b (exact for b < 243), then a table maps digits 0, 1, 2 to bf16 -1, 0, 1.
struct TritConsts {
  __m512i idx[5], md[5], md1[5], table;
};
static const TritConsts TRIT_C = [] {
  TritConsts c;
  static const int mult[6] = {32768, 10923, 3641, 1214, 405, 135};
  for (int o = 0; o < 5; ++o) {
    alignas(64) uint8_t idx[64] = {0};
    alignas(64) uint16_t md[32], md1[32];
    for (int w = 0; w < 32; ++w) {
      const int t = 32 * o + w, d = t % 5;
      idx[2 * w] = (uint8_t)(t / 5);
      md[w] = (uint16_t)mult[d];
      md1[w] = (uint16_t)mult[d + 1];
    }
    c.idx[o] = _mm512_load_si512(idx);
    c.md[o] = _mm512_load_si512(md);
    c.md1[o] = _mm512_load_si512(md1);
  }
  alignas(64) uint16_t t[32] = {0};
  for (int j = 0; j < 3; ++j) t[j] = f2bf((float)(j - 1));
  c.table = _mm512_load_si512(t);
  return c;
}();

static inline void decode_trits(const uint8_t* row, int64_t rowbytes, uint16_t* out) {
  int64_t j = 0;
  for (; j + 32 <= rowbytes; j += 32) {  // out holds 5 * rowbytes + 32 entries
    const __m512i bytes = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(row + j)));
#pragma GCC unroll 5
    for (int o = 0; o < 5; ++o) {
      const __m512i b2 = _mm512_slli_epi16(_mm512_maskz_permutexvar_epi8(0x5555555555555555ull, TRIT_C.idx[o], bytes), 1);
      const __m512i q = _mm512_mulhi_epu16(b2, TRIT_C.md[o]), q1 = _mm512_mulhi_epu16(b2, TRIT_C.md1[o]);
      const __m512i digit = _mm512_sub_epi16(q, _mm512_add_epi16(q1, _mm512_add_epi16(q1, q1)));
      _mm512_storeu_si512(out + 5 * j + 32 * o, _mm512_permutexvar_epi16(digit, TRIT_C.table));
    }
  }
  for (; j < rowbytes; ++j) std::memcpy(out + 5 * j, TRIT_BF16[row[j]], 10);
}

template <bool LO>
static void rows_ternary(const Mat& A, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t stride = A.rowbytes * 5 + 32;
  std::vector<uint16_t> buf(4 * stride);
  for (int64_t n = n0; n < n1; n += 4) {
    const int nb = (int)std::min<int64_t>(4, n1 - n);
    for (int r = 0; r < nb; ++r) {
      const uint8_t* row = A.q + (n + r) * A.rowbytes;
      decode_trits(row, A.rowbytes, &buf[r * stride]);
    }
    for (int64_t m = 0; m < a.M; m += 2) {
      const bool two = m + 1 < a.M;
      if (nb == 4 && two) block_ternary<2, 4, LO>(A, a, buf.data(), stride, y, ldy, m, n);
      else if (nb == 4) block_ternary<1, 4, LO>(A, a, buf.data(), stride, y, ldy, m, n);
      else
        for (int r = 0; r < nb; ++r)
          for (int64_t mm = m; mm < m + (two ? 2 : 1); ++mm)
            block_ternary<1, 1, LO>(A, a, buf.data() + r * stride, stride, y, ldy, mm, n + r);
    }
  }
}
#endif

// ---- rows decoded to float (ternary without BF16, ggml types, keep) -----------------------------------------------

#if defined(__AVX512F__)
template <int B> static inline __m512i codes16(const uint8_t* p);  // 16 codes from a byte boundary, as int32 lanes
template <> inline __m512i codes16<8>(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
template <> inline __m512i codes16<4>(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  const __m128i v = _mm_cvtsi64_si128((long long)w), m = _mm_set1_epi8(0x0f);
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m)));
}
template <> inline __m512i codes16<2>(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)w), sh), _mm512_set1_epi32(3));
}
template <> inline __m512i codes16<3>(const uint8_t* p) {
  uint32_t lo;  // 6 bytes as a 4- and a 2-byte load (one 6-byte copy through memory stalls store forwarding)
  uint16_t hi;
  std::memcpy(&lo, p, 4);
  std::memcpy(&hi, p + 4, 2);
  const uint64_t w = lo | (uint64_t)hi << 32;
  const __m512i sh = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21);
  const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32((int)(w & 0xffffff))),
                                       _mm256_set1_epi32((int)((w >> 24) & 0xffffff)), 1);
  return _mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32(7));
}
#endif

template <int B>
static void int_codes(const uint8_t* row, int64_t K, int64_t rowbytes, float* w) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 16 <= K; k += 16) _mm512_storeu_ps(w + k, _mm512_cvtepi32_ps(codes16<B>(row + k * B / 8)));
#endif
  for (; k < K; ++k) w[k] = (float)code_at(row, k, B, rowbytes);
}

static void decode_row(const Mat& A, int64_t n, float* w) {  // ternary: the trits, unscaled; int: the codes
  const uint8_t* row = A.q + n * A.rowbytes;
  if (A.kind == KIND_F16) {
    const uint16_t* h = (const uint16_t*)A.q + n * A.K;
    for (int64_t k = 0; k < A.K; ++k) w[k] = h2f(h[k]);
  } else if (A.kind == KIND_TERNARY) {
    for (int64_t j = 0, k = 0; k < A.K; ++j)
      for (int i = 0; i < 5 && k < A.K; ++i, ++k) w[k] = TRIT_F32[row[j]][i];
  } else if (A.kind == KIND_GGML) {
    const int nb = GGML_BLOCK_BYTES[A.bits];
    for (int64_t k = 0, at = 0; k < A.K; at += nb) k += ggml_block(A.bits, row + at, w + k);
  } else {
    switch (A.bits) {
      case 2: return int_codes<2>(row, A.K, A.rowbytes, w);
      case 3: return int_codes<3>(row, A.K, A.rowbytes, w);
      case 4: return int_codes<4>(row, A.K, A.rowbytes, w);
      default: return int_codes<8>(row, A.K, A.rowbytes, w);
    }
  }
}

// float32 row -> out (float32, or bfloat16 / float16 rounded to nearest even, as torch converts)
static void store_row(const float* w, int64_t K, void* out, int32_t out_kind) {
  if (out_kind == OUT_F32) { std::memcpy(out, w, K * sizeof(float)); return; }
  uint16_t* o = (uint16_t*)out;
  int64_t k = 0;
#if defined(__AVX512F__)
  if (out_kind == OUT_BF16) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    for (; k + 16 <= K; k += 16) {
      const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(w + k));
      const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one))), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(_mm512_loadu_ps(w + k), _mm512_loadu_ps(w + k), _CMP_UNORD_Q);
      if (nan) break;  // NaN: the scalar path below keeps it a NaN
      _mm256_storeu_si256((__m256i*)(o + k), _mm512_cvtepi32_epi16(r));
    }
  } else {
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256((__m256i*)(o + k), _mm512_cvtps_ph(_mm512_loadu_ps(w + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; k < K; ++k) o[k] = out_kind == OUT_BF16 ? f2bf(w[k]) : f2h(w[k]);
}

static inline float dot(const float* a, const float* b, int64_t n) {
  int64_t k = 0;
  float s = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; k + 16 <= n; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

static void rows_decoded(const Mat& A, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  std::vector<float> w(A.K + 256);
  for (int64_t n = n0; n < n1; ++n) {
    decode_row(A, n, w.data());
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.ldx;
      if (A.kind != KIND_TERNARY) { y[m * ldy + n] = dot(x, w.data(), A.K); continue; }
      float t = 0.0f;
      for (int64_t g = 0; g < A.G; ++g) {
        const int64_t k0 = g * A.gs, k1 = std::min(A.K, k0 + A.gs);
        t += h2f(A.scales[n * A.G + g]) * dot(x + k0, w.data() + k0, k1 - k0);
      }
      y[m * ldy + n] = t;
    }
  }
}

// ---- dispatch and entry points ------------------------------------------------------------------------------------

template <int B, bool LO>
static void rows_int_m(const Mat& A, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2) rows_int<B, 2, LO>(A, a, y, ldy, m, n0, n1);
  if (m < a.M) rows_int<B, 1, LO>(A, a, y, ldy, m, n0, n1);
}

template <int B>
static void rows_int_b(const Mat& A, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (a.has_lo) rows_int_m<B, true>(A, a, y, ldy, n0, n1);
  else rows_int_m<B, false>(A, a, y, ldy, n0, n1);
}

static void rows(const Mat& A, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (A.kind == KIND_INT) {
    switch (A.bits) {
      case 2: return rows_int_b<2>(A, a, y, ldy, n0, n1);
      case 3: return rows_int_b<3>(A, a, y, ldy, n0, n1);
      case 4: return rows_int_b<4>(A, a, y, ldy, n0, n1);
      case 8: return rows_int_b<8>(A, a, y, ldy, n0, n1);
    }
  }
#if defined(MC_BF16)
  if (A.kind == KIND_TERNARY) return a.has_lo ? rows_ternary<true>(A, a, y, ldy, n0, n1)
                                              : rows_ternary<false>(A, a, y, ldy, n0, n1);
#endif
  rows_decoded(A, a, y, ldy, n0, n1);
}

// Row blocks for the threads: a single thread for small products (a parallel region costs more than it saves)
static int split(const Mat& A, int64_t M, int nthreads, int64_t* per) {
  const int nt = A.N * A.K * std::max<int64_t>(M, 1) < (1 << 17) ? 1 : std::max(1, nthreads);
  *per = std::max<int64_t>(1, (A.N + 4 * nt - 1) / (4 * nt));
  return nt;
}

#if defined(__AVX512F__)
static inline void store16(__m512 v, void* out, int64_t k, int32_t out_kind) {  // as store_row, 16 finite values
  if (out_kind == OUT_F32) { _mm512_storeu_ps((float*)out + k, v); return; }
  __m256i h;
  if (out_kind == OUT_BF16) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16));
  } else {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm256_storeu_si256((__m256i*)((uint16_t*)out + k), h);
}

// One row of an int format straight to `out`: (q - z) * s per 16 codes (whole 16-code runs of byte-aligned groups),
// the rest through the float row
template <int B>
static void dequant_int_row(const Mat& A, int64_t n, float* w, void* out, int32_t out_kind) {
  const uint8_t* row = A.q + n * A.rowbytes;
  const float zdef = (float)(1 << (B - 1));
  bool rest = false;
  for (int64_t g = 0; g < A.G; ++g) {
    const int64_t k0 = g * A.gs, k1 = std::min(A.K, k0 + A.gs);
    const float s = h2f(A.scales[n * A.G + g]), z = A.zeros ? h2f(A.zeros[n * A.G + g]) : zdef;
    int64_t k = k0;
    if ((k0 * B) % 8 == 0) {
      const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
      for (; k + 16 <= k1; k += 16)
        store16(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(codes16<B>(row + k * B / 8)), vz), vs), out, k, out_kind);
    }
    for (; k < k1; ++k, rest = true) w[k] = ((float)code_at(row, k, B, A.rowbytes) - z) * s;
  }
  if (!rest) return;
  for (int64_t g = 0; g < A.G; ++g) {  // the codes the vector loop left, converted one by one
    const int64_t k0 = g * A.gs, k1 = std::min(A.K, k0 + A.gs);
    for (int64_t k = (k0 * B) % 8 == 0 ? k0 + (k1 - k0) / 16 * 16 : k0; k < k1; ++k) {
      if (out_kind == OUT_F32) ((float*)out)[k] = w[k];
      else ((uint16_t*)out)[k] = out_kind == OUT_BF16 ? f2bf(w[k]) : f2h(w[k]);
    }
  }
}
#endif

extern "C" {

int mc_abi_version() { return 1; }

int mc_tier() {  // 2: AVX512-BF16, 0: scalar
#if defined(MC_BF16)
  return 2;
#else
  return 0;
#endif
}

void mc_gemv(const Mat* A, int64_t M, const float* x, int64_t ldx, float* y, int64_t ldy, int nthreads) {
  const Acts a = make_acts(*A, M, x, ldx);
  int64_t per;
  const int nt = split(*A, M, nthreads, &per);
  const int64_t blocks = (A->N + per - 1) / per;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t b = 0; b < blocks; ++b) rows(*A, a, y, ldy, b * per, std::min(A->N, (b + 1) * per));
}

// One MoE layer's routed experts for a few tokens (decode): out[t] = sum over slots j of w[t, j] * down(act(gate_up(x[t])))
// for the expert e = idx[t, j] in [0, E) (others skipped: pruned or masked), one product per expert with tokens.
// act 0: silu(gate) * up, gate_up's rows being [gate; up] (Mixtral, Qwen-MoE, DeepSeek, OLMoE). x, w, out float32.
void mc_experts(int64_t T, int64_t k, const float* x, const int64_t* idx, const float* w, int64_t E, const Mat* gate_up,
                const Mat* down, int32_t act, float* out, int nthreads) {
  const int64_t H = gate_up[0].K, O = down[0].N;
  std::memset(out, 0, sizeof(float) * T * O);
  std::vector<int64_t> tok;
  std::vector<float> wt, xe, g, h, y;
  for (int64_t e = 0; e < E; ++e) {
    tok.clear();
    wt.clear();
    for (int64_t s = 0; s < T * k; ++s)
      if (idx[s] == e) { tok.push_back(s / k); wt.push_back(w[s]); }
    if (tok.empty()) continue;
    const int64_t n = (int64_t)tok.size(), I2 = gate_up[e].N, I = I2 / 2;
    xe.resize(n * H);
    for (int64_t i = 0; i < n; ++i) std::memcpy(&xe[i * H], x + tok[i] * H, sizeof(float) * H);
    g.resize(n * I2);
    mc_gemv(&gate_up[e], n, xe.data(), H, g.data(), I2, nthreads);
    h.resize(n * I);
    if (act == 0)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < I; ++j) {
          const float a = g[i * I2 + j];
          h[i * I + j] = a / (1.0f + std::exp(-a)) * g[i * I2 + I + j];
        }
    y.resize(n * O);
    mc_gemv(&down[e], n, h.data(), I, y.data(), O, nthreads);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t o = 0; o < O; ++o) out[tok[i] * O + o] += wt[i] * y[i * O + o];
  }
}

void mc_dequant(const Mat* A, void* out, int32_t out_kind, int nthreads) {
  int64_t per;
  const int nt = split(*A, 1, nthreads, &per);
  const int64_t blocks = (A->N + per - 1) / per, item = out_kind == OUT_F32 ? 4 : 2;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    std::vector<float> w(A->K + 256);
    std::vector<uint16_t> t;
    for (int64_t n = b * per; n < std::min(A->N, (b + 1) * per); ++n) {
      void* o = (char*)out + n * A->K * item;
#if defined(__AVX512F__)
      if (A->kind == KIND_INT) {
        switch (A->bits) {
          case 2: dequant_int_row<2>(*A, n, w.data(), o, out_kind); continue;
          case 3: dequant_int_row<3>(*A, n, w.data(), o, out_kind); continue;
          case 4: dequant_int_row<4>(*A, n, w.data(), o, out_kind); continue;
          case 8: dequant_int_row<8>(*A, n, w.data(), o, out_kind); continue;
        }
      }
#endif
#if defined(MC_BF16)
      if (A->kind == KIND_TERNARY) {  // trits by decode_trits, then t * s per 16
        t.resize(A->rowbytes * 5 + 32);
        decode_trits(A->q + n * A->rowbytes, A->rowbytes, t.data());
        for (int64_t g = 0; g < A->G; ++g) {
          const int64_t k0 = g * A->gs, k1 = std::min(A->K, k0 + A->gs);
          const float s = h2f(A->scales[n * A->G + g]);
          int64_t k = k0;
          for (; k + 16 <= k1 && out_kind != OUT_F32; k += 16) {
            const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(t.data() + k)));
            store16(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), _mm512_set1_ps(s)), o, k, out_kind);
          }
          for (; k < k1; ++k) {
            const float v = bf2f(t[k]) * s;
            if (out_kind == OUT_F32) ((float*)o)[k] = v;
            else ((uint16_t*)o)[k] = out_kind == OUT_BF16 ? f2bf(v) : f2h(v);
          }
        }
        continue;
      }
#endif
      decode_row(*A, n, w.data());
      if (A->kind == KIND_INT || A->kind == KIND_TERNARY) {  // w = (q - z) * s, as quantize/grid.py
        const float zdef = A->kind == KIND_INT ? (float)(1 << (A->bits - 1)) : 0.0f;
        for (int64_t g = 0; g < A->G; ++g) {
          const float s = h2f(A->scales[n * A->G + g]), z = A->zeros ? h2f(A->zeros[n * A->G + g]) : zdef;
          float* wg = w.data() + g * A->gs;
          const int64_t len = std::min(A->K, (g + 1) * A->gs) - g * A->gs;
          for (int64_t k = 0; k < len; ++k) wg[k] = (wg[k] - z) * s;
        }
      }
      store_row(w.data(), A->K, o, out_kind);
    }
  }
}

}  // extern "C"
