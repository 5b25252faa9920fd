/* qcompile CPU kernels: weight-only int4 / int8 matmul with float32 activations.
 *
 * They read the canonical formats (qcompile/formats) directly:
 *   int4: qweight uint8 [N, K/2], byte j of row n holds k = 2j (low nibble) and k = 2j+1 (high);
 *         w[n,k] = s[n,g] * (q[n,k] - z[n,g]),  g = k / group
 *   int8: qweight int8 [N, K], w[n,k] = s[n] * q[n,k]
 * Scales and zero-points may be float32, float16 or bfloat16 (dtype codes below).
 *
 * Decode shapes (few rows of x) are memory- and convert-bound: each thread streams whole weight
 * rows; 16 int4 codes widen to two float vectors (even k, odd k) that multiply the matching
 * even/odd halves of x, so no nibble interleaving is needed. Per group, the sum over q*x is
 * scaled once and the zero-point term uses the group's sum of x:
 *   y[m,n] = sum_g s[n,g] * (sum_{k in g} q[n,k] x[m,k] - z[n,g] * sum_{k in g} x[m,k])
 * Codes are converted to float once and reused for two rows of x at a time.
 * Prefill shapes go through qc_int4_dequant + a float GEMM (see cpu_kernels.py).
 * Built at first use with -O3 -march=native -fopenmp against torch's own libgomp.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { F32 = 0, F16 = 1, BF16 = 2 };
#define ROWS 4 /* rows of x per pass in the int8 kernel */

static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: normalise */
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline float scalar_at(const void *p, int64_t i, int dtype) {
  if (dtype == F32) return ((const float *)p)[i];
  if (dtype == BF16) {
    uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
  }
  return half_to_float(((const uint16_t *)p)[i]);
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

/* x [M, K] -> even columns [M, K/2], odd columns [M, K/2], group sums [M, K/group] */
static void split_x(const float *x, int64_t M, int64_t K, int64_t group, float *xe, float *xo, float *xs) {
  const int64_t hk = K / 2, G = K / group;
  for (int64_t m = 0; m < M; ++m) {
    const float *r = x + m * K;
    for (int64_t j = 0; j < hk; ++j) {
      xe[m * hk + j] = r[2 * j];
      xo[m * hk + j] = r[2 * j + 1];
    }
    for (int64_t g = 0; g < G; ++g) {
      float t = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) t += r[k];
      xs[m * G + g] = t;
    }
  }
}

/* One output channel n, one row of x: four independent accumulators (FMA latency, not
 * bandwidth, bounds a single chain), 32 codes per step. */
static float int4_row1(const uint8_t *row, const float *xe, const float *xo, const float *xs, int64_t G, int64_t hg,
                       const void *s, const void *z, int sdtype, int zdtype, int64_t n) {
  float total = 0.f;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(15);
#endif
  for (int64_t g = 0; g < G; ++g) {
    const float sg = scalar_at(s, n * G + g, sdtype), zg = scalar_at(z, n * G + g, zdtype);
    const int64_t j1 = (g + 1) * hg;
    int64_t j = g * hg;
    float t = 0.f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 16 <= j1; j += 16) {
      const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + j)));
      const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + j + 8)));
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, low)), _mm256_loadu_ps(xe + j), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), _mm256_loadu_ps(xo + j), a1);
      a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, low)), _mm256_loadu_ps(xe + j + 8), a2);
      a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), _mm256_loadu_ps(xo + j + 8), a3);
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(sg), sum, acc);
#endif
    for (; j < j1; ++j) t += (float)(row[j] & 15) * xe[j] + (float)(row[j] >> 4) * xo[j];
    total += sg * (t - zg * xs[g]);
  }
#ifdef __AVX2__
  total += hsum(acc);
#endif
  return total;
}

/* The same for two rows of x (a and b) sharing each converted code vector. */
static void int4_row2(const uint8_t *row, const float *xea, const float *xoa, const float *xsa, const float *xeb,
                      const float *xob, const float *xsb, int64_t G, int64_t hg, const void *s, const void *z,
                      int sdtype, int zdtype, int64_t n, float *ya, float *yb) {
  float ta_total = 0.f, tb_total = 0.f;
#ifdef __AVX2__
  __m256 acc_a = _mm256_setzero_ps(), acc_b = acc_a;
  const __m256i low = _mm256_set1_epi32(15);
#endif
  for (int64_t g = 0; g < G; ++g) {
    const float sg = scalar_at(s, n * G + g, sdtype), zg = scalar_at(z, n * G + g, zdtype);
    const int64_t j1 = (g + 1) * hg;
    int64_t j = g * hg;
    float ta = 0.f, tb = 0.f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (; j + 16 <= j1; j += 16) {
      const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + j)));
      const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + j + 8)));
      const __m256 l0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, low)), h0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
      const __m256 l1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, low)), h1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
      a0 = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xea + j), a0);
      a1 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xoa + j), a1);
      a2 = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xea + j + 8), a2);
      a3 = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xoa + j + 8), a3);
      b0 = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xeb + j), b0);
      b1 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xob + j), b1);
      b2 = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xeb + j + 8), b2);
      b3 = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xob + j + 8), b3);
    }
    const __m256 sv = _mm256_set1_ps(sg);
    acc_a = _mm256_fmadd_ps(sv, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), acc_a);
    acc_b = _mm256_fmadd_ps(sv, _mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)), acc_b);
