// Packed codes -> SIMD registers: bf16 pairs for the dot products (tier 1, AVX512-BF16 + VBMI), int32 lanes for the
// dequantization, and the trit tables. Included by packed.cpp after common.h.
#pragma once
#include "common.h"

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

// ---- 16 codes as int32 lanes (dequantization) -------------------------------------------------------------------

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
// int5 / int6: 16 codes are 2B bytes, four chunks of four codes (4B = 20 / 24 bits); each chunk is cut from the
// stream in a scalar register, broadcast to its four lanes and shifted apart there
template <int B> static inline __m512i codes16_chunked(const uint8_t* p) {
  static_assert(B == 5 || B == 6, "chunks of four codes fit a 32-bit lane for 5 and 6 bits");
  uint64_t lo;
  uint32_t hi = 0;
  std::memcpy(&lo, p, 8);
  std::memcpy(&hi, p + 8, 2 * B - 8);  // the stream's last 2 (int5) or 4 (int6) bytes
  const unsigned __int128 s = (unsigned __int128)hi << 64 | lo;
  constexpr uint32_t chunk = (1u << (4 * B)) - 1;
  const __m128i c = _mm_setr_epi32((int)((uint32_t)s & chunk), (int)((uint32_t)(s >> (4 * B)) & chunk),
                                   (int)((uint32_t)(s >> (8 * B)) & chunk), (int)((uint32_t)(s >> (12 * B)) & chunk));
  const __m512i v = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                             _mm512_castsi128_si512(c));
  const __m512i sh = _mm512_setr_epi32(0, B, 2 * B, 3 * B, 0, B, 2 * B, 3 * B, 0, B, 2 * B, 3 * B, 0, B, 2 * B, 3 * B);
  return _mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32((1 << B) - 1));
}
template <> inline __m512i codes16<5>(const uint8_t* p) { return codes16_chunked<5>(p); }
template <> inline __m512i codes16<6>(const uint8_t* p) { return codes16_chunked<6>(p); }

#if defined(MC_BF16)
// 32 codes of 5 or 6 bits (4B bytes) as bf16 pairs, lane i = codes 2i, 2i + 1: each 64-bit lane q gathers the 8 bytes
// from the one holding code 4q (vpermb), vpmultishiftqb cuts codes 4q .. 4q + 3 out of them into its 16-bit
// elements, and the value table turns codes into bf16 (6 bits: two 32-entry tables, vpermt2w)
template <int B> struct Wide {
  const __m512i gather, shift, high;
  Wide() : gather(make(true)), shift(make(false)), high(table(32)) {}
  static __m512i make(bool gather) {
    alignas(64) uint8_t t[64];
    for (int q = 0; q < 8; ++q) {
      const int first = 4 * q * B / 8;  // byte of code 4q
      for (int b = 0; b < 8; ++b)
        t[8 * q + b] = gather ? (uint8_t)(first + b) : (uint8_t)(b % 2 ? 0 : 4 * q * B - 8 * first + (b / 2) * B);
    }
    return _mm512_load_si512(t);
  }
  static __m512i table(int from) {
    alignas(64) uint16_t t[32];
    for (int c = 0; c < 32; ++c) t[c] = f2bf((float)(from + c));
    return _mm512_load_si512(t);
  }
};
static const Wide<5> WIDE5;
static const Wide<6> WIDE6;

template <int B> static inline __m512i dec32_wide(const uint8_t* p, const Wide<B>& w) {
  const __m512i data = _mm512_maskz_loadu_epi8((1ull << (4 * B)) - 1, p);
  const __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(w.shift, _mm512_permutexvar_epi8(w.gather, data)),
                                         _mm512_set1_epi16((1 << B) - 1));
  return B == 5 ? _mm512_permutexvar_epi16(codes, BF16_SMALL) : _mm512_permutex2var_epi16(BF16_SMALL, codes, w.high);
}
template <> inline __m512i dec32<5>(const uint8_t* p) { return dec32_wide<5>(p, WIDE5); }
template <> inline __m512i dec32<6>(const uint8_t* p) { return dec32_wide<6>(p, WIDE6); }
#endif
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
  if (A.kind == KIND_F16 || A.kind == KIND_BF16) {
    const uint16_t* h = (const uint16_t*)A.q + n * A.K;
    for (int64_t k = 0; k < A.K; ++k) w[k] = A.kind == KIND_F16 ? h2f(h[k]) : bf2f(h[k]);
  } else if (A.kind == KIND_TERNARY) {
    for (int64_t j = 0, k = 0; k < A.K; ++j)
      for (int i = 0; i < 5 && k < A.K; ++i, ++k) w[k] = TRIT_F32[row[j]][i];
  } else if (A.kind == KIND_GGML) {
    ggml_row(A.bits, row, A.K, w);
  } else {
    switch (A.bits) {
      case 2: return int_codes<2>(row, A.K, A.rowbytes, w);
      case 3: return int_codes<3>(row, A.K, A.rowbytes, w);
      case 4: return int_codes<4>(row, A.K, A.rowbytes, w);
      case 5: return int_codes<5>(row, A.K, A.rowbytes, w);
      case 6: return int_codes<6>(row, A.K, A.rowbytes, w);
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

