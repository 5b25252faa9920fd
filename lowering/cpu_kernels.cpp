// qcompile CPU kernels: weight-only int4 / int8 matmul, registered as the CPU implementation of
// the ops qcompile::int4_mm_kernel and qcompile::int8_mm_kernel (defined in qcompile/ops.py).
//
// They read the canonical formats (qcompile/formats) directly:
//   int4: qweight uint8 [N, K/2], byte j of row n holds k = 2j (low nibble) and k = 2j+1 (high);
//         w[n,k] = s[n,g] * (q[n,k] - z[n,g]),  g = k / group
//   int8: qweight int8 [N, K], w[n,k] = s[n] * q[n,k] (per channel, symmetric: the default lm_head),
//         or w[n,k] = s[n,g] * (q[n,k] - z[n,g]), g = k / (K / G), with s, z [N, G] (or [N], z optional)
//   lut:  codes uint8 [N, K/2] as int4, tables [N, L <= 16], w[n,k] = T[n, q[n,k]]
// Scales and zero-points may be float32, float16 or bfloat16; activations any float type.
// Arithmetic is float32 (float64 inputs get a float64 dequantize + matmul).
//
// Decode (a few rows of x) is bound by converting codes to floats and by FMA latency: each thread
// streams whole weight rows; 16 codes widen to two float vectors (even k, odd k) that multiply the
// even/odd halves of x, so nibbles are never interleaved; four independent accumulators hide the
// FMA latency. Per group the sum over q*x is scaled once and the zero-point uses the group's sum of x:
//   y[m,n] = sum_g s[n,g] * (sum_{k in g} q[n,k] x[m,k] - z[n,g] * sum_{k in g} x[m,k])
// Prefill (more than GEMV_MAX_ROWS rows) dequantizes the weight in row chunks and uses ATen's GEMM.
//
// qcompile::int4_mm_a8_kernel and qcompile::int8_mm_a8_kernel (W4A8 / W8A8 decode) quantize x to int8
// instead, as llama.cpp does: see "int8 activations" below.
// Built at first use by cpu_kernels.py (-O3 -march=native) and loaded with torch.ops.load_library.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <cmath>
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QCOMPILE_VNNI 1
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QCOMPILE_VNNI512 1  // 512-bit vpdpbusd and byte operations
#endif
#endif
#ifndef QCOMPILE_OPS  // cpu_kernels.py builds test variants for lesser ISAs into their own op namespace
#define QCOMPILE_OPS qcompile
#endif

namespace {

constexpr int64_t GEMV_MAX_ROWS = 8;
constexpr int64_t DEQUANT_CHUNK = 1 << 22;  // weights dequantized at a time for prefill (16 MiB)

// --- scale / zero-point access in their stored dtype ------------------------------------------
struct Params {
  const void* data;
  at::ScalarType dtype;
  float operator[](int64_t i) const {
    switch (dtype) {
      case at::kFloat: return static_cast<const float*>(data)[i];
      case at::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(data)[i]);
      default: return static_cast<float>(static_cast<const at::Half*>(data)[i]);
    }
  }
  // count values from i, as float (one dtype switch; 8 at a time where the CPU converts them: a decode GEMV
  // converts its block's scales and zero-points for every 4 weight rows, and one at a time that cost as much
  // as the dot products of a 576-wide row)
  void load(int64_t i, int64_t count, float* out) const {
    const uint16_t* h = static_cast<const uint16_t*>(data) + i;
    int64_t c = 0;
    switch (dtype) {
      case at::kFloat: std::memcpy(out, static_cast<const float*>(data) + i, count * sizeof(float)); break;
      case at::kBFloat16:  // bfloat16 is the high half of a float32
#ifdef __AVX2__
        for (; c + 8 <= count; c += 8) {
          const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + c)));
          _mm256_storeu_ps(out + c, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
        }
#endif
        for (; c < count; ++c) out[c] = std::bit_cast<float>(static_cast<uint32_t>(h[c]) << 16);
        break;
      default:
#ifdef __F16C__
        for (; c + 8 <= count; c += 8)
          _mm256_storeu_ps(out + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + c))));
#endif
        for (; c < count; ++c) out[c] = static_cast<float>(static_cast<const at::Half*>(data)[i + c]);
    }
  }
#ifdef QCOMPILE_VNNI512
  // count (<= 16) values from i as one vector of floats, its other lanes 0 (the 512-bit W4A8 GEMV's prep)
  __m512 load16(int64_t i, int64_t count) const {
    const __mmask16 mask = count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1);
    const uint16_t* h = static_cast<const uint16_t*>(data) + i;
    switch (dtype) {
      case at::kFloat: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(data) + i);
      case at::kBFloat16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, h)), 16));
      default: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, h));
    }
  }
#endif
};

at::Tensor readable(const at::Tensor& t) {  // a contiguous fp32/fp16/bf16 tensor
  auto dt = t.scalar_type();
  auto r = (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) ? t : t.to(at::kFloat);
  return r.contiguous();
}

#ifdef __AVX2__
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// --- int4 GEMV ----------------------------------------------------------------------------------
// Rows a (and b, if two) of x against output channel n. xe/xo: even/odd columns, xs: group sums.
template <int R>
void int4_row(const uint8_t* row, const float* const* xe, const float* const* xo, const float* const* xs,
              int64_t G, int64_t hg, const Params& s, const Params& z, int64_t n, float* out) {
  float total[R] = {};
#ifdef __AVX2__
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(15);
#endif
  for (int64_t g = 0; g < G; ++g) {
    const float sg = s[n * G + g], zg = z[n * G + g];
    const int64_t j1 = (g + 1) * hg;
    int64_t j = g * hg;
    float t[R] = {};
#ifdef __AVX2__
    __m256 a[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = _mm256_setzero_ps();
    for (; j + 16 <= j1; j += 16) {  // 16 bytes = 32 codes
      const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
      const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j + 8)));
      const __m256 l0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, low));
      const __m256 h0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
      const __m256 l1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, low));
      const __m256 h1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
      for (int r = 0; r < R; ++r) {
        a[r][0] = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xe[r] + j), a[r][0]);
        a[r][1] = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xo[r] + j), a[r][1]);
        a[r][2] = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xe[r] + j + 8), a[r][2]);
        a[r][3] = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xo[r] + j + 8), a[r][3]);
      }
    }
    const __m256 sv = _mm256_set1_ps(sg);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(sv, _mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3])), acc[r]);
#endif
    for (; j < j1; ++j) {  // the tail (everything, without AVX2)
      const float lo = static_cast<float>(row[j] & 15), hi = static_cast<float>(row[j] >> 4);
      for (int r = 0; r < R; ++r) t[r] += lo * xe[r][j] + hi * xo[r][j];
    }
    for (int r = 0; r < R; ++r) total[r] += sg * (t[r] - zg * xs[r][g]);
  }
  for (int r = 0; r < R; ++r) {
#ifdef __AVX2__
    total[r] += hsum(acc[r]);
#endif
    out[r] = total[r];
  }
}

void int4_gemv(const float* x, int64_t M, int64_t K, const uint8_t* qw, const Params& s, const Params& z,
               int64_t N, int64_t group, float* y) {
  const int64_t hk = K / 2, G = K / group, hg = group / 2;
  std::vector<float> xe(M * hk), xo(M * hk), xs(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < hk; ++j) {
      xe[m * hk + j] = x[m * K + 2 * j];
      xo[m * hk + j] = x[m * K + 2 * j + 1];
    }
    for (int64_t k = 0; k < K; ++k) xs[m * G + k / group] += x[m * K + k];
  }
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = qw + n * hk;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) {  // two rows of x share each converted code vector
        const float* e[2] = {&xe[m * hk], &xe[(m + 1) * hk]};
        const float* o[2] = {&xo[m * hk], &xo[(m + 1) * hk]};
        const float* t[2] = {&xs[m * G], &xs[(m + 1) * G]};
        float out[2];
        int4_row<2>(row, e, o, t, G, hg, s, z, n, out);
        y[m * N + n] = out[0];
        y[(m + 1) * N + n] = out[1];
      }
      if (m < M) {
        const float* e[1] = {&xe[m * hk]};
        const float* o[1] = {&xo[m * hk]};
        const float* t[1] = {&xs[m * G]};
        int4_row<1>(row, e, o, t, G, hg, s, z, n, &y[m * N + n]);
      }
    }
  });
}

