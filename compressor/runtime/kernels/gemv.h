// Decode-path products y = x W^T for a few rows of x, from the packed bytes: int formats (blocked rows, codes decoded
// in registers) and ternary (rows decoded to bf16 trits). Included by packed.cpp.
#pragma once
#include "codes.h"

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
      if constexpr (B <= 4) {
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


// ---- 16-bit weights (keep experts; a model's own linear layers): blocked dot products -----------------------------
#if defined(MC_BF16)
template <int MB, int NB, bool LO, bool HALF>
static inline void block_16bit(const Mat& A, const Acts& a, float* y, int64_t ldy, int64_t m0, int64_t n) {
  const uint16_t* W = (const uint16_t*)A.q;
  __m512 acc[NB][MB];
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  if (HALF) {  // fp16: 16 weights to float32, FMA against x
    for (; k + 16 <= A.K; k += 16)
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(W + (n + r) * A.K + k)));
#pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(a.x + (m0 + m) * a.ldx + k), acc[r][m]);
      }
  } else {  // bf16: the weights are bf16 pairs already
    for (; k + 32 <= A.K; k += 32)
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const __m512i w = _mm512_loadu_si512(W + (n + r) * A.K + k);
#pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) {
          const int64_t at = (m0 + m) * a.K + k;
          acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w, (__m512bh)_mm512_loadu_si512(a.hi.data() + at));
          if (LO) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w, (__m512bh)_mm512_loadu_si512(a.lo.data() + at));
        }
      }
  }
  for (int r = 0; r < NB; ++r)
    for (int m = 0; m < MB; ++m) {
      float t = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t j = k; j < A.K; ++j) {
        const uint16_t h = W[(n + r) * A.K + j];
        t += (HALF ? h2f(h) : bf2f(h)) * a.x[(m0 + m) * a.ldx + j];
      }
      y[(m0 + m) * ldy + n + r] = t;
    }
}

template <bool LO, bool HALF>
static void rows_16bit(const Mat& A, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < a.M; m += 2) {
    const bool two = m + 1 < a.M;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      if (two) block_16bit<2, 4, LO, HALF>(A, a, y, ldy, m, n);
      else block_16bit<1, 4, LO, HALF>(A, a, y, ldy, m, n);
    }
    for (; n < n1; ++n) {
      if (two) block_16bit<2, 1, LO, HALF>(A, a, y, ldy, m, n);
      else block_16bit<1, 1, LO, HALF>(A, a, y, ldy, m, n);
    }
  }
}
#endif