#endif
    for (; j < j1; ++j) {
      const float lo = (float)(row[j] & 15), hi = (float)(row[j] >> 4);
      ta += lo * xea[j] + hi * xoa[j];
      tb += lo * xeb[j] + hi * xob[j];
    }
    ta_total += sg * (ta - zg * xsa[g]);
    tb_total += sg * (tb - zg * xsb[g]);
  }
#ifdef __AVX2__
  ta_total += hsum(acc_a);
  tb_total += hsum(acc_b);
#endif
  *ya = ta_total;
  *yb = tb_total;
}

void qc_int4_gemm(const float *x, int64_t M, int64_t K, const uint8_t *qw, const void *s, const void *z,
                  int sdtype, int zdtype, int64_t N, int64_t group, float *y, int nthreads) {
  const int64_t hk = K / 2, G = K / group, hg = group / 2;
  float *xe = malloc(sizeof(float) * M * hk), *xo = malloc(sizeof(float) * M * hk);
  float *xs = malloc(sizeof(float) * M * G);
  split_x(x, M, K, group, xe, xo, xs);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t *row = qw + n * hk;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
      int4_row2(row, xe + m * hk, xo + m * hk, xs + m * G, xe + (m + 1) * hk, xo + (m + 1) * hk, xs + (m + 1) * G,
                G, hg, s, z, sdtype, zdtype, n, y + m * N + n, y + (m + 1) * N + n);
    if (m < M) y[m * N + n] = int4_row1(row, xe + m * hk, xo + m * hk, xs + m * G, G, hg, s, z, sdtype, zdtype, n);
  }
  free(xe);
  free(xo);
  free(xs);
}

/* Rows n0 .. n1-1 of the int4 weight as float32 [n1 - n0, K] (for prefill GEMMs). */
void qc_int4_dequant(const uint8_t *qw, const void *s, const void *z, int sdtype, int zdtype, int64_t K,
                     int64_t group, int64_t n0, int64_t n1, float *out, int nthreads) {
  const int64_t hk = K / 2, G = K / group, hg = group / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t *row = qw + n * hk;
    float *o = out + (n - n0) * K;
    for (int64_t g = 0; g < G; ++g) {
      const float sg = scalar_at(s, n * G + g, sdtype), off = -sg * scalar_at(z, n * G + g, zdtype);
      for (int64_t j = g * hg; j < (g + 1) * hg; ++j) {
        o[2 * j] = sg * (float)(row[j] & 15) + off;
        o[2 * j + 1] = sg * (float)(row[j] >> 4) + off;
      }
    }
  }
}

void qc_int8_gemm(const float *x, int64_t M, int64_t K, const int8_t *qw, const void *s, int sdtype, int64_t N,
                  float *y, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t *row = qw + n * K;
    const float sn = scalar_at(s, n, sdtype);
    for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
      const int rows = (int)(M - m0 < ROWS ? M - m0 : ROWS);
      float t[ROWS] = {0};
      int64_t k = 0;
#ifdef __AVX2__
      __m256 acc[ROWS];
      for (int r = 0; r < rows; ++r) acc[r] = _mm256_setzero_ps();
      for (; k + 8 <= K; k += 8) {
        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k))));
        for (int r = 0; r < rows; ++r) acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (m0 + r) * K + k), acc[r]);
      }
      for (int r = 0; r < rows; ++r) t[r] = hsum(acc[r]);
#endif
      for (int r = 0; r < rows; ++r) {
        for (int64_t kk = k; kk < K; ++kk) t[r] += (float)row[kk] * x[(m0 + r) * K + kk];
        y[(m0 + r) * N + n] = sn * t[r];
      }
    }
  }
}

void qc_int8_dequant(const int8_t *qw, const void *s, int sdtype, int64_t K, int64_t n0, int64_t n1, float *out,
                     int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = n0; n < n1; ++n) {
    const float sn = scalar_at(s, n, sdtype);
    for (int64_t k = 0; k < K; ++k) out[(n - n0) * K + k] = sn * (float)qw[n * K + k];
  }
}