template <typename T>
void int4_dequant(const uint8_t* qw, const Params& s, const Params& z, int64_t K, int64_t group, int64_t n0,
                  int64_t n1, T* out) {
  const int64_t hk = K / 2, G = K / group, hg = group / 2;
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const uint8_t* row = qw + n * hk;
      T* o = out + (n - n0) * K;
      for (int64_t g = 0; g < G; ++g) {
        const T sg = s[n * G + g], off = -sg * static_cast<T>(z[n * G + g]);
        for (int64_t j = g * hg; j < (g + 1) * hg; ++j) {
          o[2 * j] = sg * static_cast<T>(row[j] & 15) + off;
          o[2 * j + 1] = sg * static_cast<T>(row[j] >> 4) + off;
        }
      }
    }
  });
}

// --- int8 GEMV ----------------------------------------------------------------------------------
void int8_gemv(const float* x, int64_t M, int64_t K, const int8_t* qw, const Params& s, int64_t N, float* y) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = qw + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        float t = 0.f;
        int64_t k = 0;
#ifdef __AVX2__
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (; k + 16 <= K; k += 16) {
          const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k))));
          const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8))));
          a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + k), a0);
          a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + k + 8), a1);
        }
        t = hsum(_mm256_add_ps(a0, a1));
#endif
        for (; k < K; ++k) t += static_cast<float>(row[k]) * xm[k];
        y[m * N + n] = s[n] * t;
      }
    }
  });
}

// Groups and/or zero-points: per group the sum over q*x is scaled once, and the zero-point uses the
// group's sum of x (as for int4). z may be null (symmetric groups).
void int8_gemv_grouped(const float* x, int64_t M, int64_t K, const int8_t* qw, const Params& s, const Params* z,
                       int64_t N, int64_t G, float* y) {
  const int64_t group = K / G;
  std::vector<float> xs(z ? M * G : 0, 0.f);
  if (z)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xs[m * G + k / group] += x[m * K + k];
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = qw + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        float total = 0.f;
#ifdef __AVX2__
        __m256 acc = _mm256_setzero_ps();
#endif
        for (int64_t g = 0; g < G; ++g) {
          const float sg = s[n * G + g];
          const int64_t k1 = (g + 1) * group;
          int64_t k = g * group;
          float t = 0.f;
#ifdef __AVX2__
          __m256 a0 = _mm256_setzero_ps(), a1 = a0;
          for (; k + 16 <= k1; k += 16) {
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k))));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8))));
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + k), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + k + 8), a1);
          }
          acc = _mm256_fmadd_ps(_mm256_set1_ps(sg), _mm256_add_ps(a0, a1), acc);
#endif
          for (; k < k1; ++k) t += static_cast<float>(row[k]) * xm[k];  // the tail (everything, without AVX2)
          total += sg * (z ? t - (*z)[n * G + g] * xs[m * G + g] : t);
        }
#ifdef __AVX2__
        total += hsum(acc);
#endif
        y[m * N + n] = total;
      }
    }
  });
}

template <typename T>
void int8_dequant(const int8_t* qw, const Params& s, const Params* z, int64_t K, int64_t G, int64_t n0,
                  int64_t n1, T* out) {
  const int64_t group = K / G;
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      T* o = out + (n - n0) * K;
      const int8_t* row = qw + n * K;
      for (int64_t g = 0; g < G; ++g) {
        const T sg = s[n * G + g], off = z ? -sg * static_cast<T>((*z)[n * G + g]) : T(0);
        for (int64_t k = g * group; k < (g + 1) * group; ++k) o[k] = sg * static_cast<T>(row[k]) + off;
      }
    }
  });
}

// --- lut (per-row lookup table) GEMV -----------------------------------------------------------
// w[n,k] = T[n, q[n,k]] with a table of up to 16 floats per row. With AVX2 the table sits in two
// registers (entries 0-7 and 8-15); a code's low three bits pick a lane of both (vpermps) and its
// bit 3 picks the register (blend on the sign bit after shifting it up). Layout as int4: nibbles,
// k = 2j low, so even and odd columns multiply the even/odd halves of x.
template <int R>
void lut_row(const uint8_t* row, const float* const* xe, const float* const* xo, int64_t hk,
             const float* table, bool wide, float* out) {
  float total[R] = {};
  int64_t j = 0;
#ifdef __AVX2__
  const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
  const __m256i low = _mm256_set1_epi32(15);
  __m256 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) a[r][i] = _mm256_setzero_ps();
  auto look = [&](__m256i c) {
    const __m256 v = _mm256_permutevar8x32_ps(tlo, c);
    if (!wide) return v;  // 2- and 3-bit codes never reach entry 8
    return _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(thi, c), _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
  };
  for (; j + 16 <= hk; j += 16) {
    const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j + 8)));
    const __m256 l0 = look(_mm256_and_si256(v0, low)), h0 = look(_mm256_srli_epi32(v0, 4));
    const __m256 l1 = look(_mm256_and_si256(v1, low)), h1 = look(_mm256_srli_epi32(v1, 4));
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xe[r] + j), a[r][0]);
      a[r][1] = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xo[r] + j), a[r][1]);
      a[r][2] = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xe[r] + j + 8), a[r][2]);
      a[r][3] = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xo[r] + j + 8), a[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    total[r] = hsum(_mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3])));
#endif
  for (; j < hk; ++j)
    for (int r = 0; r < R; ++r) total[r] += table[row[j] & 15] * xe[r][j] + table[row[j] >> 4] * xo[r][j];
  for (int r = 0; r < R; ++r) out[r] = total[r];
}

void lut_gemv(const float* x, int64_t M, int64_t K, const uint8_t* codes, const Params& t, int64_t L,
              int64_t N, float* y) {
  const int64_t hk = K / 2;
  std::vector<float> xe(M * hk), xo(M * hk);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < hk; ++j) {
      xe[m * hk + j] = x[m * K + 2 * j];
      xo[m * hk + j] = x[m * K + 2 * j + 1];
    }
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float table[16] = {};
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t e = 0; e < L; ++e) table[e] = t[n * L + e];
      const uint8_t* row = codes + n * hk;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) {
        const float* e[2] = {&xe[m * hk], &xe[(m + 1) * hk]};
        const float* o[2] = {&xo[m * hk], &xo[(m + 1) * hk]};
        float out[2];
        lut_row<2>(row, e, o, hk, table, L > 8, out);
        y[m * N + n] = out[0];
        y[(m + 1) * N + n] = out[1];
      }
      if (m < M) {
        const float* e[1] = {&xe[m * hk]};
        const float* o[1] = {&xo[m * hk]};
        lut_row<1>(row, e, o, hk, table, L > 8, &y[m * N + n]);
      }
    }
  });
}

template <typename T>
void lut_dequant(const uint8_t* codes, const Params& t, int64_t L, int64_t K, int64_t n0, int64_t n1, T* out) {
  const int64_t hk = K / 2;
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
    T table[16] = {};
    for (int64_t n = a; n < b; ++n) {
      for (int64_t e = 0; e < L; ++e) table[e] = static_cast<T>(t[n * L + e]);
      const uint8_t* row = codes + n * hk;
      T* o = out + (n - n0) * K;
      for (int64_t j = 0; j < hk; ++j) {
        o[2 * j] = table[row[j] & 15];
        o[2 * j + 1] = table[row[j] >> 4];
      }
    }
  });
}

// --- int8 activations (W4A8 / W8A8 decode) -------------------------------------------------------
// Each row of x is quantized once per call to int8, symmetric per group of features (sx = absmax / 127,
// a = round-half-even(x / sx), no clipping: llama.cpp's quantize_row_q8_0), and meets the weight codes in
// integer dot products, exact in int32, so only the per-group float combination rounds:
//   int4: y[m,n] = sum_g s[n,g] sx[m,g] (sum_{k in g} q[n,k] a[m,k] - z[n,g] sum_{k in g} a[m,k])
//   int8: y[m,n] = s[n] sum_g sx[m,g] sum_{k in g} q[n,k] a[m,k]
// vpdpbusd (AVX512-VNNI, in its 256-bit EVEX form like llama.cpp: Zen4 splits zmm ops in two anyway) and
// AVX2 maddubs + madd multiply unsigned by signed bytes:
//   int4: the codes 0..15 are the unsigned operand, a the signed one (maddubs pairs <= 2*15*127: no saturation);
//   int8, VNNI: a + 128 is the unsigned operand, and 128 * (the group's sum of q) comes off. The sum of q is
//     one more vpdpbusd per 32 weights in the same pass: the op has nowhere to cache row sums, and the
//     pass is bound by reading the weight (the lm_head), not by vpdpbusd;
//   int8, AVX2: pairs of (a + 128) * q would saturate int16, so llama.cpp's sign trick: |q| * (a sign(q)),
//     pairs <= 2*128*127.
// Without AVX2 every dot product is the scalar tail loop. An int4 step takes ROWS output channels against
// one row of x: their dependency chains (vpdpbusd has a 4-5 cycle latency) interleave, each activation
// vector is loaded once for all of them, and the next ROWS rows are prefetched (the hardware prefetcher
// follows one stream, not ROWS interleaved ones: from memory, the down_proj's 768-byte rows ran 1.3x slower).
#ifdef QCOMPILE_VNNI
constexpr bool ACT_BIASED = true;  // int8 weights: activations stored as a + 128, the unsigned operand
#else
constexpr bool ACT_BIASED = false;
#endif
constexpr int ROWS = 4;

