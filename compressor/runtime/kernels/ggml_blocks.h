// GGUF block types -> float32 weights, by the float operations of compressor/quantize/ggml.py (its affine maps and
// dequantize_codes), so the results equal the Python decoder (and gguf-py's) bit for bit. Included by packed.cpp.
#pragma once
#include <cstdint>

// inverse of ggml.py's _pack_planes: element c*P*RUN + s*RUN + j sits in byte c*RUN + j at bit s*WIDTH (P = 8 / WIDTH)
template <int WIDTH, int RUN, int N>
static inline void planes(const uint8_t* b, uint8_t* out) {
  constexpr int P = 8 / WIDTH, MASK = (1 << WIDTH) - 1;
  for (int c = 0; c < N / (P * RUN); ++c)
    for (int s = 0; s < P; ++s)
      for (int j = 0; j < RUN; ++j) out[c * P * RUN + s * RUN + j] = (b[c * RUN + j] >> (s * WIDTH)) & MASK;
}

static void scale_min_k4(const uint8_t* b, uint8_t* sc, uint8_t* m) {
  for (int i = 0; i < 4; ++i) {
    sc[i] = b[i] & 63;
    m[i] = b[4 + i] & 63;
    sc[4 + i] = (b[8 + i] & 15) | ((b[i] >> 6) << 4);
    m[4 + i] = (b[8 + i] >> 4) | ((b[4 + i] >> 6) << 4);
  }
}

#if defined(__AVX512F__)
// 16 weights' unsigned codes, (byte >> shift) & mask of 16 consecutive bytes, as int32 lanes
static inline __m512i lanes16(const uint8_t* p, int shift, int mask) {
  return _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)),
                                            _mm512_set1_epi32(shift)), _mm512_set1_epi32(mask));
}
// a * q + o for 16 codes q (o = 0: a * q), the float operations of ggml.py's dequantize_codes
static inline void affine16(float* w, __m512i q, float a, float o, bool has_o) {
  const __m512 v = _mm512_mul_ps(_mm512_set1_ps(a), _mm512_cvtepi32_ps(q));
  _mm512_storeu_ps(w, has_o ? _mm512_add_ps(v, _mm512_set1_ps(o)) : v);
}
#endif

static const int GGML_BLOCK_BYTES[36] = {0, 0, 18, 20, 0, 0, 22, 24, 34, 0, 84, 110, 144, 176, 210, 0, 0, 0,
                                         0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 54, 66};

// q4_0, q4_1, q5_0, q5_1: d (, m) (, qh 4 bytes), 16 bytes of nibbles last. The variant is a template argument so
// that each loop is branch-free (and vectorized)
template <bool HAS_MIN, bool FIVE>
static inline void legacy_block(const uint8_t* b, float* w) {
  constexpr int nbytes = 16 + 2 + 2 * HAS_MIN + 4 * FIVE, off = HAS_MIN ? 0 : (FIVE ? 16 : 8);
  const float d = h2f(b[0] | b[1] << 8);
  const uint8_t* qs = b + nbytes - 16;
#if defined(__AVX512F__)
  const __m512i nib = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs)), m15 = _mm512_set1_epi32(15);
  __m512i u0 = _mm512_and_si512(nib, m15), u1 = _mm512_srli_epi32(nib, 4);  // weights 0-15, 16-31
  if constexpr (FIVE) {
    uint32_t qh;
    std::memcpy(&qh, b + (HAS_MIN ? 4 : 2), 4);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), one = _mm512_set1_epi32(1);
    u0 = _mm512_or_si512(u0, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)qh), iota), one), 4));
    u1 = _mm512_or_si512(u1, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)(qh >> 16)), iota), one), 4));
  }
  const __m512 vd = _mm512_set1_ps(d), voff = _mm512_set1_ps((float)off);
  __m512 w0 = _mm512_mul_ps(vd, _mm512_sub_ps(_mm512_cvtepi32_ps(u0), voff));  // exact: small integers
  __m512 w1 = _mm512_mul_ps(vd, _mm512_sub_ps(_mm512_cvtepi32_ps(u1), voff));
  if constexpr (HAS_MIN) {
    const __m512 vm = _mm512_set1_ps(h2f(b[2] | b[3] << 8));
    w0 = _mm512_add_ps(w0, vm);
    w1 = _mm512_add_ps(w1, vm);
  }
  _mm512_storeu_ps(w, w0);
  _mm512_storeu_ps(w + 16, w1);
  return;
