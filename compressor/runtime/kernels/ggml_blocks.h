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

static const int GGML_BLOCK_BYTES[36] = {0, 0, 18, 20, 0, 0, 22, 24, 34, 0, 84, 110, 144, 176, 210, 0, 0, 0,
                                         0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 54, 66};

// One block of a GGUF type -> its weights, by the float operations of quantize/ggml.py (affine, dequantize_codes).
static int ggml_block(int type, const uint8_t* b, float* w) {
  uint8_t u[256], hb[256], sc[16], mn[16];
  switch (type) {
    case 2: case 3: case 6: case 7: {  // q4_0, q4_1, q5_0, q5_1: d (, m) (, qh 4 bytes), 16 bytes of nibbles last
      const bool has_min = type == 3 || type == 7, five = type == 6 || type == 7;
      const int nbytes = GGML_BLOCK_BYTES[type], off = has_min ? 0 : (five ? 16 : 8);
      const float d = h2f(b[0] | b[1] << 8), mm = has_min ? h2f(b[2] | b[3] << 8) : 0.0f;
      planes<4, 16, 32>(b + nbytes - 16, u);
      if (five) {
        planes<1, 1, 32>(b + (has_min ? 4 : 2), hb);
        for (int i = 0; i < 32; ++i) u[i] |= hb[i] << 4;
      }
      for (int i = 0; i < 32; ++i) {
        const float a = d * (float)((int)u[i] - off);
        w[i] = has_min ? a + mm : a;
      }
      return 32;
    }
    case 8: {  // q8_0
      const float d = h2f(b[0] | b[1] << 8);
      for (int i = 0; i < 32; ++i) w[i] = d * (float)(int8_t)b[2 + i];
      return 32;
    }
    case 10: {  // q2_k: scales (sc | m << 4) x16, qs 64, d, dmin
      const float d = h2f(b[80] | b[81] << 8), dmin = h2f(b[82] | b[83] << 8);
      planes<2, 32, 256>(b + 16, u);
      for (int i = 0; i < 16; ++i) {
        const float a = d * (float)(b[i] & 15), o = -(dmin * (float)(b[i] >> 4));
        for (int j = 0; j < 16; ++j) w[16 * i + j] = a * (float)u[16 * i + j] + o;
      }
      return 256;
    }
    case 11: {  // q3_k: hmask 32, qs 64, scales 12, d
      const float d = h2f(b[108] | b[109] << 8);
      planes<1, 32, 256>(b, hb);
      planes<2, 32, 256>(b + 32, u);
      uint8_t lo[16], hi[16];
      planes<4, 8, 16>(b + 96, lo);
      planes<2, 4, 16>(b + 104, hi);
      for (int i = 0; i < 16; ++i) {
        const float a = d * (float)((int)(lo[i] | hi[i] << 4) - 32);
        for (int j = 0; j < 16; ++j) w[16 * i + j] = a * (float)((int)(u[16 * i + j] | hb[16 * i + j] << 2) - 4);
      }
      return 256;
    }
    case 12: case 13: {  // q4_k, q5_k: d, dmin, scales 12, (qh 32,) qs 128
      const float d = h2f(b[0] | b[1] << 8), dmin = h2f(b[2] | b[3] << 8);
      scale_min_k4(b + 4, sc, mn);
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