struct ActsQ {
  std::vector<int8_t> a;  // [M, K] codes; int4: per row the even k, then the odd k (the nibble order)
  std::vector<float> sx;  // [M, G] scales
  std::vector<float> bz;  // [M, G] sx * the group's sum of codes (for the zero-point)
};

// Once per call, on one thread (at most 8 rows of x); the loops vectorize.
ActsQ quantize_acts(const float* x, int64_t M, int64_t K, int64_t group, bool split, bool biased) {
  const int64_t G = K / group, hk = K / 2, hg = group / 2;
  const int32_t bias = biased ? 128 : 0;
  ActsQ q{std::vector<int8_t>(M * K), std::vector<float>(M * G), std::vector<float>(M * G)};
  std::vector<int32_t> c(group);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * K + g * group;
      uint32_t amax = 0;  // as bits: |x| orders as its bit pattern, and an integer max vectorizes
      for (int64_t k = 0; k < group; ++k) amax = std::max(amax, std::bit_cast<uint32_t>(xg[k]) & 0x7fffffffu);
      const float d = std::bit_cast<float>(amax) / 127.f, div = d > 0.f ? d : 1.f;  // all-zero groups: a = 0
      for (int64_t k = 0; k < group; ++k) c[k] = static_cast<int32_t>(std::nearbyint(xg[k] / div));  // |c| <= 127
      int32_t sum = 0;
      for (int64_t k = 0; k < group; ++k) sum += c[k];
      int8_t* a = &q.a[m * K];
      if (split)
        for (int64_t k = 0; k < hg; ++k) {
          a[g * hg + k] = static_cast<int8_t>(c[2 * k] + bias);
          a[hk + g * hg + k] = static_cast<int8_t>(c[2 * k + 1] + bias);
        }
      else
        for (int64_t k = 0; k < group; ++k) a[g * group + k] = static_cast<int8_t>(c[k] + bias);
      q.sx[m * G + g] = d;
      q.bz[m * G + g] = d * static_cast<float>(sum);
    }
  return q;
}

#ifdef __AVX2__
// acc + the sums of 4 adjacent u8 * s8 products in each int32 lane.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#ifdef QCOMPILE_VNNI
  return _mm256_dpbusd_epi32(acc, u, s);
#else  // maddubs saturates each pair at int16: the callers keep pairs below 2^15
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i load16(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
#endif

#ifdef QCOMPILE_VNNI512
// acc += u (unsigned bytes) . s (signed bytes), 4 products per int32 lane. Written as asm: GCC 12 copies every
// accumulator of the intrinsic's loop twice per step and re-loads the weights from memory for each row.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// acc += x * w in registers (as asm for the same reason: GCC re-loads w from memory for every row)
inline __m512 fmadd(__m512 x, __m512 w, __m512 acc) {
  asm("vfmadd231ps %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}
#endif

// R int4 weight rows from w (hk bytes apart) x one row of int8 activations (ae/ao: the codes of the even/odd
// columns): out[i] = sum_g ssx[i][g] sum_{k in g} q a, with ssx = s * sx; the caller takes off the zero-point term.
template <int R>
void int4_a8_rows(const uint8_t* w, int64_t hk, const int8_t* ae, const int8_t* ao, const float* const* ssx,
                  int64_t G, int64_t hg, float* out) {
  float total[R] = {};
#ifdef __AVX2__
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(15);
#endif
  for (int64_t g = 0; g < G; ++g) {
    const int64_t j1 = (g + 1) * hg;
    int64_t j = g * hg;
#ifdef __AVX2__
    __m256i d[R];
    for (int i = 0; i < R; ++i) d[i] = _mm256_setzero_si256();
    for (; j + 32 <= j1; j += 32) {  // 32 bytes = 64 codes
      const __m256i xe = load32(ae + j), xo = load32(ao + j);
      for (int i = 0; i < R; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (R + i) * hk + j), _MM_HINT_T0);  // the next step's rows
        const __m256i v = load32(w + i * hk + j);
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        d[i] = dot_u8s8(dot_u8s8(d[i], lo, xe), hi, xo);
      }
    }
    if (j + 16 <= j1) {  // 16 bytes (group 32): the low nibbles in the low half, the high ones in the high half
      const __m256i xa = _mm256_set_m128i(load16(ao + j), load16(ae + j));
      for (int i = 0; i < R; ++i) {
        const __m128i v = load16(w + i * hk + j);
        d[i] = dot_u8s8(d[i], _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low), xa);
      }
      j += 16;
    }
    for (int i = 0; i < R; ++i)
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i]), _mm256_set1_ps(ssx[i][g]), acc[i]);
#endif
    if (j < j1)  // the tail (everything, without AVX2)
      for (int i = 0; i < R; ++i) {
        const uint8_t* row = w + i * hk;
        int32_t t = 0;
        for (int64_t jj = j; jj < j1; ++jj) t += (row[jj] & 15) * ae[jj] + (row[jj] >> 4) * ao[jj];
        total[i] += ssx[i][g] * static_cast<float>(t);
      }
  }
  for (int i = 0; i < R; ++i) {
#ifdef __AVX2__
    total[i] += hsum(acc[i]);
#endif
    out[i] = total[i];
  }
}

#ifdef QCOMPILE_VNNI512
// int4_a8_rows with 512-bit vectors, for groups whose half (hg bytes of a row) divides 64 or is a multiple of 64:
// a step takes 64 bytes (128 codes) of each row, whose 16 int32 lanes (4 bytes each) fall in 64 / hg groups (or
// one), and one permute spreads those groups' scales over the lanes. Twice the codes per instruction of the
// 256-bit loop and one float FMA per 64 bytes instead of one per group: the 256-bit loop ran at 10-12 GB/s on
// one core, bound by instructions. ssx: per row, s * sx per group and 16 zeros after the last; zt: per row, the
// zero-point term as a vector whose lanes sum to it. Besides the next 4 rows (to L1), each step prefetches ~8 KB
// ahead into L2: from memory, down_proj's 1536x576 ran 1.8x faster on one core (62 -> 35 us) with it.
template <int R>
void int4_a8_rows512(const uint8_t* w, int64_t hk, const int8_t* ae, const int8_t* ao, const float* const* ssx,
                     const __m512* zt, int64_t hg, __m512i lanes, float* out) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_sub_ps(_mm512_setzero_ps(), zt[i]);
  const __m512i low = _mm512_set1_epi8(15);
  // the step's first group and, for hg > 64, its bytes before the step: counted, as a division per step cost more
  // than the step
  const int64_t advance = hg <= 64 ? 64 / hg : 0;
  int64_t g0 = 0, into = 0;
  auto step = [&](int64_t j, __mmask64 mask) {
    const __m512i xe = _mm512_maskz_loadu_epi8(mask, ae + j), xo = _mm512_maskz_loadu_epi8(mask, ao + j);
    for (int i = 0; i < R; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (R + i) * hk + j), _MM_HINT_T0);  // the next step's rows
      _mm_prefetch(reinterpret_cast<const char*>(w + i * hk + j + 8192), _MM_HINT_T2);  // ~8 KB ahead, to L2
      const __m512i v = _mm512_maskz_loadu_epi8(mask, w + i * hk + j);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      const __m512i d = dpbusd(dpbusd(_mm512_setzero_si512(), lo, xe), hi, xo);
      const __m512 scale = _mm512_permutexvar_ps(lanes, _mm512_loadu_ps(ssx[i] + g0));
      acc[i] = fmadd(_mm512_cvtepi32_ps(d), scale, acc[i]);
    }
    if (advance) {
      g0 += advance;
    } else if ((into += 64) == hg) {
      ++g0;
      into = 0;
    }
  };
  int64_t j = 0;
  for (; j + 64 <= hk; j += 64) step(j, ~0ULL);
  if (j < hk) step(j, (1ULL << (hk - j)) - 1);  // masked bytes read as code 0 and activation 0
  for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