#endif
  int u[32];
  for (int j = 0; j < 16; ++j) {
    u[j] = qs[j] & 15;
    u[16 + j] = qs[j] >> 4;
  }
  if constexpr (FIVE) {
    uint32_t qh;
    std::memcpy(&qh, b + (HAS_MIN ? 4 : 2), 4);
    for (int i = 0; i < 32; ++i) u[i] |= (int)((qh >> i) & 1) << 4;
  }
  if constexpr (HAS_MIN) {
    const float mm = h2f(b[2] | b[3] << 8);
    for (int i = 0; i < 32; ++i) w[i] = d * (float)(u[i] - off) + mm;
  } else {
    for (int i = 0; i < 32; ++i) w[i] = d * (float)(u[i] - off);
  }
}

// One block of a GGUF type -> its weights, by the float operations of quantize/ggml.py (affine, dequantize_codes).
static int ggml_block(int type, const uint8_t* b, float* w) {
  uint8_t u[256], hb[256], sc[16], mn[16];
  switch (type) {
    case 8: {  // q8_0
      const float d = h2f(b[0] | b[1] << 8);
#if defined(__AVX512F__)
      for (int h = 0; h < 2; ++h)
        affine16(w + 16 * h, _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 2 + 16 * h))), d, 0.0f, false);
      return 32;
