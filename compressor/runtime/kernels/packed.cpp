// Matrix products straight from the packed checkpoint layouts (compressor/quantize/formats.py, ggml.py): on the
// decode path no weight is written to memory; only the checkpoint's own bytes are read. Built at first use by
// compressor/runtime/kernels/native.py (g++ -O3 -march=native -fopenmp), called through ctypes.
//
//   mc_gemv    y[m, n] = sum_k x[m, k] W[n, k]   x, y float32; a few rows of x (decode, small batches)
//   mc_dequant W -> float32 / bfloat16 / float16 rows (the operand of a library GEMM for prefill)
//
// Formats (struct Mat): int2/3/4/5/6/8 (codes LSB-first along each row, fp16 scales and zero points per (row, group),
// w = (q - z) * s), ternary (5 trits per byte, w = t * s), the GGUF block types (ggml_blocks.h), keep (fp16) and
// bf16 (a model's own linear layers, runtime/linear.py).
// Tiers, chosen at compile time: AVX512-BF16 + VBMI (codes become bf16 pairs by a table lookup, vdpbf16ps against x
// split into two bf16 halves, hi + lo = x to 2^-16), AVX512F (codes to fp32, FMA), scalar. Compiled with
// -ffp-contract=off, so mc_dequant equals the Python dequantization bit for bit.
#include "common.h"
#include "codes.h"
#include "gemv.h"
#include "dequant.h"

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

// The formats without a product of their own, row by row through decode_row: the GGUF types, and 16-bit and ternary
// below the AVX512-BF16 tier
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
      case 5: return rows_int_b<5>(A, a, y, ldy, n0, n1);
      case 6: return rows_int_b<6>(A, a, y, ldy, n0, n1);
      case 8: return rows_int_b<8>(A, a, y, ldy, n0, n1);
    }
  }
#if defined(MC_BF16)
  if (A.kind == KIND_TERNARY) return a.has_lo ? rows_ternary<true>(A, a, y, ldy, n0, n1)
                                              : rows_ternary<false>(A, a, y, ldy, n0, n1);
  if (A.kind == KIND_F16) return rows_16bit<false, true>(A, a, y, ldy, n0, n1);
  if (A.kind == KIND_BF16) return a.has_lo ? rows_16bit<true, false>(A, a, y, ldy, n0, n1)
                                           : rows_16bit<false, false>(A, a, y, ldy, n0, n1);
#endif
  rows_decoded(A, a, y, ldy, n0, n1);
}

// Row blocks for the threads: a single thread for small products (a parallel region costs more than it saves)
static int split(const Mat& A, int64_t M, int nthreads, int64_t* per) {
  const int nt = A.N * A.K * std::max<int64_t>(M, 1) < (1 << 17) ? 1 : std::max(1, nthreads);
  *per = std::max<int64_t>(1, (A.N + 4 * nt - 1) / (4 * nt));
  return nt;
}

extern "C" {

int mc_abi_version() { return 1; }

int mc_tier() {  // 2: AVX512-BF16 + VBMI, 1: AVX512F, 0: scalar
#if defined(MC_BF16)
  return 2;
#elif defined(__AVX512F__)
  return 1;
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

static inline float load_as_float(const void* p, int64_t i, int32_t kind) {
  if (kind == OUT_F32) return ((const float*)p)[i];
  const uint16_t h = ((const uint16_t*)p)[i];
  return kind == OUT_BF16 ? bf2f(h) : h2f(h);
}

// mc_gemv for activations, bias and output in their own dtype (float32 / bfloat16 / float16: the Out codes), so the
// caller converts nothing: y = x W^T (+ bias), rounded once to y's dtype. x rows are K apart, y rows N apart.
void mc_linear(const Mat* A, int64_t M, const void* x, int32_t x_kind, const void* bias, int32_t bias_kind, void* y,
               int32_t y_kind, int nthreads) {
  const int64_t K = A->K, N = A->N;
  std::vector<float> xf(M * K), yf(M * N);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = load_as_float(x, i, x_kind);
  mc_gemv(A, M, xf.data(), K, yf.data(), N, nthreads);
  const int64_t item = y_kind == OUT_F32 ? 4 : 2;
  for (int64_t m = 0; m < M; ++m) {
    float* row = yf.data() + m * N;
    if (bias)
      for (int64_t n = 0; n < N; ++n) row[n] += load_as_float(bias, n, bias_kind);
    store_row(row, N, (char*)y + m * N * item, y_kind);
  }
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
          case 5: dequant_int_row<5>(*A, n, w.data(), o, out_kind); continue;
          case 6: dequant_int_row<6>(*A, n, w.data(), o, out_kind); continue;
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