void int4_a8_gemv512(const ActsQ& q, int64_t M, int64_t K, const uint8_t* qw, const Params& s, const Params& z,
                     int64_t N, int64_t group, float* y) {
  const int64_t hk = K / 2, G = K / group, hg = group / 2, Gp = G + 16;
  alignas(64) int32_t lane_group[16];  // lane l holds bytes 4l..4l+3 of a step: group g0 + 4l / hg
  for (int l = 0; l < 16; ++l) lane_group[l] = hg < 64 ? 4 * l / static_cast<int32_t>(hg) : 0;
  const __m512i lanes = _mm512_load_si512(lane_group);
  at::parallel_for(0, N, 16, [&, hk, G, hg, Gp](int64_t n0, int64_t n1) {
    std::vector<float> ssx(ROWS * Gp);  // its padding stays 0
    const float* ps[ROWS];
    for (int i = 0; i < ROWS; ++i) ps[i] = &ssx[i * Gp];
    for (int64_t n = n0; n < n1; n += ROWS) {
      const int rows = static_cast<int>(std::min<int64_t>(ROWS, n1 - n));
      for (int64_t m = 0; m < M; ++m) {
        const float *sx = &q.sx[m * G], *bz = &q.bz[m * G];
        const int8_t* a = &q.a[m * K];
        __m512 zt[ROWS];
        for (int i = 0; i < rows; ++i) {  // s * sx per group, and the zero-point term s * z * bz
          zt[i] = _mm512_setzero_ps();
          for (int64_t g = 0; g < G; g += 16) {
            const __mmask16 mask = G - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (G - g)) - 1);
            const __m512 sv = s.load16((n + i) * G + g, G - g), zv = z.load16((n + i) * G + g, G - g);
            _mm512_mask_storeu_ps(&ssx[i * Gp + g], mask, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(mask, sx + g)));
            zt[i] = _mm512_fmadd_ps(_mm512_mul_ps(sv, zv), _mm512_maskz_loadu_ps(mask, bz + g), zt[i]);
          }
        }
        float out[ROWS];
        if (rows == ROWS)
          int4_a8_rows512<ROWS>(qw + n * hk, hk, a, a + hk, ps, zt, hg, lanes, out);
        else
          for (int i = 0; i < rows; ++i)
            int4_a8_rows512<1>(qw + (n + i) * hk, hk, a, a + hk, ps + i, zt + i, hg, lanes, out + i);
        for (int i = 0; i < rows; ++i) y[m * N + n + i] = out[i];
      }
    }
  });
}
#endif

void int4_a8_gemv(const float* x, int64_t M, int64_t K, const uint8_t* qw, const Params& s, const Params& z,
                  int64_t N, int64_t group, float* y) {
  const int64_t hk = K / 2, G = K / group, hg = group / 2;
  const ActsQ q = quantize_acts(x, M, K, group, true, false);
#ifdef QCOMPILE_VNNI512
  if (hg % 4 == 0 && (64 % hg == 0 || hg % 64 == 0)) return int4_a8_gemv512(q, M, K, qw, s, z, N, group, y);
#endif
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> sf(ROWS * G), zf(ROWS * G), ssx(ROWS * G);
    const float* ps[ROWS];
    for (int i = 0; i < ROWS; ++i) ps[i] = &ssx[i * G];
    for (int64_t n = n0; n < n1; n += ROWS) {
      const int rows = static_cast<int>(std::min<int64_t>(ROWS, n1 - n));
      s.load(n * G, rows * G, sf.data());
      z.load(n * G, rows * G, zf.data());
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* ae = &q.a[m * K];
        const float *sx = &q.sx[m * G], *bz = &q.bz[m * G];
        float zt[ROWS] = {}, out[ROWS];
        for (int i = 0; i < rows; ++i)
          for (int64_t g = 0; g < G; ++g) {
            ssx[i * G + g] = sf[i * G + g] * sx[g];
            zt[i] += sf[i * G + g] * zf[i * G + g] * bz[g];
          }
        if (rows == ROWS)
          int4_a8_rows<ROWS>(qw + n * hk, hk, ae, ae + hk, ps, G, hg, out);
        else
          for (int i = 0; i < rows; ++i) int4_a8_rows<1>(qw + (n + i) * hk, hk, ae, ae + hk, ps + i, G, hg, out + i);
        for (int i = 0; i < rows; ++i) y[m * N + n + i] = out[i] - zt[i];
      }
    }
  });
}

// One int8 weight row x one row of int8 activations: sum_g sx[g] sum_{k in g} q a. Rows are not interleaved
// as for int4: streaming several 576-byte rows at once halved the lm_head's speed from memory (the hardware
// prefetcher follows one stream); two accumulators hide vpdpbusd's latency instead.
float int8_a8_row(const int8_t* row, const int8_t* a, const float* sx, int64_t G, int64_t group) {
  float total = 0.f;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
#endif
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k1 = (g + 1) * group;
    int64_t k = g * group;
#ifdef __AVX2__
    __m256i d[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#ifdef QCOMPILE_VNNI
    const __m256i ones = _mm256_set1_epi8(1);
    __m256i qs[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    auto step = [&](int u) {
      const __m256i v = load32(row + k + 32 * u);
      qs[u] = _mm256_dpbusd_epi32(qs[u], ones, v);
      d[u] = dot_u8s8(d[u], load32(a + k + 32 * u), v);
    };
#else
    auto step = [&](int u) {  // |q| (-128 reads as 128 unsigned) times a sign(q)
      const __m256i v = load32(row + k + 32 * u);
      d[u] = dot_u8s8(d[u], _mm256_sign_epi8(v, v), _mm256_sign_epi8(load32(a + k + 32 * u), v));
    };
#endif
    for (; k + 64 <= k1; k += 64) {
      step(0);
      step(1);
    }
    if (k + 32 <= k1) {
      step(0);
      k += 32;
    }
    __m256i dd = _mm256_add_epi32(d[0], d[1]);
#ifdef QCOMPILE_VNNI
    dd = _mm256_sub_epi32(dd, _mm256_slli_epi32(_mm256_add_epi32(qs[0], qs[1]), 7));
#endif
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dd), _mm256_set1_ps(sx[g]), acc);
#endif
    // The tail (everything, without AVX2). Unbiased by xor: GCC 12 -O3 -march=znver4 vectorizes
    // row[k] * (uint8_t(a) - 128) into wrong sums.
    int32_t t = 0;
    for (; k < k1; ++k) t += row[k] * static_cast<int8_t>(ACT_BIASED ? a[k] ^ 0x80 : a[k]);
    total += sx[g] * static_cast<float>(t);
  }
#ifdef __AVX2__
  total += hsum(acc);
#endif
  return total;
}

void int8_a8_gemv(const float* x, int64_t M, int64_t K, const int8_t* qw, const Params& s, int64_t N,
                  int64_t group, float* y) {
  const int64_t G = K / group;
  const ActsQ q = quantize_acts(x, M, K, group, false, ACT_BIASED);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float sn = s[n];
      for (int64_t m = 0; m < M; ++m) y[m * N + n] = sn * int8_a8_row(qw + n * K, &q.a[m * K], &q.sx[m * G], G, group);
    }
  });
}

// --- the ops ------------------------------------------------------------------------------------
std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  auto shape = x.sizes().vec();
  shape.back() = n;
  return shape;
}

// x2 [M, K] @ W.T for many rows: dequantize W (in x2's dtype) in chunks of rows, one GEMM each.
template <typename Dequant>
at::Tensor prefill(const at::Tensor& x2, int64_t n, int64_t k, Dequant dequant) {
  auto out_t = at::empty({n, x2.size(0)}, x2.options());
  const int64_t step = std::max<int64_t>(1, DEQUANT_CHUNK / k);
  auto buf = at::empty({std::min(step, n), k}, x2.options());
  for (int64_t n0 = 0; n0 < n; n0 += step) {
    const int64_t n1 = std::min(n, n0 + step);
    auto w = buf.narrow(0, 0, n1 - n0);
    dequant(n0, n1, w);
    auto out = out_t.narrow(0, n0, n1 - n0);
    at::mm_out(out, w, x2.t());
  }
  return out_t.t().contiguous();
}

