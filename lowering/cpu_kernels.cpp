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
// Built at first use by cpu_kernels.py (-O3 -march=native) and loaded with torch.ops.load_library.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
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

}  // namespace

TORCH_LIBRARY_IMPL(qcompile, CPU, m) {
  m.impl("int4_mm_kernel", &int4_mm_cpu);
  m.impl("int8_mm_kernel", &int8_mm_cpu);
  m.impl("lut_mm_kernel", &lut_mm_cpu);
}
