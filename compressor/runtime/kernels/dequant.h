// Packed rows -> float32 / bfloat16 / float16 (the prefill path's GEMM operand), rounded as torch rounds.
// Included by packed.cpp.
#pragma once
#include "codes.h"

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