at::Tensor int4_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t group) {
  const int64_t n = qweight.size(0), k = 2 * qweight.size(1);
  TORCH_CHECK(x.size(-1) == k, "qcompile::int4_mm: input has ", x.size(-1), " features, the weight expects ", k);
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "qcompile::int4_mm: qweight must be uint8");
  TORCH_CHECK(group > 0 && group % 2 == 0 && k % group == 0, "qcompile::int4_mm: bad group size ", group);
  const auto qw = qweight.contiguous();
  const auto s_t = readable(scales), z_t = readable(zeros);
  const Params s{s_t.data_ptr(), s_t.scalar_type()}, z{z_t.data_ptr(), z_t.scalar_type()};
  const int64_t m = x.numel() / k;
  if (x.scalar_type() == at::kDouble) {  // float64 asks for more than float32 arithmetic gives
    auto x2 = x.reshape({m, k});
    return prefill(x2, n, k, [&](int64_t n0, int64_t n1, at::Tensor& w) {
             int4_dequant<double>(qw.data_ptr<uint8_t>(), s, z, k, group, n0, n1, w.data_ptr<double>());
           }).view(out_shape(x, n));
  }
  const auto xf = x.to(at::kFloat).contiguous();
  at::Tensor y;
  if (m <= GEMV_MAX_ROWS) {
    y = at::empty(out_shape(x, n), xf.options());
    int4_gemv(xf.data_ptr<float>(), m, k, qw.data_ptr<uint8_t>(), s, z, n, group, y.data_ptr<float>());
  } else {
    y = prefill(xf.reshape({m, k}), n, k, [&](int64_t n0, int64_t n1, at::Tensor& w) {
          int4_dequant<float>(qw.data_ptr<uint8_t>(), s, z, k, group, n0, n1, w.data_ptr<float>());
        }).view(out_shape(x, n));
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor int8_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros) {
  const int64_t n = qweight.size(0), k = qweight.size(1);
  TORCH_CHECK(x.size(-1) == k, "qcompile::int8_mm: input has ", x.size(-1), " features, the weight expects ", k);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "qcompile::int8_mm: qweight must be int8");
  TORCH_CHECK(scales.dim() >= 1 && scales.dim() <= 2 && scales.size(0) == n, "qcompile::int8_mm: scales must be [N] or [N, G]");
  const int64_t G = scales.dim() == 2 ? scales.size(1) : 1;
  TORCH_CHECK(G > 0 && k % G == 0, "qcompile::int8_mm: ", G, " groups do not divide ", k, " input features");
  const bool has_zeros = zeros.has_value() && zeros->defined();
  TORCH_CHECK(!has_zeros || zeros->sizes() == scales.sizes(), "qcompile::int8_mm: zeros must have the shape of scales");
  const auto qw = qweight.contiguous();
  const auto s_t = readable(scales);
  const auto z_t = has_zeros ? readable(*zeros) : at::Tensor();
  const Params s{s_t.data_ptr(), s_t.scalar_type()};
  const Params z_p{has_zeros ? z_t.data_ptr() : nullptr, has_zeros ? z_t.scalar_type() : at::kFloat};
  const Params* z = has_zeros ? &z_p : nullptr;
  const bool per_channel_sym = scales.dim() == 1 && !has_zeros;  // the default lm_head: fastest path
  const int64_t m = x.numel() / k;
  auto dequant = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return [&](int64_t n0, int64_t n1, at::Tensor& w) {
      int8_dequant<T>(qw.data_ptr<int8_t>(), s, z, k, G, n0, n1, w.data_ptr<T>());
    };
  };
  if (x.scalar_type() == at::kDouble) {
    return prefill(x.reshape({m, k}), n, k, dequant(static_cast<double*>(nullptr))).view(out_shape(x, n));
  }
  const auto xf = x.to(at::kFloat).contiguous();
  at::Tensor y;
  if (m <= GEMV_MAX_ROWS) {
    y = at::empty(out_shape(x, n), xf.options());
    if (per_channel_sym)
      int8_gemv(xf.data_ptr<float>(), m, k, qw.data_ptr<int8_t>(), s, n, y.data_ptr<float>());
    else
      int8_gemv_grouped(xf.data_ptr<float>(), m, k, qw.data_ptr<int8_t>(), s, z, n, G, y.data_ptr<float>());
  } else {
    y = prefill(xf.reshape({m, k}), n, k, dequant(static_cast<float*>(nullptr))).view(out_shape(x, n));
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor lut_mm_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables) {
  const int64_t n = codes.size(0), k = 2 * codes.size(1), L = tables.size(1);
  TORCH_CHECK(x.size(-1) == k, "qcompile::lut_mm: input has ", x.size(-1), " features, the weight expects ", k);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "qcompile::lut_mm: codes must be uint8");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == n && L >= 1 && L <= 16,
              "qcompile::lut_mm: tables must be [", n, ", <= 16], got ", tables.sizes());
  const auto cw = codes.contiguous();
  const auto t_t = readable(tables);
  const Params t{t_t.data_ptr(), t_t.scalar_type()};
  const int64_t m = x.numel() / k;
  if (x.scalar_type() == at::kDouble) {
    return prefill(x.reshape({m, k}), n, k, [&](int64_t n0, int64_t n1, at::Tensor& w) {
             lut_dequant<double>(cw.data_ptr<uint8_t>(), t, L, k, n0, n1, w.data_ptr<double>());
           }).view(out_shape(x, n));
  }
  const auto xf = x.to(at::kFloat).contiguous();
  at::Tensor y;
  if (m <= GEMV_MAX_ROWS) {
    y = at::empty(out_shape(x, n), xf.options());
    lut_gemv(xf.data_ptr<float>(), m, k, cw.data_ptr<uint8_t>(), t, L, n, y.data_ptr<float>());
  } else {
    y = prefill(xf.reshape({m, k}), n, k, [&](int64_t n0, int64_t n1, at::Tensor& w) {
          lut_dequant<float>(cw.data_ptr<uint8_t>(), t, L, k, n0, n1, w.data_ptr<float>());
        }).view(out_shape(x, n));
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Decode-size x only: more rows run the W4A16 / W8A16 kernels above (see the schemas in qcompile/ops/linear.py).
at::Tensor int4_mm_a8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t group) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "qcompile::int4_mm_a8: input must be floating-point, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte && qweight.dim() == 2,
                   "qcompile::int4_mm_a8: qweight must be a 2-D uint8 tensor, got ", qweight.scalar_type(), " ",
                   qweight.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scales.scalar_type()) && at::isFloatingType(zeros.scalar_type()),
                   "qcompile::int4_mm_a8: scales and zeros must be floating-point");
  const int64_t n = qweight.size(0), k = 2 * qweight.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, "qcompile::int4_mm_a8: input has ", x.size(-1),
                    " features, the weight expects ", k);
  TORCH_CHECK_VALUE(group > 0 && group % 2 == 0 && k % group == 0, "qcompile::int4_mm_a8: group size ", group,
                    " does not divide ", k, " input features into groups of even size");
  TORCH_CHECK_VALUE(scales.sizes() == at::IntArrayRef({n, k / group}) && zeros.sizes() == scales.sizes(),
                    "qcompile::int4_mm_a8: scales ", scales.sizes(), " and zeros ", zeros.sizes(),
                    " must be [", n, ", ", k / group, "]");
  const int64_t m = x.numel() / k;
  if (m > GEMV_MAX_ROWS) return int4_mm_cpu(x, qweight, scales, zeros, group);
  const auto qw = qweight.contiguous();
  const auto s_t = readable(scales), z_t = readable(zeros);
  const Params s{s_t.data_ptr(), s_t.scalar_type()}, z{z_t.data_ptr(), z_t.scalar_type()};
  const auto xf = x.to(at::kFloat).contiguous();
  auto y = at::empty(out_shape(x, n), xf.options());
  int4_a8_gemv(xf.data_ptr<float>(), m, k, qw.data_ptr<uint8_t>(), s, z, n, group, y.data_ptr<float>());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor int8_mm_a8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          int64_t act_group) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "qcompile::int8_mm_a8: input must be floating-point, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kChar && qweight.dim() == 2,
                   "qcompile::int8_mm_a8: qweight must be a 2-D int8 tensor, got ", qweight.scalar_type(), " ",
                   qweight.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scales.scalar_type()), "qcompile::int8_mm_a8: scales must be floating-point");
  const int64_t n = qweight.size(0), k = qweight.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, "qcompile::int8_mm_a8: input has ", x.size(-1),
                    " features, the weight expects ", k);
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == n, "qcompile::int8_mm_a8: scales must be [", n,
                    "] (per channel), got ", scales.sizes());
  TORCH_CHECK_VALUE(act_group > 0 && k % act_group == 0, "qcompile::int8_mm_a8: activation group size ", act_group,
                    " does not divide ", k, " input features");
  const int64_t m = x.numel() / k;
  if (m > GEMV_MAX_ROWS) return int8_mm_cpu(x, qweight, scales, std::nullopt);
  const auto qw = qweight.contiguous();
  const auto s_t = readable(scales);
  const Params s{s_t.data_ptr(), s_t.scalar_type()};
  const auto xf = x.to(at::kFloat).contiguous();
  auto y = at::empty(out_shape(x, n), xf.options());
  int8_a8_gemv(xf.data_ptr<float>(), m, k, qw.data_ptr<int8_t>(), s, n, act_group, y.data_ptr<float>());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// QUIK's integer part (qcompile/ops/quik.py): int32 group sums of a [M, K] @ b [N, K]^T, one oneDNN s8s8s32