#endif
      for (int i = 0; i < 32; ++i) w[i] = d * (float)(int8_t)b[2 + i];
      return 32;
    }
    case 10: {  // q2_k: scales (sc | m << 4) x16, qs 64, d, dmin
      const float d = h2f(b[80] | b[81] << 8), dmin = h2f(b[82] | b[83] << 8);
#if defined(__AVX512F__)
      for (int i = 0; i < 16; ++i)  // weights 16i ..: byte 16 + 32 (i / 8) + 16 (i % 2), bits 2 ((i % 8) / 2)
        affine16(w + 16 * i, lanes16(b + 16 + 32 * (i / 8) + 16 * (i % 2), 2 * ((i % 8) / 2), 3),
                 d * (float)(b[i] & 15), -(dmin * (float)(b[i] >> 4)), true);
      return 256;
#endif
      planes<2, 32, 256>(b + 16, u);
      for (int i = 0; i < 16; ++i) {
        const float a = d * (float)(b[i] & 15), o = -(dmin * (float)(b[i] >> 4));
        for (int j = 0; j < 16; ++j) w[16 * i + j] = a * (float)u[16 * i + j] + o;
      }
      return 256;
    }
    case 11: {  // q3_k: hmask 32, qs 64, scales 12, d
      const float d = h2f(b[108] | b[109] << 8);
      uint8_t lo[16], hi[16];
      planes<4, 8, 16>(b + 96, lo);
      planes<2, 4, 16>(b + 104, hi);
#if defined(__AVX512F__)
      for (int i = 0; i < 16; ++i) {  // low bits: byte 32 + 32 (i / 8) + 16 (i % 2), bits 2 ((i % 8) / 2); high bit: i / 2
        const __m512i q = _mm512_sub_epi32(
            _mm512_or_si512(lanes16(b + 32 + 32 * (i / 8) + 16 * (i % 2), 2 * ((i % 8) / 2), 3),
                            _mm512_slli_epi32(lanes16(b + 16 * (i % 2), i / 2, 1), 2)), _mm512_set1_epi32(4));
        affine16(w + 16 * i, q, d * (float)((int)(lo[i] | hi[i] << 4) - 32), 0.0f, false);
      }
      return 256;
#endif
      planes<1, 32, 256>(b, hb);
      planes<2, 32, 256>(b + 32, u);
      for (int i = 0; i < 16; ++i) {
        const float a = d * (float)((int)(lo[i] | hi[i] << 4) - 32);
        for (int j = 0; j < 16; ++j) w[16 * i + j] = a * (float)((int)(u[16 * i + j] | hb[16 * i + j] << 2) - 4);
      }
      return 256;
    }
    case 12: case 13: {  // q4_k, q5_k: d, dmin, scales 12, (qh 32,) qs 128
      const float d = h2f(b[0] | b[1] << 8), dmin = h2f(b[2] | b[3] << 8);
      scale_min_k4(b + 4, sc, mn);
#if defined(__AVX512F__)
      for (int t = 0; t < 16; ++t) {  // weights 16t ..: byte 32 (t / 4) + 16 (t % 2) of qs, bits 4 ((t % 4) / 2)
        __m512i q = lanes16(b + (type == 12 ? 16 : 48) + 32 * (t / 4) + 16 * (t % 2), 4 * ((t % 4) / 2), 15);
        if (type == 13) q = _mm512_or_si512(q, _mm512_slli_epi32(lanes16(b + 16 + 16 * (t % 2), t / 2, 1), 4));
        affine16(w + 16 * t, q, d * (float)sc[t / 2], -(dmin * (float)mn[t / 2]), true);
      }
      return 256;
#endif
      planes<4, 32, 256>(b + (type == 12 ? 16 : 48), u);
      if (type == 13) {
        planes<1, 32, 256>(b + 16, hb);
        for (int i = 0; i < 256; ++i) u[i] |= hb[i] << 4;
      }
      for (int i = 0; i < 8; ++i) {
        const float a = d * (float)sc[i], o = -(dmin * (float)mn[i]);
        for (int j = 0; j < 32; ++j) w[32 * i + j] = a * (float)u[32 * i + j] + o;
      }
      return 256;
    }
    case 14: {  // q6_k: ql 128, qh 64, scales int8 16, d
      const float d = h2f(b[208] | b[209] << 8);
#if defined(__AVX512F__)
      for (int i = 0; i < 16; ++i) {  // low 4 bits: byte 64 (i / 8) + 16 (i % 4), bits 4 ((i % 8) / 4);
                                      // high 2: byte 128 + 32 (i / 8) + 16 (i % 2), bits 2 ((i % 8) / 2)
        const __m512i q = _mm512_sub_epi32(
            _mm512_or_si512(lanes16(b + 64 * (i / 8) + 16 * (i % 4), 4 * ((i % 8) / 4), 15),
                            _mm512_slli_epi32(lanes16(b + 128 + 32 * (i / 8) + 16 * (i % 2), 2 * ((i % 8) / 2), 3), 4)),
            _mm512_set1_epi32(32));
        affine16(w + 16 * i, q, d * (float)(int8_t)b[192 + i], 0.0f, false);
      }
      return 256;
#endif
      planes<4, 64, 256>(b, u);
      planes<2, 32, 256>(b + 128, hb);
      for (int i = 0; i < 16; ++i) {
        const float a = d * (float)(int8_t)b[192 + i];
        for (int j = 0; j < 16; ++j) w[16 * i + j] = a * (float)((int)(u[16 * i + j] | hb[16 * i + j] << 4) - 32);
      }
      return 256;
    }
    case 34: {  // tq1_0: 52 bytes of base-3 fractions, d
      const float d = h2f(b[52] | b[53] << 8);
      static const int pw[5] = {1, 3, 9, 27, 81};
      for (int k = 0; k < 5; ++k) {
        for (int j = 0; j < 32; ++j) w[32 * k + j] = d * (float)(((((b[j] * pw[k]) & 255) * 3) >> 8) - 1);
        for (int j = 0; j < 16; ++j) w[160 + 16 * k + j] = d * (float)(((((b[32 + j] * pw[k]) & 255) * 3) >> 8) - 1);
        if (k < 4)
          for (int j = 0; j < 4; ++j) w[240 + 4 * k + j] = d * (float)(((((b[48 + j] * pw[k]) & 255) * 3) >> 8) - 1);
      }
      return 256;
    }
    case 35: {  // tq2_0: qs 64, d
      const float d = h2f(b[64] | b[65] << 8);
      planes<2, 32, 256>(b, u);
      for (int i = 0; i < 256; ++i) w[i] = d * (float)((int)u[i] - 1);
      return 256;
    }
  }
  return 0;
}

// A row of K weights of a GGUF type: the 32-weight legacy types block by block through their inlined decoder, the
// others through ggml_block
static void ggml_row(int type, const uint8_t* row, int64_t K, float* w) {
  const int nb = GGML_BLOCK_BYTES[type];
  switch (type) {
    case 2: for (int64_t k = 0; k < K; k += 32, row += nb) legacy_block<false, false>(row, w + k); return;
    case 3: for (int64_t k = 0; k < K; k += 32, row += nb) legacy_block<true, false>(row, w + k); return;
    case 6: for (int64_t k = 0; k < K; k += 32, row += nb) legacy_block<false, true>(row, w + k); return;
    case 7: for (int64_t k = 0; k < K; k += 32, row += nb) legacy_block<true, true>(row, w + k); return;
  }
  for (int64_t k = 0; k < K; row += nb) k += ggml_block(type, row, w + k);
}