// GEMM per weight group (VNNI vpdpbusd where the CPU has it). A is handed over with strides (K, 1): oneDNN
// reads lda from stride(0), and a one-row view with stride 0 (Inductor's broadcast token) gives lda = 0 and
// garbage (pytorch #195066).
at::Tensor int8_gemm_cpu(const at::Tensor& a, const at::Tensor& b, int64_t groups) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar && a.dim() == 2 && b.dim() == 2,
                   "qcompile::int8_gemm: int8 [M, K] and [N, K] operands expected, got ", a.scalar_type(), " ",
                   a.sizes(), " and ", b.scalar_type(), " ", b.sizes());
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  TORCH_CHECK_VALUE(b.size(1) == k && groups > 0 && k % groups == 0, "qcompile::int8_gemm: ", a.sizes(), " @ ",
                    b.sizes(), "^T in ", groups, " groups of K");
  const auto ad = (a.stride(1) == 1 && a.stride(0) == k) ? a : at::empty({m, k}, a.options()).copy_(a);
  auto out = at::empty({groups, m, n}, a.options().dtype(at::kInt));
  const int64_t g = k / groups;
  for (int64_t i = 0; i < groups; ++i) {
    auto out_i = out.select(0, i);
    at::_int_mm_out(out_i, groups == 1 ? ad : ad.narrow(1, i * g, g).contiguous(), b.narrow(1, i * g, g).t());
  }
  return out;
}

// --- QUIK's linear layer (qcompile::quik_linear, qcompile/ops/quik.py) -------------------------------------------
// y[m, n] = sx[m] * sum_g s[n, g] * sum_{k in g} c[n, k] * (q[m, k] - zero[m])  +  sum_j xf[m, j] * wf[n, j]
// q: x's integer columns (int_idx) quantized per token (codes 0..2^bits-1, scale sx, zero-point zero), xf: its
// float columns (fp_idx). Quantization happens here, per row, as llama.cpp quantizes activations inside its
// matmul: in Inductor the gather + min/max + rounding kernel took longer than the integer GEMM at M = 512.
// The weight is blocked at load time for this loop (ops/quik.py, block_weight):
// 16 output channels side by side,
//   8-bit codes: b int8  [N/16, Kp/4, 64]  (lane n holds k..k+3: one vpdpbusd operand per 64 bytes)
//   4-bit codes: b uint8 [N/16, Kp/8, 64]  (byte 4n+j: code(k+j) + 8 in the low nibble, code(k+4+j) + 8 in the high)
//   s / rowsum [N/16, G, 16] float / int32 (rowsum: the group's sum of codes); wf float [N/16, F, 16].
// A group's int32 sums are exact and scaled once per group, as llama.cpp's blocks are. vpdpbusd multiplies
// unsigned by signed bytes: the activation codes are the unsigned operand, and zero * rowsum comes off in int32.
// The float columns are FMAs into the same accumulators, so y is written once (no [M, N] partial results).
struct QuikArgs {
  const uint8_t* b;
  int64_t bstride;  // bytes per block of 16 channels
  const float* s;
  const int32_t* rs;
  const float* wf;
  int64_t G, gk, F;
  int64_t n;  // output channels (the row stride of y)
};

#ifdef QCOMPILE_VNNI512
// MR rows of activation codes (au, Kp apart) x NV blocks of 16 channels from block nb.
template <int MR, int NV, bool FOUR>
void quik_tile(const QuikArgs& w, int64_t nb, const uint8_t* au, int64_t Kp, const int32_t* zc, const float* sx,
               const float* xf, float* y) {
  const uint8_t* b = w.b + nb * w.bstride;
  __m512 facc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) facc[r][v] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
  for (int64_t g = 0; g < w.G; ++g) {
    __m512i acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
    const int64_t k0 = g * w.gk, k1 = k0 + w.gk;
    if constexpr (FOUR) {
      for (int64_t k = k0; k < k1; k += 8) {
        __m512i wl[NV], wh[NV];
        for (int v = 0; v < NV; ++v) {
          const __m512i q = _mm512_loadu_si512(b + v * w.bstride + k * 8);  // (k / 8) * 64 bytes
          wl[v] = _mm512_sub_epi8(_mm512_and_si512(q, low), eight);
          wh[v] = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(q, 4), low), eight);
        }
        for (int r = 0; r < MR; ++r) {
          const __m512i xl = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(au + r * Kp + k));
          const __m512i xh = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(au + r * Kp + k + 4));
          for (int v = 0; v < NV; ++v) acc[r][v] = dpbusd(dpbusd(acc[r][v], xl, wl[v]), xh, wh[v]);
        }
      }
    } else {
      for (int64_t k = k0; k < k1; k += 4) {
        __m512i q[NV];
        for (int v = 0; v < NV; ++v) q[v] = _mm512_loadu_si512(b + v * w.bstride + k * 16);  // (k / 4) * 64 bytes
        for (int r = 0; r < MR; ++r) {
          const __m512i x = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(au + r * Kp + k));
          for (int v = 0; v < NV; ++v) acc[r][v] = dpbusd(acc[r][v], x, q[v]);
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const __m512 sv = _mm512_loadu_ps(w.s + ((nb + v) * w.G + g) * 16);
      const __m512i rv = _mm512_loadu_si512(w.rs + ((nb + v) * w.G + g) * 16);
      for (int r = 0; r < MR; ++r) {
        const __m512i d = _mm512_sub_epi32(acc[r][v], _mm512_mullo_epi32(_mm512_set1_epi32(zc[r]), rv));
        facc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, facc[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) facc[r][v] = _mm512_mul_ps(facc[r][v], _mm512_set1_ps(sx[r]));
  const float* wf = w.wf + nb * w.F * 16;
  for (int64_t j = 0; j < w.F; ++j) {
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wf + (v * w.F + j) * 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(xf[r * w.F + j]);
      for (int v = 0; v < NV; ++v) facc[r][v] = fmadd(xv, wv[v], facc[r][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t left = w.n - 16 * (nb + v);
    const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * w.n + 16 * (nb + v), mask, facc[r][v]);
  }
}

template <int NV, bool FOUR>
void quik_tile_rows(int mr, const QuikArgs& w, int64_t nb, const uint8_t* au, int64_t Kp, const int32_t* zc,
                    const float* sx, const float* xf, float* y) {
  switch (mr) {
    case 4: quik_tile<4, NV, FOUR>(w, nb, au, Kp, zc, sx, xf, y); break;
    case 3: quik_tile<3, NV, FOUR>(w, nb, au, Kp, zc, sx, xf, y); break;
    case 2: quik_tile<2, NV, FOUR>(w, nb, au, Kp, zc, sx, xf, y); break;
    default: quik_tile<1, NV, FOUR>(w, nb, au, Kp, zc, sx, xf, y);
  }
}
#endif

// Without VNNI: one block of 16 channels and one row at a time, in plain loops that the compiler vectorizes
// (AVX2 or not).
void quik_block_portable(const QuikArgs& w, int64_t nb, const uint8_t* a, int64_t K, bool four, int32_t zero,
                         float sx, const float* xf, float* y) {
  const uint8_t* b = w.b + nb * w.bstride;
  float total[16] = {};
  for (int64_t g = 0; g < w.G; ++g) {
    int32_t acc[16] = {};
    for (int64_t k = g * w.gk; k < std::min(K, (g + 1) * w.gk); ++k) {
      int8_t c[16];
      if (four) {
        const uint8_t* blk = b + (k / 8) * 64 + k % 4;
        const int shift = (k % 8) < 4 ? 0 : 4;
        for (int l = 0; l < 16; ++l) c[l] = static_cast<int8_t>(((blk[4 * l] >> shift) & 15) - 8);
      } else {
        const int8_t* blk = reinterpret_cast<const int8_t*>(b) + (k / 4) * 64 + k % 4;
        for (int l = 0; l < 16; ++l) c[l] = blk[4 * l];
      }
      for (int l = 0; l < 16; ++l) acc[l] += static_cast<int32_t>(a[k]) * c[l];
    }
    const float* s = w.s + (nb * w.G + g) * 16;
    const int32_t* rs = w.rs + (nb * w.G + g) * 16;
    for (int l = 0; l < 16; ++l) total[l] += s[l] * static_cast<float>(acc[l] - zero * rs[l]);
  }
  for (int l = 0; l < 16; ++l) total[l] *= sx;
  const float* wf = w.wf + nb * w.F * 16;
  for (int64_t j = 0; j < w.F; ++j)
    for (int l = 0; l < 16; ++l) total[l] += xf[j] * wf[j * 16 + l];
  for (int64_t l = 0; l < std::min<int64_t>(w.n - 16 * nb, 16); ++l) y[16 * nb + l] = total[l];
}

// Per-token asymmetric quantization of the integer columns, the one definition (qcompile/ops/quik.py,
// quantize_activations) in the same float32 operations: range [min(x, 0), max(x, 0)], s = (hi - lo) / maxq (1 if 0),
// z = round(-lo / s), q = clamp(round(x / s) + z, 0, maxq); round half to even, IEEE division. Writes q to
// codes[0, K) (the tail to Kp stays as it is), and the gathered float columns to xf.
void quantize_token(const float* x, const int32_t* int_idx, int64_t K, const int32_t* fp_idx, int64_t F, int maxq,
                    float* buf, uint8_t* codes, float* xf, float& sx, int32_t& zero) {
  float lo = 0.f, hi = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    buf[k] = x[int_idx[k]];
    lo = std::min(lo, buf[k]);
    hi = std::max(hi, buf[k]);
  }
  float s = (hi - lo) / static_cast<float>(maxq);
  s = s > 0.f ? s : 1.f;
  const float z = std::nearbyint(-lo / s);
  for (int64_t k = 0; k < K; ++k)
    codes[k] = static_cast<uint8_t>(std::clamp(std::nearbyint(buf[k] / s) + z, 0.f, static_cast<float>(maxq)));
  for (int64_t j = 0; j < F; ++j) xf[j] = x[fp_idx[j]];
  sx = s;
  zero = static_cast<int32_t>(z);
}

at::Tensor quik_linear_cpu(const at::Tensor& x, const at::Tensor& int_idx, const at::Tensor& fp_idx,
                           const at::Tensor& b, const at::Tensor& scales, const at::Tensor& rowsum,
                           const at::Tensor& wf, int64_t act_bits, int64_t n) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "qcompile::quik_linear: input must be floating-point, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE((b.scalar_type() == at::kChar || b.scalar_type() == at::kByte) && b.dim() == 3 && b.size(2) == 64,
                   "qcompile::quik_linear: b must be a blocked int8/uint8 [N/16, K/4 or K/8, 64] weight, got ",
                   b.scalar_type(), " ", b.sizes());
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat && wf.scalar_type() == at::kFloat &&
                       rowsum.scalar_type() == at::kInt && int_idx.scalar_type() == at::kInt &&
                       fp_idx.scalar_type() == at::kInt,
                   "qcompile::quik_linear: scales and wf float32, rowsum, int_idx and fp_idx int32 expected");
  TORCH_CHECK_VALUE(act_bits == 4 || act_bits == 8, "qcompile::quik_linear: act_bits ", act_bits, ": use 4 or 8");
  const bool four = b.scalar_type() == at::kByte;
  const int64_t K = int_idx.numel(), F = fp_idx.numel(), Nb = b.size(0), Kp = b.size(1) * (four ? 8 : 4);
  const int64_t G = scales.size(1), Kx = x.size(-1), M = x.numel() / std::max<int64_t>(Kx, 1);
  TORCH_CHECK_VALUE(Kx == K + F, "qcompile::quik_linear: input has ", Kx, " features, the weight expects ", K + F,
                    " (", K, " integer + ", F, " float columns)");
  TORCH_CHECK_VALUE(Nb == (n + 15) / 16 && K <= Kp && Kp - K < (four ? 8 : 4) && scales.dim() == 3 &&
                        scales.size(0) == Nb && scales.size(2) == 16 && rowsum.sizes() == scales.sizes() &&
                        wf.sizes() == at::IntArrayRef({Nb, F, 16}) &&
                        (G == 1 || (Kp == K && K % G == 0 && (K / G) % (four ? 8 : 4) == 0)),
                    "qcompile::quik_linear: b ", b.sizes(), ", scales ", scales.sizes(), ", rowsum ", rowsum.sizes(),
                    ", wf ", wf.sizes(), " with ", K, " integer columns do not describe one blocked ", n, "-row weight");
  const auto xc = x.to(at::kFloat).contiguous();
  const auto bc = b.contiguous(), sc = scales.contiguous(), rc = rowsum.contiguous(), wfc = wf.contiguous();
  const auto ic = int_idx.contiguous(), fc = fp_idx.contiguous();
  const QuikArgs w{static_cast<const uint8_t*>(bc.data_ptr()), b.size(1) * 64, sc.data_ptr<float>(),
                   rc.data_ptr<int32_t>(), wfc.data_ptr<float>(), G, G == 1 ? Kp : K / G, F, n};
  auto shape = x.sizes().vec();
  shape.back() = n;
  auto out = at::empty(shape, xc.options());
  float* y = out.data_ptr<float>();
  // the activations: unsigned codes (padded to Kp with 0, where the weight codes are 0 too), the float columns
  std::vector<uint8_t> codes(M * Kp, 0);
  std::vector<float> xf(M * F), sx(M);
  std::vector<int32_t> zero(M);
  const float* xp = xc.data_ptr<float>();
  const int maxq = (1 << act_bits) - 1;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(K);
    for (int64_t m = m0; m < m1; ++m)
      quantize_token(xp + m * Kx, ic.data_ptr<int32_t>(), K, fc.data_ptr<int32_t>(), F, maxq, buf.data(),
                     &codes[m * Kp], &xf[m * F], sx[m], zero[m]);
  });
#ifdef QCOMPILE_VNNI512
  // tasks: pairs of 16-channel blocks x all rows (the pair's weights stay in cache while the rows stream by)
  at::parallel_for(0, (Nb + 1) / 2, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nb = 2 * t;
      for (int64_t m = 0; m < M; m += 4) {
        const int mr = static_cast<int>(std::min<int64_t>(4, M - m));
        const uint8_t* am = &codes[m * Kp];
        float* ym = y + m * n;
        if (nb + 1 < Nb)
          four ? quik_tile_rows<2, true>(mr, w, nb, am, Kp, &zero[m], &sx[m], &xf[m * F], ym)
               : quik_tile_rows<2, false>(mr, w, nb, am, Kp, &zero[m], &sx[m], &xf[m * F], ym);
        else
          four ? quik_tile_rows<1, true>(mr, w, nb, am, Kp, &zero[m], &sx[m], &xf[m * F], ym)
               : quik_tile_rows<1, false>(mr, w, nb, am, Kp, &zero[m], &sx[m], &xf[m * F], ym);
      }
    }
  });
#else
  at::parallel_for(0, Nb, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t nb = n0; nb < n1; ++nb)
      for (int64_t m = 0; m < M; ++m)
        quik_block_portable(w, nb, &codes[m * Kp], K, four, zero[m], sx[m], &xf[m * F], y + m * n);
  });
#endif
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}


// --- attention over a few query rows (decode) -------------------------------------------------------
// qcompile::decode_attention_kernel: q [B, H, R, D] holds the R query rows that read K/V head h (its G
// query heads x L tokens), k [B, H, S, D], v [B, H, S, Dv], mask broadcastable to [B, H, R, S] (float:
// added to the scores; bool: true = attend). SDPA's CPU flash kernel costs 30-60 us a call at decode
// sizes whatever the work (SmolLM2: 3 rows x 3 heads x 200 keys); here each K/V row is loaded once for
// all R rows, and the keys split into chunks (flash-decoding): per chunk its row maxima, sums and
// P.V, combined at the end, so two threads share even a single head and long caches stream at
// memory speed. Float32 only (the caller keeps other dtypes on SDPA). A row that sees no key gets
// zeros, as SDPA does.
constexpr int64_t ATTN_CHUNK = 256;

#ifdef __AVX512F__
// e^x for x <= 0 (softmax after the max is subtracted): x = n ln2 + r, |r| <= ln2/2, e^r by Cephes'
// expf polynomial (~1 ulp), 2^n by scalef; below -104 the result is 0 (as float, to within 1e-45).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}
#endif

inline float dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float acc = 0.f;
#ifdef __AVX512F__
  if (D >= 16) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (d = 16; d + 16 <= D; d += 16) v = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), v);
    acc = _mm512_reduce_add_ps(v);
  }
#endif
  for (; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

// o[0:Dv] = sum_j w[j] * v[j * stride : j * stride + Dv], accumulated in registers 64 columns at a time
inline void weighted_rows(const float* w, const float* v, int64_t stride, int64_t n, int64_t Dv, float* o) {
  int64_t d = 0;
#ifdef __AVX512F__
  for (; d + 64 <= Dv; d += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < n; ++j) {
      const __m512 x = _mm512_set1_ps(w[j]);
      const float* vr = v + j * stride + d;
      a0 = _mm512_fmadd_ps(x, _mm512_loadu_ps(vr), a0);
      a1 = _mm512_fmadd_ps(x, _mm512_loadu_ps(vr + 16), a1);
      a2 = _mm512_fmadd_ps(x, _mm512_loadu_ps(vr + 32), a2);
      a3 = _mm512_fmadd_ps(x, _mm512_loadu_ps(vr + 48), a3);
    }
    _mm512_storeu_ps(o + d, a0);
    _mm512_storeu_ps(o + d + 16, a1);
    _mm512_storeu_ps(o + d + 32, a2);
    _mm512_storeu_ps(o + d + 48, a3);
  }
  for (; d + 16 <= Dv; d += 16) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) a = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), _mm512_loadu_ps(v + j * stride + d), a);
    _mm512_storeu_ps(o + d, a);
  }
#endif
  for (; d < Dv; ++d) {
    float a = 0.f;
    for (int64_t j = 0; j < n; ++j) a += w[j] * v[j * stride + d];
    o[d] = a;
  }
}

inline float row_max(const float* p, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#ifdef __AVX512F__
  __m512 m = _mm512_set1_ps(mx);
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(p + j));
  mx = _mm512_reduce_max_ps(m);
#endif
  for (; j < n; ++j) mx = std::max(mx, p[j]);
  return mx;
}

// p[j] = e^(p[j] - mx) in place; returns their sum
inline float exp_shifted_sum(float* p, int64_t n, float mx) {
  float sum = 0.f;
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 m = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + j), m));
    _mm512_mask_storeu_ps(p + j, k, e);
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - mx);
    sum += p[j];
  }
  return sum;
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, double scale) {
  const char* name = "qcompile::decode_attention_kernel";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, name, ": q, k, v must be 4-D [batch, heads, seq, dim]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              name, ": q, k, v must be float32");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H && v.size(2) == S &&
              k.size(3) == D, name, ": q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
  const at::Tensor qc = q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();  // a static cache is read in place
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  at::Tensor mk;
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    TORCH_CHECK(mask->dim() == 4, name, ": mask must be 4-D, got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kFloat || mask->scalar_type() == at::kBool, name,
                ": mask must be float32 or bool, got ", mask->scalar_type());
    mk = mask->expand({B, H, R, S});  // broadcast dimensions keep stride 0: nothing is copied
    if (S > 1 && mk.stride(3) != 1) mk = mk.contiguous();
  }
  at::Tensor out = at::empty({B, H, R, Dv}, q.options());
  if (B * H * R * Dv == 0) return out;
  // chunks of at most ATTN_CHUNK keys, and enough of them (>= 32 keys each) for two tasks a thread
  const int64_t want = (2 * at::get_num_threads() + B * H - 1) / (B * H);
  const int64_t C = std::max<int64_t>({1, (S + ATTN_CHUNK - 1) / ATTN_CHUNK, std::min(want, S / 32)});
  const int64_t chunk = (S + C - 1) / C;
  std::vector<float> part_max(B * H * C * R), part_sum(B * H * C * R), part_out(B * H * C * R * Dv);
  const float* qp = qc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const bool bool_mask = has_mask && mk.scalar_type() == at::kBool;
  const float* mf = has_mask && !bool_mask ? mk.data_ptr<float>() : nullptr;
  const bool* mb = bool_mask ? mk.data_ptr<bool>() : nullptr;
  const int64_t ms0 = has_mask ? mk.stride(0) : 0, ms1 = has_mask ? mk.stride(1) : 0, ms2 = has_mask ? mk.stride(2) : 0;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const int64_t ks2 = kc.stride(2), vs2 = vc.stride(2);
  // one task per (batch, head, chunk of keys)
  at::parallel_for(0, B * H * C, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(R * chunk);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (H * C), h = (t / C) % H, c = t % C;
      const int64_t s0 = c * chunk, n = std::max<int64_t>(0, std::min(S, s0 + chunk) - s0);
      const float* kb = kp + b * kc.stride(0) + h * kc.stride(1);
      const float* vb = vp + b * vc.stride(0) + h * vc.stride(1);
      const float* qb = qp + (b * H + h) * R * D;
      const int64_t mrow = b * ms0 + h * ms1;
      for (int64_t j = 0; j < n; ++j) {  // scores: each key row once for all R query rows
        const float* kr = kb + (s0 + j) * ks2;
        for (int64_t r = 0; r < R; ++r) p[r * n + j] = dot(qb + r * D, kr, D) * sc;
      }
      if (mf || mb) {
        for (int64_t r = 0; r < R; ++r) {
          float* pr = &p[r * n];
          const int64_t at = mrow + r * ms2 + s0;
          if (mf) for (int64_t j = 0; j < n; ++j) pr[j] += mf[at + j];
          else for (int64_t j = 0; j < n; ++j) pr[j] = mb[at + j] ? pr[j] : NEG_INF;
        }
      }
      float* om = &part_max[t * R];
      float* os = &part_sum[t * R];
      float* oo = &part_out[t * R * Dv];
      for (int64_t r = 0; r < R; ++r) {
        float* pr = &p[r * n];
        const float mx = row_max(pr, n);
        om[r] = mx;
        if (mx != NEG_INF) {
          os[r] = exp_shifted_sum(pr, n, mx);
        } else {
          std::fill(pr, pr + n, 0.f);
          os[r] = 0.f;
        }
      }
      for (int64_t r = 0; r < R; ++r) weighted_rows(&p[r * n], vb + s0 * vs2, vs2, n, Dv, oo + r * Dv);
    }
  });
  float* op = out.data_ptr<float>();
  for (int64_t bh = 0; bh < B * H; ++bh) {  // combine the chunks of each row
    for (int64_t r = 0; r < R; ++r) {
      float mx = NEG_INF;
      for (int64_t c = 0; c < C; ++c) mx = std::max(mx, part_max[(bh * C + c) * R + r]);
      float* o = op + (bh * R + r) * Dv;
      std::fill(o, o + Dv, 0.f);
      if (mx == NEG_INF) continue;
      float total = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = (bh * C + c) * R + r;
        if (part_max[i] == NEG_INF) continue;
        const float w = std::exp(part_max[i] - mx);
        total += w * part_sum[i];
        const float* po = &part_out[i * Dv];
        for (int64_t d = 0; d < Dv; ++d) o[d] += w * po[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(QCOMPILE_OPS, CPU, m) {
  m.impl("int8_gemm", &int8_gemm_cpu);
  m.impl("quik_linear", &quik_linear_cpu);
  m.impl("int4_mm_kernel", &int4_mm_cpu);
  m.impl("int8_mm_kernel", &int8_mm_cpu);
  m.impl("lut_mm_kernel", &lut_mm_cpu);
  m.impl("int4_mm_a8_kernel", &int4_mm_a8_cpu);
  m.impl("int8_mm_a8_kernel", &int8_mm_a8_cpu);
  m.impl("decode_attention_kernel", &decode_attention_cpu);
}
