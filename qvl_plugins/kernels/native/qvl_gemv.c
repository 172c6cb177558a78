/* Weight-only quantised GEMV for decode (a few rows of activations against a large int8 / int4 weight).
 *
 * Built at first use by qvl_plugins/kernels/native_gemv.py with the C compiler for the vector ISA the run may use
 * (-mavx512f -mavx512bw, or -mavx2 -mfma, or plain C), OpenMP bound to the libgomp torch already loaded, and
 * called through ctypes. Kernels:
 *   int8 weights [N, K] x fp32 activations: fp32 accumulation of the exact weight (qvl_int8_gemv);
 *   int8 weights (row-major or in tiles of 4 rows) x int8 activations per block of 64 (qvl_int8_gemv_a8*);
 *   the same int8 x int8 product for prefill-sized inputs, a GEMM over panels of 32 rows (qvl_int8_gemm_a8_*,
 *   AVX512-VNNI builds);
 *   int4 weights in tiles of 16 rows x int8 activations per block of 32 (qvl_int4_tiles_gemv*), and the same
 *   product for prefill-sized inputs as a GEMM over the tiles (qvl_int4_tiles_gemm_many, AVX512-VNNI builds);
 *   the decode step's RMSNorm, rotary and attention, the prefill's bf16 attention (vision tower and decoder,
 *   AVX512-BF16), the vision tower's tanh GELU, the int8 KV cache's quantisation and read-back.
 * Activations and results may be bf16 (converted here, round to nearest even) or fp32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define ROWS 4      /* weight rows computed together: independent accumulators hide the FMA latency */

#if defined(__AVX2__)
static inline float hsum256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* f rounded to the nearest bf16 value, back in fp32 */
static inline float to_bf16_value(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* n values (bf16 or fp32) -> fp32 */
static inline void to_f32(const void *p, int bf16, int64_t n, float *out) {
    if (bf16) { const uint16_t *b = (const uint16_t *)p; for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(b[i]); }
    else memcpy(out, p, (size_t)n * 4);
}

/* x [M, K] (bf16 or fp32) -> fp32 copy. */
static float *activations_f32(const void *x, int x_bf16, int64_t M, int64_t K) {
    float *xf = (float *)aligned_alloc(64, (size_t)((M * K * 4 + 63) / 64 * 64));
    if (xf) to_f32(x, x_bf16, M * K, xf);
    return xf;
}

/* n values of p (bf16 or fp32) from element i on -> fp32 */
static inline void to_f32_at(const void *p, int bf16, int64_t i, int64_t n, float *out) {
    to_f32(bf16 ? (const void *)((const uint16_t *)p + i) : (const void *)((const float *)p + i), bf16, n, out);
}

static inline int32_t load_i32(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* The decode GEMVs stream weights once; asking for the cache line PREFETCH_AHEAD bytes ahead of each one read keeps
 * more memory reads in flight than the hardware prefetchers do when both cores stream (2B decode shapes, 2 threads,
 * AVX-512 EPYC VM, medians of 6-9 alternated runs: int8 tiles 47 -> 50 GB/s, int4 tiles 42 -> 46 GB/s; 1024 bytes
 * ahead gained nothing, 8192 no more than 4096; one thread: no change). */
#define PREFETCH_AHEAD 4096
static inline void prefetch_ahead(const void *p) { __builtin_prefetch((const char *)p + PREFETCH_AHEAD, 0, 3); }

static inline void store(void *y, int y_bf16, int64_t i, float v) {
    if (y_bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline void vstore(float *p, vf a) { _mm512_storeu_ps(p, a); }
/* LANES values at element i of p (bf16 or fp32) as fp32 */
static inline vf load_as_f32(const void *p, int bf16, int64_t i) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
/* 16 fp32 values -> bf16, round to nearest even; NaN stays NaN (as f32_to_bf16) */
static inline __m256i bf16_round16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}
/* the `valid` lanes of 16 fp32 values at element `at` of y (bf16, rounded as bf16_round16, or fp32) */
static inline void store16(void *y, int y_bf16, int64_t at, __m512 v, __mmask16 valid) {
    if (y_bf16) {
        _mm256_mask_storeu_epi16((uint16_t *)y + at, valid, bf16_round16(v));
    } else {
        _mm512_mask_storeu_ps((float *)y + at, valid, v);
    }
}
/* LANES int8 -> fp32 */
static inline vf i8_to_vf(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
/* fp32 -> the nearest bf16 value (as f32_to_bf16), back in fp32 */
static inline vf vround_bf16(vf v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_round16(v)), 16));
}
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vround_nearest(vf a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* p · 2^n, n whole */
static inline vf vscale_pow2(vf p, vf n) { return _mm512_scalef_ps(p, n); }
/* x >= bound ? v : 0, lane by lane */
static inline vf vkeep_at_least(vf x, vf bound, vf v) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, bound, _CMP_GE_OQ), v);
}
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
/* x >= 0 ? a : b, lane by lane */
static inline vf vselect_nonnegative(vf x, vf a, vf b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
}
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
/* |a| with b's sign */
static inline vf vcopysign(vf a, vf b) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_andnot_si512(sign, _mm512_castps_si512(a)),
                                               _mm512_and_si512(sign, _mm512_castps_si512(b))));
}
/* LANES fp32 values into element at of y (bf16, rounded as bf16_round16, or fp32) */
static inline void vstore_as(void *y, int y_bf16, int64_t at, vf v) { store16(y, y_bf16, at, v, (__mmask16)0xffff); }
#elif defined(__AVX2__)
#define LANES 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline float vsum(vf a) { return hsum256(a); }
static inline void vstore(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf load_as_f32(const void *p, int bf16, int64_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vf i8_to_vf(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
/* 8 fp32 values -> their bf16 bits in the low half of each 32-bit lane, round to nearest even; NaN stays NaN (as
 * f32_to_bf16) */
static inline __m256i bf16_round8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
}
/* fp32 -> the nearest bf16 value (as f32_to_bf16), back in fp32 */
static inline vf vround_bf16(vf v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_round8(v), 16)); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vround_nearest(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p · 2^n, n whole and at least -126 (built in the exponent bits) */
static inline vf vscale_pow2(vf p, vf n) {
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}
static inline vf vkeep_at_least(vf x, vf bound, vf v) {
    return _mm256_and_ps(_mm256_cmp_ps(x, bound, _CMP_GE_OQ), v);
}
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vselect_nonnegative(vf x, vf a, vf b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
}
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vcopysign(vf a, vf b) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(sign, a), _mm256_and_ps(sign, b));
}
static inline void vstore_as(void *y, int y_bf16, int64_t at, vf v) {
    if (!y_bf16) { _mm256_storeu_ps((float *)y + at, v); return; }
    __m256i r = bf16_round8(v);
    _mm_storeu_si128((__m128i *)((uint16_t *)y + at),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#else
#define LANES 1
typedef float vf;
static inline vf vzero(void) { return 0.0f; }
static inline vf vload(const float *p) { return *p; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vset1(float a) { return a; }
static inline float vsum(vf a) { return a; }
static inline void vstore(float *p, vf a) { *p = a; }
static inline vf i8_to_vf(const int8_t *p) { return (float)*p; }
static inline vf vround_bf16(vf v) { return to_bf16_value(v); }
#endif

#if LANES > 1
/* e^x for x <= 0 (Cephes' expf polynomial on x - n ln2, then a scale by 2^n; below -87 it is 0): ~1 ulp */
static inline vf vexp_nonpositive(vf x) {
    const vf lowest = vset1(-87.0f);
    const vf xc = vmax(x, lowest);
    const vf n = vround_nearest(vmul(xc, vset1(1.44269504088896341f)));
    vf r = vfma(n, vset1(-0.693359375f), xc);
    r = vfma(n, vset1(2.12194440e-4f), r);
    vf p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return vkeep_at_least(x, lowest, vscale_pow2(p, n));
}
#endif

const char *qvl_gemv_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "scalar";
#endif
}

/* The vector width in fp32 lanes: int8 needs K % LANES == 0, int4 needs group % (2 * LANES) == 0. */
int qvl_gemv_lanes(void) { return LANES; }

int qvl_int8_gemv(const int8_t *w, const float *scale, const void *x, int x_bf16, void *y, int y_bf16,
                  int64_t M, int64_t N, int64_t K, int threads) {
    if (K % LANES) return 1;
    float *xf = activations_f32(x, x_bf16, M, K);
    if (!xf) return 2;
    int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * ROWS;
        if (n0 + ROWS <= N) {
            const int8_t *w0 = w + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
            for (int64_t m = 0; m < M; m++) {
                const float *xm = xf + m * K;
                vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
                for (int64_t k = 0; k < K; k += LANES) {
                    vf xv = vload(xm + k);
                    a0 = vfma(i8_to_vf(w0 + k), xv, a0);
                    a1 = vfma(i8_to_vf(w1 + k), xv, a1);
                    a2 = vfma(i8_to_vf(w2 + k), xv, a2);
                    a3 = vfma(i8_to_vf(w3 + k), xv, a3);
                }
                store(y, y_bf16, m * N + n0, vsum(a0) * scale[n0]);
                store(y, y_bf16, m * N + n0 + 1, vsum(a1) * scale[n0 + 1]);
                store(y, y_bf16, m * N + n0 + 2, vsum(a2) * scale[n0 + 2]);
                store(y, y_bf16, m * N + n0 + 3, vsum(a3) * scale[n0 + 3]);
            }
        } else {
            for (int64_t n = n0; n < N; n++) {
                for (int64_t m = 0; m < M; m++) {
                    vf a = vzero();
                    for (int64_t k = 0; k < K; k += LANES) a = vfma(i8_to_vf(w + n * K + k), vload(xf + m * K + k), a);
                    store(y, y_bf16, m * N + n, vsum(a) * scale[n]);
                }
            }
        }
    }
    free(xf);
    return 0;
}

/* ---- int8 weights x int8 activations (llama.cpp Q8_0 style) ------------------------------------------------
 * Activations are quantised per block of ABLOCK columns (symmetric, scale = max|x| / 127, round to nearest):
 *   y[m, n] = scale[n] * sum_b sx[m, b] * sum_{k in b} w[n, k] * xq[m, k]
 * Integer dot products: AVX512-VNNI vpdpbusd (weights made unsigned by +128, the offset removed once per row of
 * activations), or AVX2 vpmaddubsw with the sign moved onto the weights, or plain C. Weights must lie in
 * [-127, 127] (the project's int8 quantiser's range). */
#define ABLOCK 64

/* Activation rows are quantised in parallel from this many rows on (prefill, the vision tower: done serially, the
 * quantisation took ~15 % of an AVX2-emulated prefill); fewer (decode) stay on the calling thread. */
#define PARALLEL_QUANT_ROWS 8

/* The activation quantisers' two steps over one block of n values (n a multiple of 32): the largest |x| (NaN ignored)
 * and the codes q = round half away from zero of x * inv, clamped to [-127, 127], with their sum. The AVX2 versions
 * (also in the AVX-512 builds) give the same bits as the scalar ones. */
#if defined(__AVX2__)
static inline float block_amax(const float *xb, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8) a = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb + k)), a);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
static inline int32_t block_codes(const float *xb, int64_t n, float inv, int8_t *q) {
    const __m256 vinv = _mm256_set1_ps(inv), half = _mm256_set1_ps(0.5f), sign = _mm256_set1_ps(-0.0f);
    const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);       /* undoes the packs' lane interleave */
    __m256i total = _mm256_setzero_si256();
    for (int64_t j = 0; j < n; j += 32) {
        __m256i c[4];
        for (int u = 0; u < 4; u++) {
            __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb + j + 8 * u), vinv);
            /* |t| + 0.5 truncated, with t's sign: the scalar t < 0 ? t - 0.5 : t + 0.5 */
            __m256 r = _mm256_or_ps(_mm256_add_ps(_mm256_andnot_ps(sign, t), half), _mm256_and_ps(t, sign));
            c[u] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvttps_epi32(r), hi), lo);
            total = _mm256_add_epi32(total, c[u]);
        }
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
        _mm256_storeu_si256((__m256i *)(q + j), _mm256_permutevar8x32_epi32(b, order));
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1))));
}
#else
static inline float block_amax(const float *xb, int64_t n) {
    float amax = 0.0f;
    for (int64_t k = 0; k < n; k++) { float a = xb[k] < 0 ? -xb[k] : xb[k]; if (a > amax) amax = a; }
    return amax;
}
static inline int32_t block_codes(const float *xb, int64_t n, float inv, int8_t *q) {
    int32_t sum = 0;
    for (int64_t k = 0; k < n; k++) {
        float v = xb[k] * inv;
        int32_t c = (int32_t)(v < 0 ? v - 0.5f : v + 0.5f);      /* round half away from zero */
        c = c > 127 ? 127 : (c < -127 ? -127 : c);
        q[k] = (int8_t)c;
        sum += c;
    }
    return sum;
}
#endif

/* Row m of x [M, K] (bf16 or fp32) -> xq [M, K] int8, sx [M, K / ABLOCK] fp32 and
 * offset[m] = 128 * sum_b sx[m, b] * sum_{k in b} xq */
static void quantize_activation_row(const void *x, int x_bf16, int64_t m, int64_t K, int8_t *xq, float *sx,
                                    float *offset) {
    const int64_t blocks = K / ABLOCK;
    float off = 0.0f, xb[ABLOCK];
    for (int64_t b = 0; b < blocks; b++) {
        to_f32_at(x, x_bf16, m * K + b * ABLOCK, ABLOCK, xb);
        float amax = block_amax(xb, ABLOCK);
        float s = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = block_codes(xb, ABLOCK, inv, xq + m * K + b * ABLOCK);
        sx[m * blocks + b] = s;
        off += 128.0f * s * (float)sum;
    }
    offset[m] = off;
}

/* Every row of x [M, K], in parallel from PARALLEL_QUANT_ROWS rows on (a row's result does not depend on which
 * thread makes it). */
static void quantize_activations(const void *x, int x_bf16, int64_t M, int64_t K, int8_t *xq, float *sx,
                                 float *offset, int threads) {
    if (M < PARALLEL_QUANT_ROWS) {
        for (int64_t m = 0; m < M; m++) quantize_activation_row(x, x_bf16, m, K, xq, sx, offset);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; m++) quantize_activation_row(x, x_bf16, m, K, xq, sx, offset);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define A8_ISA "avx512_vnni"
/* sum over lanes of sum_b sx[b] * dot_b(w + 128, xq): one row, one activation row */
static inline __m512 a8_block(const int8_t *w, const int8_t *xq, __m512 acc, float s) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i wu = _mm512_xor_si512(_mm512_loadu_si512((const void *)w), flip);
    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512((const void *)xq));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s), acc);
}
#define A8_ZERO _mm512_setzero_ps()
#define A8_SUM(a) _mm512_reduce_add_ps(a)
#define A8_OFFSET 1
typedef __m512 af;
#elif defined(__AVX2__)
#define A8_ISA "avx2"
static inline __m256 a8_half(const int8_t *w, const int8_t *xq) {
    __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x),
                                     _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), x));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
static inline __m256 a8_block(const int8_t *w, const int8_t *xq, __m256 acc, float s) {
    return _mm256_fmadd_ps(_mm256_add_ps(a8_half(w, xq), a8_half(w + 32, xq + 32)), _mm256_set1_ps(s), acc);
}
#define A8_ZERO _mm256_setzero_ps()
#define A8_SUM(a) hsum256(a)
#define A8_OFFSET 0
typedef __m256 af;
#else
#define A8_ISA "scalar"
static inline float a8_block(const int8_t *w, const int8_t *xq, float acc, float s) {
    int32_t d = 0;
    for (int k = 0; k < ABLOCK; k++) d += (int32_t)w[k] * (int32_t)xq[k];
    return acc + s * (float)d;
}
#define A8_ZERO 0.0f
#define A8_SUM(a) (a)
#define A8_OFFSET 0
typedef float af;
#endif

const char *qvl_a8_isa(void) { return A8_ISA; }
int qvl_a8_block(void) { return ABLOCK; }

/* Weight rows n0 .. n0+3 of an int8 matrix, row r's block b of ABLOCK bytes at w + n0 * K + r * rs + b * bs:
 * row-major (rs = K, bs = ABLOCK) or in tiles of TILE_ROWS rows (rs = ABLOCK, bs = TILE_ROWS * ABLOCK; see
 * qvl_int8_tile). Both keep every group of TILE_ROWS rows within its own TILE_ROWS * K bytes. */
#define TILE_ROWS 4
_Static_assert(TILE_ROWS == ROWS, "a tile is the kernel's block of rows in flight");

/* Rows n0 .. n0 + rows - 1 (rows <= ROWS) of one int8 matrix against M quantised activation rows. */
static inline void a8_row_block(const int8_t *w, int64_t rs, int64_t bs, const float *scale, const int8_t *xq,
                                const float *sx, const float *offset, void *y, int y_bf16, int64_t M, int64_t N,
                                int64_t K, int64_t n0, int64_t rows) {
    const int64_t blocks = K / ABLOCK;
    const int8_t *base = w + n0 * K;
    for (int64_t m = 0; m < M; m++) {
        const int8_t *xm = xq + m * K;
        const float *sm = sx + m * blocks;
        float off = A8_OFFSET ? offset[m] : 0.0f;
        if (rows == ROWS) {
            const int8_t *w0 = base, *w1 = base + rs, *w2 = base + 2 * rs, *w3 = base + 3 * rs;
            af a0 = A8_ZERO, a1 = A8_ZERO, a2 = A8_ZERO, a3 = A8_ZERO;
            for (int64_t b = 0; b < blocks; b++) {
                int64_t k = b * ABLOCK, o = b * bs;
                prefetch_ahead(w0 + o); prefetch_ahead(w1 + o); prefetch_ahead(w2 + o); prefetch_ahead(w3 + o);
                a0 = a8_block(w0 + o, xm + k, a0, sm[b]);
                a1 = a8_block(w1 + o, xm + k, a1, sm[b]);
                a2 = a8_block(w2 + o, xm + k, a2, sm[b]);
                a3 = a8_block(w3 + o, xm + k, a3, sm[b]);
            }
            store(y, y_bf16, m * N + n0, (A8_SUM(a0) - off) * scale[n0]);
            store(y, y_bf16, m * N + n0 + 1, (A8_SUM(a1) - off) * scale[n0 + 1]);
            store(y, y_bf16, m * N + n0 + 2, (A8_SUM(a2) - off) * scale[n0 + 2]);
            store(y, y_bf16, m * N + n0 + 3, (A8_SUM(a3) - off) * scale[n0 + 3]);
        } else {
            for (int64_t r = 0; r < rows; r++) {
                af a = A8_ZERO;
                for (int64_t b = 0; b < blocks; b++) a = a8_block(base + r * rs + b * bs, xm + b * ABLOCK, a, sm[b]);
                store(y, y_bf16, m * N + n0 + r, (A8_SUM(a) - off) * scale[n0 + r]);
            }
        }
    }
}

/* Several int8 matrices w[i] [N[i], K] (one layout: rs, bs) against the same activations x [M, K], quantised
 * once; their row blocks shared out among the threads as one range; results into y[i] [M, N[i]]. */
static int int8_gemv_a8_many(int count, const int8_t *const *w, int64_t rs, int64_t bs, const float *const *scale,
                             const int64_t *N, void *const *y, const void *x, int x_bf16, int y_bf16, int64_t M,
                             int64_t K, int threads) {
    if (K % ABLOCK || count < 1 || count > 8) return 1;
    int64_t first[9];                                   /* first row block of each matrix in the shared range */
    first[0] = 0;
    for (int i = 0; i < count; i++) first[i + 1] = first[i] + (N[i] + ROWS - 1) / ROWS;
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    float *sx = (float *)malloc((size_t)(M * (K / ABLOCK) * 4));
    float *offset = (float *)malloc((size_t)(M * 4));
    if (!xq || !sx || !offset) { free(xq); free(sx); free(offset); return 2; }
    quantize_activations(x, x_bf16, M, K, xq, sx, offset, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t rb = 0; rb < first[count]; rb++) {
        int i = 0;
        while (rb >= first[i + 1]) i++;
        int64_t n0 = (rb - first[i]) * ROWS, rows = N[i] - n0 < ROWS ? N[i] - n0 : ROWS;
        a8_row_block(w[i], rs, bs, scale[i], xq, sx, offset, y[i], y_bf16, M, N[i], K, n0, rows);
    }
    free(xq); free(sx); free(offset);
    return 0;
}

static int int8_gemv_a8(const int8_t *w, int64_t rs, int64_t bs, const float *scale, const void *x, int x_bf16,
                        void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    return int8_gemv_a8_many(1, &w, rs, bs, &scale, &N, &y, x, x_bf16, y_bf16, M, K, threads);
}

/* Several TILED matrices of the same input (q/k/v, gate/up): one activation quantisation, one parallel range. */
int qvl_int8_gemv_a8_tiled_many(int count, const int8_t *const *w, const float *const *scale, const int64_t *N,
                                void *const *y, const void *x, int x_bf16, int y_bf16, int64_t M, int64_t K,
                                int threads) {
    for (int i = 0; i < count; i++) if (N[i] % TILE_ROWS) return 1;
    return int8_gemv_a8_many(count, w, ABLOCK, TILE_ROWS * ABLOCK, scale, N, y, x, x_bf16, y_bf16, M, K, threads);
}

/* w [N, K] row-major */
int qvl_int8_gemv_a8(const int8_t *w, const float *scale, const void *x, int x_bf16, void *y, int y_bf16,
                     int64_t M, int64_t N, int64_t K, int threads) {
    return int8_gemv_a8(w, K, ABLOCK, scale, x, x_bf16, y, y_bf16, M, N, K, threads);
}

/* w in tiles (qvl_int8_tile): one sequential stream per thread instead of four interleaved rows, measured ~15 %
 * more of the RAM bandwidth on the 2B decode shapes (2 threads, AVX-512 EPYC: 38 -> 44 GB/s). N % 4 == 0. */
int qvl_int8_gemv_a8_tiled(const int8_t *w, const float *scale, const void *x, int x_bf16, void *y, int y_bf16,
                           int64_t M, int64_t N, int64_t K, int threads) {
    if (N % TILE_ROWS) return 1;
    return int8_gemv_a8(w, ABLOCK, TILE_ROWS * ABLOCK, scale, x, x_bf16, y, y_bf16, M, N, K, threads);
}

/* The tiled layout in place: each group of TILE_ROWS rows [4][K] becomes [K / ABLOCK][4][ABLOCK]. */
int qvl_int8_tile(int8_t *w, int64_t N, int64_t K, int threads) {
    if (N % TILE_ROWS || K % ABLOCK) return 1;
    const int64_t groups = N / TILE_ROWS, span = TILE_ROWS * K;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int8_t *tmp = (int8_t *)malloc((size_t)span);
        if (!tmp) failed = 1;
        else {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; g++) {
                int8_t *p = w + g * span;
                for (int64_t r = 0; r < TILE_ROWS; r++)
                    for (int64_t b = 0; b < K / ABLOCK; b++)
                        memcpy(tmp + b * TILE_ROWS * ABLOCK + r * ABLOCK, p + r * K + b * ABLOCK, ABLOCK);
                memcpy(p, tmp, (size_t)span);
            }
        }
        free(tmp);
    }
    return failed ? 2 : 0;
}

/* Rows [row0, row0 + rows) of a tiled int8 matrix widened exactly into out [rows, K] (bf16 or fp32), row-major;
 * row0 and rows multiples of TILE_ROWS. The prefill path's weight, in one parallel pass. */
int qvl_int8_untile_widen(const int8_t *w, int64_t row0, int64_t rows, int64_t K, void *out, int out_bf16,
                          int threads) {
    if (row0 % TILE_ROWS || rows % TILE_ROWS || K % ABLOCK) return 1;
    const int64_t groups = rows / TILE_ROWS, span = TILE_ROWS * K;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *p = w + (row0 / TILE_ROWS + g) * span;
        for (int64_t b = 0; b < K / ABLOCK; b++)
            for (int64_t r = 0; r < TILE_ROWS; r++) {
                const int8_t *src = p + b * TILE_ROWS * ABLOCK + r * ABLOCK;
                int64_t dst = (g * TILE_ROWS + r) * K + b * ABLOCK;
                if (out_bf16) {
                    uint16_t *o = (uint16_t *)out + dst;
                    for (int64_t k = 0; k < ABLOCK; k++) o[k] = f32_to_bf16((float)src[k]);
                } else {
                    float *o = (float *)out + dst;
                    for (int64_t k = 0; k < ABLOCK; k++) o[k] = (float)src[k];
                }
            }
    }
    return 0;
}

/* ---- int8 x int8 GEMM for prefill (AVX512-VNNI builds only) -----------------------------------------------------
 * The same product as qvl_int8_gemv_a8_tiled (activations quantised per block of ABLOCK columns exactly as there),
 * for many rows: every weight byte is used by all M rows, so it is compute bound and integer dot products
 * (vpdpbusd: 64 multiply-adds an instruction) do the work of four bf16 or eight fp32 FMAs.
 * Each thread copies GEMM_NR = 32 weight rows at a time out of the tiles into a panel [K / 4][32][4] bytes made
 * unsigned (w + 128; one 64-byte load = four columns of 16 rows, lane r = row r), then runs GEMM_MR = 6 activation
 * rows at a time over it: per block b of ABLOCK columns the integer sums start at -128 * (sum of the block's quantised
 * activations), so they end as sum w * xq exactly, and are added in fp32 times the block's scale sx[m, b]. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define GEMM_MR 6
#define GEMM_NR 32
#define GEMM_GROUP_BYTES (384 * 1024)     /* packed panels a thread keeps (in L2) while the activations pass */

int qvl_int8_gemm_available(void) { return 1; }

/* x [M, K] -> per block of `block` (32 or 64) columns: xq [Mpad, K] int8 (rows past M zero), sx and qsum
 * [Mpad, K / block], and where xs is given the block's exact sum of x: the decode GEMVs' quantisation
 * (quantize_activations, quantize_blocks32) vectorised; xq, sx and qsum bit-equal to theirs (xs summed in another
 * order). */
static void quantize_rows_vec(const void *x, int x_bf16, int64_t M, int64_t Mpad, int64_t K, int64_t block,
                              int8_t *xq, float *sx, int32_t *qsum, float *xs, int threads) {
    const int64_t blocks = K / block;
    const int nv = (int)(block / 16);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < Mpad; m++) {
        for (int64_t b = 0; b < blocks; b++) {
            int8_t *q = xq + m * K + b * block;
            if (m >= M) {
                memset(q, 0, (size_t)block);
                sx[m * blocks + b] = 0.0f;
                qsum[m * blocks + b] = 0;
                if (xs) xs[m * blocks + b] = 0.0f;
                continue;
            }
            __m512 v[4], a = _mm512_setzero_ps(), total_x = _mm512_setzero_ps();
            for (int j = 0; j < nv; j++) {
                v[j] = load_as_f32(x, x_bf16, m * K + b * block + 16 * j);
                a = _mm512_max_ps(a, _mm512_abs_ps(v[j]));
                total_x = _mm512_add_ps(total_x, v[j]);
            }
            float amax = _mm512_reduce_max_ps(a);
            float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            const __m512 vinv = _mm512_set1_ps(inv), half = _mm512_set1_ps(0.5f);
            const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
            __m512i total = _mm512_setzero_si512();
            for (int j = 0; j < nv; j++) {
                __m512 t = _mm512_mul_ps(v[j], vinv);
                /* round half away from zero: |t| + 0.5 truncated, with t's sign */
                __m512 r = _mm512_add_ps(_mm512_abs_ps(t), half);
                __m512i iv = _mm512_cvttps_epi32(_mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_castps_si512(r), _mm512_and_si512(_mm512_castps_si512(t), sign))));
                iv = _mm512_max_epi32(_mm512_min_epi32(iv, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                total = _mm512_add_epi32(total, iv);
                _mm_storeu_si128((__m128i *)(q + 16 * j), _mm512_cvtepi32_epi8(iv));
            }
            sx[m * blocks + b] = amax / 127.0f;
            qsum[m * blocks + b] = _mm512_reduce_add_epi32(total);
            if (xs) xs[m * blocks + b] = _mm512_reduce_add_ps(total_x);
        }
    }
}

/* Rows n0 .. n0 + 31 of a tiled int8 matrix [N, K] -> panel [K / 4][32][4] bytes, w + 128 (rows past N: 128). */
static void gemm_panel(const int8_t *w, int64_t N, int64_t K, int64_t n0, uint32_t *panel) {
    const int64_t steps = K / 4;
    for (int64_t t = 0; t < GEMM_NR / TILE_ROWS; t++) {
        int64_t row = n0 + t * TILE_ROWS;
        if (row >= N) {
            for (int64_t s = 0; s < steps; s++)
                for (int r = 0; r < TILE_ROWS; r++) panel[s * GEMM_NR + t * TILE_ROWS + r] = 0x80808080u;
            continue;
        }
        const int8_t *tile = w + row * K;                   /* [K / ABLOCK][TILE_ROWS][ABLOCK] */
        for (int64_t b = 0; b < K / ABLOCK; b++)
            for (int r = 0; r < TILE_ROWS; r++) {
                const int8_t *src = tile + (b * TILE_ROWS + r) * ABLOCK;
                uint32_t *dst = panel + b * (ABLOCK / 4) * GEMM_NR + t * TILE_ROWS + r;
                for (int j = 0; j < ABLOCK / 4; j++) dst[j * GEMM_NR] = (uint32_t)load_i32(src + 4 * j) ^ 0x80808080u;
            }
    }
}

/* GEMM_MR activation rows m0.. against one panel (rows n0 .. n0 + 31 of a matrix with N rows, scales wscale[N]):
 * y[m, n] for the rows m < M and n < N. The 12 integer sums stay in registers (named, so the compiler keeps them
 * there); the fp32 sums live in L1 and are updated once per block. */
#define GEMM_INIT(i) __m512i c##i##0 = _mm512_set1_epi32(-128 * qsum[(m0 + i) * blocks + b]), c##i##1 = c##i##0;
#define GEMM_DOT(i) {                                                                                           \
        __m512i a = _mm512_broadcastd_epi32(_mm_loadu_si32(xb + i * K + 4 * j));                                \
        c##i##0 = _mm512_dpbusd_epi32(c##i##0, w0, a);                                                          \
        c##i##1 = _mm512_dpbusd_epi32(c##i##1, w1, a); }
#define GEMM_ADD(i) {                                                                                           \
        __m512 s = _mm512_set1_ps(sx[(m0 + i) * blocks + b]);                                                   \
        acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##i##0), s, acc[i][0]);                                 \
        acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##i##1), s, acc[i][1]); }
static void gemm_block(const uint32_t *panel, const int8_t *xq, const float *sx, const int32_t *qsum, int64_t K,
                       int64_t m0, int64_t M, const float *wscale, int64_t N, int64_t n0, void *y, int y_bf16) {
    _Static_assert(GEMM_MR == 6 && GEMM_NR == 32, "the macros below spell out 6 rows x 2 vectors");
    const int64_t blocks = K / ABLOCK;
    __m512 acc[GEMM_MR][2];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        GEMM_INIT(0) GEMM_INIT(1) GEMM_INIT(2) GEMM_INIT(3) GEMM_INIT(4) GEMM_INIT(5)
        const uint32_t *pb = panel + b * (ABLOCK / 4) * GEMM_NR;
        const int8_t *xb = xq + m0 * K + b * ABLOCK;
#pragma GCC unroll 16
        for (int j = 0; j < ABLOCK / 4; j++) {
            __m512i w0 = _mm512_load_si512((const void *)(pb + j * GEMM_NR));
            __m512i w1 = _mm512_load_si512((const void *)(pb + j * GEMM_NR + 16));
            GEMM_DOT(0) GEMM_DOT(1) GEMM_DOT(2) GEMM_DOT(3) GEMM_DOT(4) GEMM_DOT(5)
        }
        GEMM_ADD(0) GEMM_ADD(1) GEMM_ADD(2) GEMM_ADD(3) GEMM_ADD(4) GEMM_ADD(5)
    }
    for (int h = 0; h < 2; h++) {
        int64_t n = n0 + 16 * h;
        if (n >= N) break;
        __mmask16 valid = N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1u);
        __m512 s = _mm512_maskz_loadu_ps(valid, wscale + n);
        for (int i = 0; i < GEMM_MR && m0 + i < M; i++)
            store16(y, y_bf16, (m0 + i) * N + n, _mm512_mul_ps(acc[i][h], s), valid);
    }
}
#undef GEMM_INIT
#undef GEMM_DOT
#undef GEMM_ADD

/* Several TILED int8 matrices w[i] [N[i], K] (scales [N[i]] fp32) against the same x [M, K] (bf16 or fp32),
 * quantised once; their panels shared out among the threads as one range; results y[i] [M, N[i]]. */
int qvl_int8_gemm_a8_tiled_many(int count, const int8_t *const *w, const float *const *scale, const int64_t *N,
                                void *const *y, const void *x, int x_bf16, int y_bf16, int64_t M, int64_t K,
                                int threads) {
    if (K % ABLOCK || count < 1 || count > 8) return 1;
    /* Panels are packed GEMM_GROUP_BYTES at a time (up to 8), then every 6 activation rows run over all of them:
     * the 6 rows stay in L1 while the packed panels stream from L2, and the activations are read once a group. */
    const int64_t group = K * GEMM_NR * 8 <= GEMM_GROUP_BYTES ? 8
                        : (K * GEMM_NR <= GEMM_GROUP_BYTES ? GEMM_GROUP_BYTES / (K * GEMM_NR) : 1);
    int64_t first[9];                                    /* first panel group of each matrix in the shared range */
    first[0] = 0;
    for (int i = 0; i < count; i++) {
        if (N[i] % TILE_ROWS) return 1;
        first[i + 1] = first[i] + ((N[i] + GEMM_NR - 1) / GEMM_NR + group - 1) / group;
    }
    const int64_t Mpad = (M + GEMM_MR - 1) / GEMM_MR * GEMM_MR, blocks = K / ABLOCK;
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)((Mpad * K + 63) / 64 * 64));
    float *sx = (float *)malloc((size_t)(Mpad * blocks * 4));
    int32_t *qsum = (int32_t *)malloc((size_t)(Mpad * blocks * 4));
    if (!xq || !sx || !qsum) { free(xq); free(sx); free(qsum); return 2; }
    quantize_rows_vec(x, x_bf16, M, Mpad, K, ABLOCK, xq, sx, qsum, NULL, threads);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        uint32_t *panel = (uint32_t *)aligned_alloc(64, (size_t)(group * K * GEMM_NR));
        if (!panel) failed = 1;
        else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t p = 0; p < first[count]; p++) {
                int i = 0;
                while (p >= first[i + 1]) i++;
                const int64_t n0 = (p - first[i]) * group * GEMM_NR;
                int64_t panels = (N[i] - n0 + GEMM_NR - 1) / GEMM_NR;
                if (panels > group) panels = group;
                for (int64_t q = 0; q < panels; q++)
                    gemm_panel(w[i], N[i], K, n0 + q * GEMM_NR, panel + q * (K / 4) * GEMM_NR);
                for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR)
                    for (int64_t q = 0; q < panels; q++)
                        gemm_block(panel + q * (K / 4) * GEMM_NR, xq, sx, qsum, K, m0, M, scale[i], N[i],
                                   n0 + q * GEMM_NR, y[i], y_bf16);
            }
        }
        free(panel);
    }
    free(xq); free(sx); free(qsum);
    return failed ? 2 : 0;
}
#else
int qvl_int8_gemm_available(void) { return 0; }
int qvl_int8_gemm_a8_tiled_many(int count, const int8_t *const *w, const float *const *scale, const int64_t *N,
                                void *const *y, const void *x, int x_bf16, int y_bf16, int64_t M, int64_t K,
                                int threads) {
    (void)count; (void)w; (void)scale; (void)N; (void)y; (void)x; (void)x_bf16; (void)y_bf16; (void)M; (void)K;
    (void)threads;
    return 3;                                            /* no AVX512-VNNI in this build */
}
#endif

/* ---- int4 weights in tiles x int8 activations -------------------------------------------------------------------
 * Weights: group-wise asymmetric int4, w[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n], g = k / group (group a multiple
 * of 32). Stored in tiles of Q4_ROWS = 16 output rows, tile t = rows 16t .. 16t + 15:
 *   codes  [N / 16][K / 8][16][4] bytes: byte (o, r, i) = q[16t + r, 8o + i] | q[16t + r, 8o + 4 + i] << 4
 *   sz     [N / 16][K / group][16][2] bf16: (s, z) of each row of the tile, group by group
 * so a tile's codes and its scales are each one sequential stream, and one 64-byte load holds four input columns of
 * all 16 rows in its low nibbles and the next four in its high nibbles: lane r of an integer dot product is row r.
 * Activations are quantised per block of Q4_BLOCK = 32 columns (symmetric, scale sx = max|x| / 127, round half away
 * from zero); per block b, with qs[b] = sum of its quantised values and xs[b] the exact sum of x over it:
 *   y[m, n] = sum_b s * sx[b] * (sum_{k in b} q[n, k] * xq[k] - 8 * qs[b]) + z * xs[b]
 * (the zero term uses the exact sums, so only the centred part carries the activations' rounding). */
#define Q4_ROWS 16
#define Q4_BLOCK 32

/* Row m of x [M, K] (bf16 or fp32) -> xq [M, K] int8, sx, xs [M, K / 32] fp32, qs [M, K / 32] int32 */
static void quantize_block32_row(const void *x, int x_bf16, int64_t m, int64_t K, int8_t *xq, float *sx, float *xs,
                                 int32_t *qs) {
    const int64_t blocks = K / Q4_BLOCK;
    for (int64_t b = 0; b < blocks; b++) {
        float xb[Q4_BLOCK];
        to_f32_at(x, x_bf16, m * K + b * Q4_BLOCK, Q4_BLOCK, xb);
        float amax = block_amax(xb, Q4_BLOCK), sum = 0.0f;
        for (int k = 0; k < Q4_BLOCK; k++) sum += xb[k];                 /* in index order */
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t qsum = block_codes(xb, Q4_BLOCK, inv, xq + m * K + b * Q4_BLOCK);
        sx[m * blocks + b] = amax / 127.0f;
        xs[m * blocks + b] = sum;
        qs[m * blocks + b] = qsum;
    }
}

/* Every row of x [M, K], in parallel from PARALLEL_QUANT_ROWS rows on. */
static void quantize_blocks32(const void *x, int x_bf16, int64_t M, int64_t K, int8_t *xq, float *sx, float *xs,
                              int32_t *qs, int threads) {
    if (M < PARALLEL_QUANT_ROWS) {
        for (int64_t m = 0; m < M; m++) quantize_block32_row(x, x_bf16, m, K, xq, sx, xs, qs);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; m++) quantize_block32_row(x, x_bf16, m, K, xq, sx, xs, qs);
}


/* One tile (16 rows) against one quantised activation row: the 16 results into out. */
static void q4_tile(const uint8_t *codes, const uint16_t *sz, const int8_t *xq, const float *sx, const float *xs,
                    const int32_t *qs, int64_t K, int64_t group, float *out) {
    const int64_t blocks = K / Q4_BLOCK, per_group = group / Q4_BLOCK;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __m512i low = _mm512_set1_epi8(15), high_half = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *c = codes + b * (Q4_ROWS * Q4_BLOCK / 2);
        const int8_t *x = xq + b * Q4_BLOCK;
        __m512i d[4];
        for (int o = 0; o < 4; o++) {
            prefetch_ahead(c + o * 64);
            __m512i v = _mm512_loadu_si512((const void *)(c + o * 64));
            d[o] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, low),
                                       _mm512_set1_epi32(load_i32(x + 8 * o)));
            d[o] = _mm512_dpbusd_epi32(d[o], _mm512_and_si512(_mm512_srli_epi16(v, 4), low),
                                       _mm512_set1_epi32(load_i32(x + 8 * o + 4)));
        }
        __m512i dot = _mm512_add_epi32(_mm512_add_epi32(d[0], d[1]), _mm512_add_epi32(d[2], d[3]));
        dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(8 * qs[b]));
        __m512i p = _mm512_loadu_si512((const void *)(sz + (b / per_group) * 2 * Q4_ROWS));   /* 16 x (s, z) */
        __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
        __m512 z = _mm512_castsi512_ps(_mm512_and_si512(p, high_half));
        acc = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(sx[b])), _mm512_cvtepi32_ps(dot), acc);
        acc = _mm512_fmadd_ps(z, _mm512_set1_ps(xs[b]), acc);
    }
    _mm512_storeu_ps(out, acc);
#elif defined(__AVX2__)
    /* two halves of 8 rows: bytes 0-31 and 32-63 of each 64-byte group of four columns, sharing the broadcast
     * activations. vpmaddubsw of codes (0..15) and activations (-127..127) gives pairs of at most 3810; eight of
     * them still fit int16. */
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const __m256i high_half = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *c = codes + b * (Q4_ROWS * Q4_BLOCK / 2);
        const int8_t *x = xq + b * Q4_BLOCK;
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int o = 0; o < 4; o++) {
            __m256i xa = _mm256_set1_epi32(load_i32(x + 8 * o)), xb = _mm256_set1_epi32(load_i32(x + 8 * o + 4));
            prefetch_ahead(c + o * 64);
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(c + o * 64));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(c + o * 64 + 32));
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_and_si256(v0, low), xa));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(v1, low), xa));
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low), xb));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low), xb));
        }
        const __m256i centre = _mm256_set1_epi32(8 * qs[b]);
        const __m256 scale_x = _mm256_set1_ps(sx[b]), sum_x = _mm256_set1_ps(xs[b]);
        const uint16_t *p = sz + (b / per_group) * 2 * Q4_ROWS;
        __m256i p0 = _mm256_loadu_si256((const __m256i *)p), p1 = _mm256_loadu_si256((const __m256i *)(p + 16));
        __m256i d0 = _mm256_sub_epi32(_mm256_madd_epi16(s0, ones), centre);
        __m256i d1 = _mm256_sub_epi32(_mm256_madd_epi16(s1, ones), centre);
        acc0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p0, 16)), scale_x),
                               _mm256_cvtepi32_ps(d0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p1, 16)), scale_x),
                               _mm256_cvtepi32_ps(d1), acc1);
        acc0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(p0, high_half)), sum_x, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(p1, high_half)), sum_x, acc1);
    }
    _mm256_storeu_ps(out, acc0);
    _mm256_storeu_ps(out + 8, acc1);
#else
    for (int r = 0; r < Q4_ROWS; r++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *c = codes + b * (Q4_ROWS * Q4_BLOCK / 2);
            const int8_t *x = xq + b * Q4_BLOCK;
            int32_t dot = 0;
            for (int o = 0; o < 4; o++)
                for (int i = 0; i < 4; i++) {
                    uint8_t byte = c[o * 64 + r * 4 + i];
                    dot += (byte & 15) * x[8 * o + i] + (byte >> 4) * x[8 * o + 4 + i];
                }
            const uint16_t *p = sz + (b / per_group) * 2 * Q4_ROWS + 2 * r;
            acc += bf16_to_f32(p[0]) * sx[b] * (float)(dot - 8 * qs[b]) + bf16_to_f32(p[1]) * xs[b];
        }
        out[r] = acc;
    }
#endif
}

const char *qvl_int4_tiles_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return "avx512_vnni";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "scalar";
#endif
}

/* Several tiled int4 matrices (codes[i], sz[i], N[i] rows, one group size) against the same x [M, K], quantised
 * once; their tiles shared out among the threads as one range; results y[i] [M, N[i]]. q/k/v and gate/up of a
 * decode step take one call instead of one each (one activation quantisation, one parallel region). */
int qvl_int4_tiles_gemv_many(int count, const uint8_t *const *codes, const uint16_t *const *sz, const int64_t *N,
                             void *const *y, int64_t group, const void *x, int x_bf16, int y_bf16, int64_t M,
                             int64_t K, int threads) {
    if (count < 1 || count > 8 || group % Q4_BLOCK || K % group) return 1;
    int64_t first[9];                                    /* first tile of each matrix in the shared range */
    first[0] = 0;
    for (int i = 0; i < count; i++) {
        if (N[i] % Q4_ROWS) return 1;
        first[i + 1] = first[i] + N[i] / Q4_ROWS;
    }
    const int64_t blocks = K / Q4_BLOCK, groups = K / group;
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    float *sx = (float *)malloc((size_t)(M * blocks * 4)), *xs = (float *)malloc((size_t)(M * blocks * 4));
    int32_t *qs = (int32_t *)malloc((size_t)(M * blocks * 4));
    if (!xq || !sx || !xs || !qs) { free(xq); free(sx); free(xs); free(qs); return 2; }
    quantize_blocks32(x, x_bf16, M, K, xq, sx, xs, qs, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < first[count]; g++) {
        int i = 0;
        while (g >= first[i + 1]) i++;
        const int64_t t = g - first[i];
        const uint8_t *c = codes[i] + t * Q4_ROWS * (K / 2);
        const uint16_t *s = sz[i] + t * groups * 2 * Q4_ROWS;
        float out[Q4_ROWS];
        for (int64_t m = 0; m < M; m++) {
            q4_tile(c, s, xq + m * K, sx + m * blocks, xs + m * blocks, qs + m * blocks, K, group, out);
            for (int r = 0; r < Q4_ROWS; r++) store(y[i], y_bf16, m * N[i] + t * Q4_ROWS + r, out[r]);
        }
    }
    free(xq); free(sx); free(xs); free(qs);
    return 0;
}

/* y [M, N] = x [M, K] · Wᵀ with W in tiles (see above). N % 16 == 0, group % 32 == 0, K % group == 0. */
int qvl_int4_tiles_gemv(const uint8_t *codes, const uint16_t *sz, int64_t group, const void *x, int x_bf16,
                        void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    return qvl_int4_tiles_gemv_many(1, &codes, &sz, &N, &y, group, x, x_bf16, y_bf16, M, K, threads);
}

/* The same int4 x int8 product for prefill-sized inputs, a GEMM straight over the tiles (AVX512-VNNI builds): two
 * tiles (32 rows) and GEMM_MR = 6 activation rows at a time; per block of 32 columns the integer sums start at
 * -8 * qs (the centring), take 8 vpdpbusd of the low and high nibbles, and are added in fp32 as s * sx * sum +
 * z * xs, the GEMV's formula. Tiles are taken a group at a time (GEMM_GROUP_BYTES) while each 6 activation rows
 * pass over them, as in the int8 GEMM. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q4G_INIT(i) __m512i c##i##0 = _mm512_set1_epi32(-8 * qs[(m0 + i) * blocks + b]), c##i##1 = c##i##0;
#define Q4G_DOT(i) {                                                                                            \
        __m512i xl = _mm512_set1_epi32(load_i32(xb + i * K + 8 * o));                                           \
        __m512i xh = _mm512_set1_epi32(load_i32(xb + i * K + 8 * o + 4));                                       \
        c##i##0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##i##0, l0, xl), h0, xh);                            \
        c##i##1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##i##1, l1, xl), h1, xh); }
#define Q4G_ADD(i) {                                                                                            \
        const int64_t at = (m0 + i) * blocks + b;                                                               \
        const __m512 scale_x = _mm512_set1_ps(sx[at]), sum_x = _mm512_set1_ps(xs[at]);                          \
        acc[i][0] = _mm512_fmadd_ps(_mm512_mul_ps(s0, scale_x), _mm512_cvtepi32_ps(c##i##0), acc[i][0]);         \
        acc[i][0] = _mm512_fmadd_ps(z0, sum_x, acc[i][0]);                                                      \
        acc[i][1] = _mm512_fmadd_ps(_mm512_mul_ps(s1, scale_x), _mm512_cvtepi32_ps(c##i##1), acc[i][1]);         \
        acc[i][1] = _mm512_fmadd_ps(z1, sum_x, acc[i][1]); }
/* Tiles t0 and t1 (t1 may repeat t0 when the matrix has an odd number; then its results are not stored). */
static void q4_gemm_block(const uint8_t *codes, const uint16_t *sz, int64_t group, int64_t t0, int64_t t1,
                          int store1, const int8_t *xq, const float *sx, const float *xs, const int32_t *qs,
                          int64_t K, int64_t m0, int64_t M, void *y, int y_bf16, int64_t N) {
    _Static_assert(GEMM_MR == 6, "the macros spell out 6 rows");
    const int64_t blocks = K / Q4_BLOCK, per_group = group / Q4_BLOCK, groups = K / group;
    const uint8_t *cA = codes + t0 * Q4_ROWS * (K / 2), *cB = codes + t1 * Q4_ROWS * (K / 2);
    const uint16_t *sA = sz + t0 * groups * 2 * Q4_ROWS, *sB = sz + t1 * groups * 2 * Q4_ROWS;
    const __m512i low = _mm512_set1_epi8(15), high_half = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[GEMM_MR][2];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        Q4G_INIT(0) Q4G_INIT(1) Q4G_INIT(2) Q4G_INIT(3) Q4G_INIT(4) Q4G_INIT(5)
        const uint8_t *ca = cA + b * (Q4_ROWS * Q4_BLOCK / 2), *cb = cB + b * (Q4_ROWS * Q4_BLOCK / 2);
        const int8_t *xb = xq + m0 * K + b * Q4_BLOCK;
#pragma GCC unroll 4
        for (int o = 0; o < 4; o++) {
            __m512i va = _mm512_loadu_si512((const void *)(ca + o * 64));
            __m512i vb = _mm512_loadu_si512((const void *)(cb + o * 64));
            __m512i l0 = _mm512_and_si512(va, low), h0 = _mm512_and_si512(_mm512_srli_epi16(va, 4), low);
            __m512i l1 = _mm512_and_si512(vb, low), h1 = _mm512_and_si512(_mm512_srli_epi16(vb, 4), low);
            Q4G_DOT(0) Q4G_DOT(1) Q4G_DOT(2) Q4G_DOT(3) Q4G_DOT(4) Q4G_DOT(5)
        }
        __m512i pa = _mm512_loadu_si512((const void *)(sA + (b / per_group) * 2 * Q4_ROWS));   /* 16 x (s, z) */
        __m512i pb = _mm512_loadu_si512((const void *)(sB + (b / per_group) * 2 * Q4_ROWS));
        const __m512 s0 = _mm512_castsi512_ps(_mm512_slli_epi32(pa, 16));
        const __m512 z0 = _mm512_castsi512_ps(_mm512_and_si512(pa, high_half));
        const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(pb, 16));
        const __m512 z1 = _mm512_castsi512_ps(_mm512_and_si512(pb, high_half));
        Q4G_ADD(0) Q4G_ADD(1) Q4G_ADD(2) Q4G_ADD(3) Q4G_ADD(4) Q4G_ADD(5)
    }
    for (int i = 0; i < GEMM_MR && m0 + i < M; i++) {
        store16(y, y_bf16, (m0 + i) * N + t0 * Q4_ROWS, acc[i][0], (__mmask16)0xffff);
        if (store1) store16(y, y_bf16, (m0 + i) * N + t1 * Q4_ROWS, acc[i][1], (__mmask16)0xffff);
    }
}
#undef Q4G_INIT
#undef Q4G_DOT
#undef Q4G_ADD

int qvl_int4_tiles_gemm_available(void) { return 1; }

/* Several tiled int4 matrices (one group size) against the same x [M, K]: quantised once, pairs of tiles shared out
 * among the threads a group at a time; results y[i] [M, N[i]]. */
int qvl_int4_tiles_gemm_many(int count, const uint8_t *const *codes, const uint16_t *const *sz, const int64_t *N,
                             void *const *y, int64_t group, const void *x, int x_bf16, int y_bf16, int64_t M,
                             int64_t K, int threads) {
    if (count < 1 || count > 8 || group % Q4_BLOCK || K % group) return 1;
    const int64_t pair_bytes = 2 * Q4_ROWS * K / 2;
    const int64_t per_item = pair_bytes * 8 <= GEMM_GROUP_BYTES ? 8
                           : (pair_bytes <= GEMM_GROUP_BYTES ? GEMM_GROUP_BYTES / pair_bytes : 1);  /* tile pairs */
    int64_t first[9];                                     /* first work item of each matrix in the shared range */
    first[0] = 0;
    for (int i = 0; i < count; i++) {
        if (N[i] % Q4_ROWS) return 1;
        int64_t pairs = (N[i] / Q4_ROWS + 1) / 2;
        first[i + 1] = first[i] + (pairs + per_item - 1) / per_item;
    }
    const int64_t Mpad = (M + GEMM_MR - 1) / GEMM_MR * GEMM_MR, blocks = K / Q4_BLOCK;
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)((Mpad * K + 63) / 64 * 64));
    float *sx = (float *)malloc((size_t)(Mpad * blocks * 4)), *xs = (float *)malloc((size_t)(Mpad * blocks * 4));
    int32_t *qs = (int32_t *)malloc((size_t)(Mpad * blocks * 4));
    if (!xq || !sx || !xs || !qs) { free(xq); free(sx); free(xs); free(qs); return 2; }
    quantize_rows_vec(x, x_bf16, M, Mpad, K, Q4_BLOCK, xq, sx, qs, xs, threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t item = 0; item < first[count]; item++) {
        int i = 0;
        while (item >= first[i + 1]) i++;
        const int64_t tiles = N[i] / Q4_ROWS, p0 = (item - first[i]) * per_item;
        const int64_t pairs = (tiles + 1) / 2, p1 = p0 + per_item < pairs ? p0 + per_item : pairs;
        for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR)
            for (int64_t p = p0; p < p1; p++) {
                int64_t t0 = 2 * p, t1 = 2 * p + 1 < tiles ? 2 * p + 1 : 2 * p;
                q4_gemm_block(codes[i], sz[i], group, t0, t1, t1 != t0, xq, sx, xs, qs, K, m0, M, y[i], y_bf16, N[i]);
            }
    }
    free(xq); free(sx); free(xs); free(qs);
    return 0;
}
#else
int qvl_int4_tiles_gemm_available(void) { return 0; }
int qvl_int4_tiles_gemm_many(int count, const uint8_t *const *codes, const uint16_t *const *sz, const int64_t *N,
                             void *const *y, int64_t group, const void *x, int x_bf16, int y_bf16, int64_t M,
                             int64_t K, int threads) {
    (void)count; (void)codes; (void)sz; (void)N; (void)y; (void)group; (void)x; (void)x_bf16; (void)y_bf16; (void)M;
    (void)K; (void)threads;
    return 3;                                            /* no AVX512-VNNI in this build */
}
#endif

/* Rows [row0, row0 + rows) of a tiled int4 weight dequantised into out [K, rows] (bf16 or fp32), transposed: column
 * j of out is row row0 + j. w = z + (q - 8) * s in fp32 (the product is exact), rounded once to out's dtype, as the
 * plain layout's dequantisation computes it. In a tile's 64-byte block of four columns, byte 4r + i holds row r's
 * columns i and 4 + i: lane r of the block read as 32-bit words, shifted right by 8i, gives all 16 rows of a column,
 * which are contiguous in the transposed out. Threads split the columns, so each writes whole rows of out.
 * row0 and rows multiples of 16. */
#if defined(__AVX512F__)
static inline void widen_store16(__m512i v, __m512 s, __m512 z, void *out, int out_bf16, int64_t at) {
    __m512 w = _mm512_add_ps(z, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(8))), s));
    store16(out, out_bf16, at, w, (__mmask16)0xffff);
}
#elif defined(__AVX2__)
static inline void widen_store8(__m256i v, __m256 s, __m256 z, void *out, int out_bf16, int64_t at) {
    __m256 w = _mm256_add_ps(z, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(8))), s));
    if (out_bf16) {       /* round to nearest even, as f32_to_bf16 */
        __m256i u = bf16_round8(w);
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08);
        _mm_storeu_si128((__m128i *)((uint16_t *)out + at), _mm256_castsi256_si128(packed));
    } else {
        _mm256_storeu_ps((float *)out + at, w);
    }
}
#endif

int qvl_int4_tiles_widen(const uint8_t *codes, const uint16_t *sz, int64_t group, int64_t row0, int64_t rows,
                         int64_t K, void *out, int out_bf16, int threads) {
    if (row0 % Q4_ROWS || rows % Q4_ROWS || group % Q4_BLOCK || K % group) return 1;
    const int64_t groups = K / group, tiles = rows / Q4_ROWS, first = row0 / Q4_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < K / 8; o++) {
        const int64_t g = o * 8 / group;
        for (int64_t t = 0; t < tiles; t++) {
            const uint8_t *c = codes + (first + t) * Q4_ROWS * (K / 2) + o * 64;
            const uint16_t *p = sz + ((first + t) * groups + g) * 2 * Q4_ROWS;
#if defined(__AVX512F__)
            __m512i pz = _mm512_loadu_si512((const void *)p);
            __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pz, 16));
            __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pz, _mm512_set1_epi32((int)0xFFFF0000u)));
            __m512i v = _mm512_loadu_si512((const void *)c);
            const __m512i nibble = _mm512_set1_epi32(15);
            for (int i = 0; i < 4; i++) {
                __m512i b = _mm512_srli_epi32(v, 8 * i);
                widen_store16(_mm512_and_si512(b, nibble), s, z, out, out_bf16, (o * 8 + i) * rows + t * Q4_ROWS);
                widen_store16(_mm512_and_si512(_mm512_srli_epi32(b, 4), nibble), s, z, out, out_bf16,
                              (o * 8 + 4 + i) * rows + t * Q4_ROWS);
            }
#elif defined(__AVX2__)
            const __m256i nibble = _mm256_set1_epi32(15), high_half = _mm256_set1_epi32((int)0xFFFF0000u);
            for (int h = 0; h < 2; h++) {
                __m256i pz = _mm256_loadu_si256((const __m256i *)(p + 16 * h));
                __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(pz, 16));
                __m256 z = _mm256_castsi256_ps(_mm256_and_si256(pz, high_half));
                __m256i v = _mm256_loadu_si256((const __m256i *)(c + 32 * h));
                for (int i = 0; i < 4; i++) {
                    __m256i b = _mm256_srli_epi32(v, 8 * i);
                    int64_t at = t * Q4_ROWS + 8 * h;
                    widen_store8(_mm256_and_si256(b, nibble), s, z, out, out_bf16, (o * 8 + i) * rows + at);
                    widen_store8(_mm256_and_si256(_mm256_srli_epi32(b, 4), nibble), s, z, out, out_bf16,
                                 (o * 8 + 4 + i) * rows + at);
                }
            }
#else
            for (int r = 0; r < Q4_ROWS; r++) {
                float scale = bf16_to_f32(p[2 * r]), zero = bf16_to_f32(p[2 * r + 1]);
                for (int i = 0; i < 4; i++) {
                    uint8_t byte = c[r * 4 + i];
                    float lo = zero + (float)((int)(byte & 15) - 8) * scale;
                    float hi = zero + (float)((int)(byte >> 4) - 8) * scale;
                    store(out, out_bf16, (o * 8 + i) * rows + t * Q4_ROWS + r, lo);
                    store(out, out_bf16, (o * 8 + 4 + i) * rows + t * Q4_ROWS + r, hi);
                }
            }
#endif
        }
    }
    return 0;
}

/* ---- decode-step elementwise kernels: one call where torch dispatches 7-20 small ops ------------------------
 * Values are bf16 or fp32 (flag 1 / 0); every bf16 result is rounded to nearest even exactly where the reference
 * rounds (torch computes a bf16 op in fp32 and rounds its result). Built with -ffp-contract=off: no fused
 * multiply-add changes a product's rounding. */

/* n fp32 -> bf16 (round to nearest even; values here are never NaN unless the input was) or fp32 */
static inline void from_f32(const float *v, int bf16, int64_t n, void *p) {
    if (bf16) { uint16_t *b = (uint16_t *)p; for (int64_t i = 0; i < n; i++) b[i] = f32_to_bf16(v[i]); }
    else memcpy(p, v, (size_t)n * 4);
}

/* v rounded to bf16 and back, in place (the reference's intermediate rounding) */
static inline void round_bf16(float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) v[i] = to_bf16_value(v[i]);
}

#define ELEM_MAX 8192        /* longest row the elementwise kernels take (stack buffers) */

/* RMSNorm over the last dim, as qvl_pipeline/model/norms.py: xn = x * (1 / sqrt(sum(x²) / size + eps)) in fp32,
 * rounded to x's dtype, then y = w * xn rounded to y's dtype. The sum runs in a different order than torch's
 * reduction (NEAR, not bit-equal). x [rows, size] contiguous. */
int qvl_rms_norm(const void *x, int x_bf16, const void *w, int w_bf16, void *y, int y_bf16, int64_t rows,
                 int64_t size, float eps) {
    if (size > ELEM_MAX) return 1;
    float xf[ELEM_MAX], wf[ELEM_MAX];
    to_f32(w, w_bf16, size, wf);
    for (int64_t r = 0; r < rows; r++) {
        to_f32((const char *)x + r * size * (x_bf16 ? 2 : 4), x_bf16, size, xf);
        float acc[16] = {0};
        int64_t k = 0;
        for (; k + 16 <= size; k += 16)
            for (int j = 0; j < 16; j++) acc[j] += xf[k + j] * xf[k + j];
        float sum = 0.0f;
        for (; k < size; k++) sum += xf[k] * xf[k];
        for (int j = 0; j < 16; j++) sum += acc[j];
        float inv = 1.0f / sqrtf(sum / (float)size + eps);
        for (k = 0; k < size; k++) xf[k] *= inv;
        if (x_bf16) round_bf16(xf, size);
        for (k = 0; k < size; k++) xf[k] *= wf[k];
        from_f32(xf, y_bf16, size, (char *)y + r * size * (y_bf16 ? 2 : 4));
    }
    return 0;
}

/* Rotary on q and k in one call, bit-equal to the reference (rotary/cached.py's apply):
 *   out = x * cos + rotate_half(x) * sin,  rotate_half(x) = (-x[d/2:], x[:d/2])
 * upcast: x widened to fp32 with fp32 tables, the products and the sum in fp32, the result rounded once to x's
 * dtype (the vision tower's); else in x's dtype, each product and the sum rounded to it (the tables in that dtype;
 * the decoder's). Token t of `tokens`, head h: x at q + t * q_tok + h * q_head (k likewise), table row t of cos,
 * sin [tokens, d]; results into qo [tokens, hq, d] and ko [tokens, hk, d], contiguous. */
static void rope_row(const void *x, int bf16, int upcast, const float *c, const float *sn, int64_t d, void *o) {
    const int64_t half = d / 2;
    float v[ELEM_MAX], a[ELEM_MAX], r[ELEM_MAX];
    to_f32(x, bf16, d, v);
    for (int64_t j = 0; j < d; j++) a[j] = v[j] * c[j];
    for (int64_t j = 0; j < half; j++) r[j] = -v[j + half] * sn[j];
    for (int64_t j = half; j < d; j++) r[j] = v[j - half] * sn[j];
    if (bf16 && !upcast) { round_bf16(a, d); round_bf16(r, d); }
    for (int64_t j = 0; j < d; j++) a[j] += r[j];
    from_f32(a, bf16, d, o);
}

int qvl_rope_rows(const void *q, const void *k, const void *cos, const void *sin, void *qo, void *ko, int bf16,
                  int upcast, int64_t tokens, int64_t hq, int64_t hk, int64_t d, int64_t q_tok, int64_t q_head,
                  int64_t k_tok, int64_t k_head, int threads) {
    if (d % 2 || d > ELEM_MAX) return 1;
    const int64_t esize = bf16 ? 2 : 4, tsize = bf16 && !upcast ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tokens > 1)
    for (int64_t t = 0; t < tokens; t++) {
        float c[ELEM_MAX], sn[ELEM_MAX];
        to_f32((const char *)cos + t * d * tsize, tsize == 2, d, c);
        to_f32((const char *)sin + t * d * tsize, tsize == 2, d, sn);
        for (int64_t h = 0; h < hq; h++)
            rope_row((const char *)q + (t * q_tok + h * q_head) * esize, bf16, upcast, c, sn, d,
                     (char *)qo + (t * hq + h) * d * esize);
        for (int64_t h = 0; h < hk; h++)
            rope_row((const char *)k + (t * k_tok + h * k_head) * esize, bf16, upcast, c, sn, d,
                     (char *)ko + (t * hk + h) * d * esize);
    }
    return 0;
}

/* The decode step's rotary (qvl_decode_layers): q [b, s, hq, d], k [b, s, hk, d] contiguous, cos/sin [b, s, d]
 * contiguous, all in one dtype, each product and the sum rounded to it. */
int qvl_rope(const void *q, const void *k, const void *cos, const void *sin, void *qo, void *ko, int bf16,
             int64_t b, int64_t s, int64_t hq, int64_t hk, int64_t d) {
    return qvl_rope_rows(q, k, cos, sin, qo, ko, bf16, 0, b * s, hq, hk, d, hq * d, d, hk * d, d, 1);
}

/* ---- GELU, tanh approximation, in place (the vision tower's MLP activation) ---------------------------------------
 * x <- 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x³), in fp32 in torch's order of operations
 * (gelu(approximate="tanh")), rounded once to x's dtype. tanh(|u|) = (1 - e) / (1 + e), e = e^(-2|u|) from the
 * Cephes polynomial (~1 ulp; the tail and the scalar build take libm's tanhf), so a result can differ from torch's
 * (Sleef's tanh) in the last fp32 bits: by one bf16 unit where that rounds across a tie, and by ~1e-7 |x| where
 * 1 + tanh(u) cancels (u < -4). x contiguous, n elements, bf16 or fp32. */
#define GELU_CHUNK 4096       /* elements per parallel work item */

static inline float gelu_tanh_1(float x) {
    const float inner = 0.7978845608028654f * (x + 0.044715f * (x * x * x));
    return 0.5f * x * (1.0f + tanhf(inner));
}

int qvl_gelu_tanh(void *x, int bf16, int64_t n, int threads) {
    if (n < 0) return 1;
    const int64_t chunks = (n + GELU_CHUNK - 1) / GELU_CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t lo = c * GELU_CHUNK, hi = lo + GELU_CHUNK < n ? lo + GELU_CHUNK : n;
        int64_t i = lo;
#if LANES > 1
        const vf one = vset1(1.0f), half = vset1(0.5f), beta = vset1(0.7978845608028654f);
        const vf kappa = vset1(0.044715f), minus_two = vset1(-2.0f);
        for (; i + LANES <= hi; i += LANES) {
            const vf v = load_as_f32(x, bf16, i);
            const vf inner = vmul(beta, vadd(v, vmul(kappa, vmul(vmul(v, v), v))));
            const vf e = vexp_nonpositive(vmul(minus_two, vcopysign(inner, one)));
            const vf t = vcopysign(vdiv(vsub(one, e), vadd(one, e)), inner);
            vstore_as(x, bf16, i, vmul(vmul(half, v), vadd(one, t)));
        }
#endif
        for (; i < hi; i++) {
            if (bf16) ((uint16_t *)x)[i] = f32_to_bf16(gelu_tanh_1(bf16_to_f32(((uint16_t *)x)[i])));
            else ((float *)x)[i] = gelu_tanh_1(((float *)x)[i]);
        }
    }
    return 0;
}

/* ---- decode attention: one query position against the cache -----------------------------------------------------
 * out[b, h] = softmax(scale * q[b, h] · k[b, h / groups, j]ᵀ over j < n) · v[b, h / groups]; fp32 scores, softmax
 * and accumulation, the result rounded once to its dtype (bf16 or fp32, as q, k, v). A query head sees every key:
 * the decoded position is the last one. k and v are addressed by strides (elements) per batch, kv head and
 * position (a view of a preallocated cache), their last dimension contiguous. q and out are [b, h, d]
 * contiguous. The scores are formed per query head in a buffer of n floats (per thread). */
static inline float dot_f32(const float *a, const void *p, int bf16, int64_t d) {
    float s = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
    vf acc = vzero();
    for (; i + LANES <= d; i += LANES) acc = vfma(vload(a + i), load_as_f32(p, bf16, i), acc);
    s = vsum(acc);
#endif
    for (; i < d; i++) s += a[i] * (bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i]);
    return s;
}

/* acc[0..d) += w * row */
static inline void axpy_f32(float *acc, float w, const void *p, int bf16, int64_t d) {
    int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
    vf wv = vset1(w);
    for (; i + LANES <= d; i += LANES) vstore(acc + i, vfma(load_as_f32(p, bf16, i), wv, vload(acc + i)));
#endif
    for (; i < d; i++) acc[i] += w * (bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i]);
}

/* Row j of a kv head's keys or values as decode_attention reads it: the cache's own row (bf16 or fp32), or an int8
 * row widened as qvl_int8_rows_widen does ((float)q * scale, rounded to bf16 when the activations are) into buf,
 * which dot_f32 / axpy_f32 then read as fp32: the same values in the same order, so the same bits. */
static inline __attribute__((always_inline)) const void *kv_row(const char *base, int64_t stride, const float *scale,
                                                                int64_t scale_stride, int int8, int bf16, int64_t j,
                                                                int64_t d, float *buf, int *row_bf16) {
    if (!int8) {
        *row_bf16 = bf16;
        return base + j * stride * (bf16 ? 2 : 4);
    }
    const int8_t *src = (const int8_t *)base + j * stride;
    const float s = scale[j * scale_stride];
    const vf sv = vset1(s);
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES) {
        const vf x = vmul(i8_to_vf(src + i), sv);
        vstore(buf + i, bf16 ? vround_bf16(x) : x);
    }
    for (; i < d; i++) buf[i] = bf16 ? to_bf16_value((float)src[i] * s) : (float)src[i] * s;
    *row_bf16 = 0;
    return buf;
}

/* The body of both decode attentions; int8: k and v are int8 rows with an fp32 scale each (ks, vs, strides
 * ks_strides / vs_strides in floats), else rows in the activations' dtype. */
static inline __attribute__((always_inline)) int decode_attention_body(
        const void *q, const void *k, const void *v, const float *ks, const float *vs, int int8, void *out, int bf16,
        int64_t B, int64_t H, int64_t KVH, int64_t n, int64_t d, const int64_t *k_strides, const int64_t *v_strides,
        const int64_t *ks_strides, const int64_t *vs_strides, float scale, int threads) {
    if (KVH <= 0 || H % KVH || n <= 0 || d > ELEM_MAX) return 1;
    const int64_t groups = H / KVH, esize = bf16 ? 2 : 4, kv_esize = int8 ? 1 : esize;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* per kv head: the scores of its `groups` query heads [groups][n], their fp32 queries and sums [groups][d],
         * one widened int8 row [d] */
        float *scores = (float *)malloc((size_t)(n * groups) * 4);
        float *qf = (float *)malloc((size_t)(d * groups) * 4), *acc = (float *)malloc((size_t)(d * groups) * 4);
        float *row = (float *)malloc((size_t)d * 4);
        if (!scores || !qf || !acc || !row) failed = 1;
        else {
#pragma omp for schedule(static)
            for (int64_t bk = 0; bk < B * KVH; bk++) {             /* each key and value is read once per kv head */
                const int64_t b = bk / KVH, kvh = bk % KVH, h0 = b * H + kvh * groups;
                const char *kb = (const char *)k + (b * k_strides[0] + kvh * k_strides[1]) * kv_esize;
                const char *vb = (const char *)v + (b * v_strides[0] + kvh * v_strides[1]) * kv_esize;
                const float *ksb = int8 ? ks + b * ks_strides[0] + kvh * ks_strides[1] : NULL;
                const float *vsb = int8 ? vs + b * vs_strides[0] + kvh * vs_strides[1] : NULL;
                to_f32((const char *)q + h0 * d * esize, bf16, groups * d, qf);
                for (int64_t j = 0; j < n; j++) {
                    int row_bf16;
                    const void *kj = kv_row(kb, k_strides[2], ksb, int8 ? ks_strides[2] : 0, int8, bf16, j, d, row,
                                            &row_bf16);
                    for (int64_t g = 0; g < groups; g++)
                        scores[g * n + j] = scale * dot_f32(qf + g * d, kj, row_bf16, d);
                }
                for (int64_t g = 0; g < groups; g++) {
                    float *sg = scores + g * n, top = -INFINITY, total = 0.0f;
                    for (int64_t j = 0; j < n; j++) if (sg[j] > top) top = sg[j];
                    for (int64_t j = 0; j < n; j++) { sg[j] = expf(sg[j] - top); total += sg[j]; }
                    const float inv = 1.0f / total;
                    for (int64_t j = 0; j < n; j++) sg[j] *= inv;
                }
                memset(acc, 0, (size_t)(groups * d) * 4);
                for (int64_t j = 0; j < n; j++) {
                    int row_bf16;
                    const void *vj = kv_row(vb, v_strides[2], vsb, int8 ? vs_strides[2] : 0, int8, bf16, j, d, row,
                                            &row_bf16);
                    for (int64_t g = 0; g < groups; g++) axpy_f32(acc + g * d, scores[g * n + j], vj, row_bf16, d);
                }
                from_f32(acc, bf16, groups * d, (char *)out + h0 * d * esize);
            }
        }
        free(scores); free(qf); free(acc); free(row);
    }
    return failed ? 2 : 0;
}

int qvl_decode_attention(const void *q, const void *k, const void *v, void *out, int bf16, int64_t B, int64_t H,
                         int64_t KVH, int64_t n, int64_t d, const int64_t *k_strides, const int64_t *v_strides,
                         float scale, int threads) {
    return decode_attention_body(q, k, v, NULL, NULL, 0, out, bf16, B, H, KVH, n, d, k_strides, v_strides, NULL,
                                 NULL, scale, threads);
}

/* The same attention over an int8 KV cache (kv_cache=int8: rows k, v int8 [B, KVH, n, d] with fp32 scales ks, vs
 * [B, KVH, n, 1]; strides in elements), bit-equal to widening the rows (qvl_int8_rows_widen) and calling
 * qvl_decode_attention, without writing the widened cache out and reading it back. */
int qvl_decode_attention_int8(const void *q, const int8_t *k, const float *ks, const int8_t *v, const float *vs,
                              void *out, int bf16, int64_t B, int64_t H, int64_t KVH, int64_t n, int64_t d,
                              const int64_t *k_strides, const int64_t *ks_strides, const int64_t *v_strides,
                              const int64_t *vs_strides, float scale, int threads) {
    return decode_attention_body(q, k, v, ks, vs, 1, out, bf16, B, H, KVH, n, d, k_strides, v_strides, ks_strides,
                                 vs_strides, scale, threads);
}

/* ---- int8 KV cache append: x [C, n, d] (bf16 or fp32, contiguous) quantised per row as kv_cache/int8.py's
 * quantize_rows computes it (scale = max(max|x| / 127, FLT_MIN), q = x / scale rounded half to even, clamped to
 * +-127), bit-equal, into q[c * q_stride + j * d + i] and scale[c * s_stride + j] (the cache's slots). One C loop
 * replaces torch's six ops a tensor (~0.8 ms a 2B decode step). */
int qvl_int8_rows_quantize(const void *x, int x_bf16, int8_t *q, float *scale, int64_t C, int64_t n, int64_t d,
                           int64_t q_stride, int64_t s_stride) {
    if (d > ELEM_MAX || d <= 0) return 1;
    float row[ELEM_MAX];
    for (int64_t c = 0; c < C; c++)
        for (int64_t j = 0; j < n; j++) {
            to_f32((const char *)x + (c * n + j) * d * (x_bf16 ? 2 : 4), x_bf16, d, row);
            float amax = 0.0f;
            for (int64_t i = 0; i < d; i++) { float a = fabsf(row[i]); if (a > amax) amax = a; }
            float s = amax / 127.0f;
            if (s < FLT_MIN) s = FLT_MIN;
            int8_t *dst = q + c * q_stride + j * d;
            for (int64_t i = 0; i < d; i++) {
                float v = nearbyintf(row[i] / s);
                dst[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
            }
            scale[c * s_stride + j] = s;
        }
    return 0;
}

/* ---- int8 KV cache read-back -------------------------------------------------------------------------------------
 * out[c, j, :] = q[c * q_stride + j * d + i] * scale[c * s_stride + j] for blocks c < C (batch x kv heads) and
 * positions j < n: the int8 value times its row's fp32 scale, rounded to fp32 and then to out's dtype (bf16 or
 * fp32), as torch computes (q * scale).to(dtype). out [C, n, d] contiguous. */
int qvl_int8_rows_widen(const int8_t *q, const float *scale, void *out, int out_bf16, int64_t C, int64_t n,
                        int64_t d, int64_t q_stride, int64_t s_stride, int threads) {
    if (d > ELEM_MAX) return 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t cj = 0; cj < C * n; cj++) {
        const int64_t c = cj / n, j = cj % n;
        const int8_t *src = q + c * q_stride + j * d;
        const float s = scale[c * s_stride + j];
        float row[ELEM_MAX];
        for (int64_t i = 0; i < d; i++) row[i] = (float)src[i] * s;
        from_f32(row, out_bf16, d, (char *)out + cj * d * (out_bf16 ? 2 : 4));
    }
    return 0;
}

/* ---- int4 group quantiser (load time) ----------------------------------------------------------------------------
 * w [rows, K] fp32 -> per group of `group` consecutive columns a bf16 (scale, zero) and centred codes u in -8..7 with
 * w ~ u * scale + zero, as quantize.py's fit_int4_groups computes them: the min-max start, then `rounds` least-squares
 * refits of (scale, zero) to the codes, each kept where it lowers the group's squared error, the codes rounded again
 * (half to even) after each. The same formulas in the same order; only the sums over a group (16 lane partials,
 * then pairwise) may add in another order than torch's, so a refit can round to the neighbouring bf16 in rare
 * groups. group a multiple of 16, at most 256. Outputs:
 * centred [rows, K] int8, scale and zero [rows, K / group] bf16 bits. */
#define Q4_FIT_MAX 256
#define Q4_FIT_LANES 16      /* partial sums per group (group % 16 == 0) */

static void q4_round_codes(const float *g, int64_t n, float sc, float z, float *u) {
    for (int64_t i = 0; i < n; i++) {
        float v = nearbyintf((g[i] - z) / sc);
        u[i] = v > 7.0f ? 7.0f : (v < -8.0f ? -8.0f : v);
    }
}

static inline float q4_excess(float s, float z, float n, float su, float suu, float suw, float sw) {
    return s * (s * suu + 2.0f * z * su - 2.0f * suw) + z * (n * z - 2.0f * sw);
}

/* the sum of 16 lane partials, pairwise in a fixed order */
static inline float q4_lanes_sum(const float *a) {
    float b[8];
    for (int l = 0; l < 8; l++) b[l] = a[l] + a[l + 8];
    return ((b[0] + b[4]) + (b[2] + b[6])) + ((b[1] + b[5]) + (b[3] + b[7]));
}

int qvl_int4_fit_groups(const float *w, int64_t rows, int64_t K, int64_t group, int rounds, int8_t *centred,
                        uint16_t *scale, uint16_t *zero, int threads) {
    if (group <= 0 || group > Q4_FIT_MAX || group % Q4_FIT_LANES || K % group) return 1;
    const int64_t groups = rows * (K / group);
    const float n = (float)group;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t at = 0; at < groups; at++) {
        const float *g = w + at * group;
        float u[Q4_FIT_MAX], lo[Q4_FIT_LANES], hi[Q4_FIT_LANES], a0[Q4_FIT_LANES], a1[Q4_FIT_LANES], a2[Q4_FIT_LANES];
        for (int l = 0; l < Q4_FIT_LANES; l++) { lo[l] = hi[l] = g[l]; a0[l] = 0.0f; }
        for (int64_t i = 0; i < group; i += Q4_FIT_LANES)           /* lane partials: the compiler vectorises these */
            for (int l = 0; l < Q4_FIT_LANES; l++) {
                const float v = g[i + l];
                lo[l] = v < lo[l] ? v : lo[l];
                hi[l] = v > hi[l] ? v : hi[l];
                a0[l] += v;
            }
        float mn = lo[0], mx = hi[0];
        for (int l = 1; l < Q4_FIT_LANES; l++) { mn = lo[l] < mn ? lo[l] : mn; mx = hi[l] > mx ? hi[l] : mx; }
        const float sw = q4_lanes_sum(a0);
        float sc = (mx - mn) / 15.0f;
        if (sc < FLT_MIN) sc = FLT_MIN;
        float z = to_bf16_value(mn + 8.0f * sc);
        sc = to_bf16_value(sc);
        q4_round_codes(g, group, sc, z, u);
        for (int r = 0; r < rounds; r++) {
            for (int l = 0; l < Q4_FIT_LANES; l++) a0[l] = a1[l] = a2[l] = 0.0f;
            for (int64_t i = 0; i < group; i += Q4_FIT_LANES)
                for (int l = 0; l < Q4_FIT_LANES; l++) {
                    const float c = u[i + l];
                    a0[l] += c;
                    a1[l] += c * c;
                    a2[l] += c * g[i + l];
                }
            const float su = q4_lanes_sum(a0), suu = q4_lanes_sum(a1), suw = q4_lanes_sum(a2);
            const float det = n * suu - su * su;
            float fit_sc = det > 0.0f ? (n * suw - su * sw) / (det > FLT_MIN ? det : FLT_MIN) : sc;
            if (fit_sc < FLT_MIN) fit_sc = FLT_MIN;
            const float fit_z = to_bf16_value((sw - fit_sc * su) / n);
            fit_sc = to_bf16_value(fit_sc);
            if (q4_excess(fit_sc, fit_z, n, su, suu, suw, sw) < q4_excess(sc, z, n, su, suu, suw, sw)) {
                sc = fit_sc;
                z = fit_z;
            }
            q4_round_codes(g, group, sc, z, u);
        }
        for (int64_t i = 0; i < group; i++) centred[at * group + i] = (int8_t)u[i];
        scale[at] = f32_to_bf16(sc);
        zero[at] = f32_to_bf16(z);
    }
    return 0;
}

/* ---- prefill attention (AVX512-BF16): many query positions over one segment of keys, bf16 -------------------------
 * The vision tower's attention (every patch of an image sees every other) and the decoder's causal prefill (grouped
 * kv heads). torch's CPU flash kernel spends most of its time outside its GEMMs (~20 ms a 2B vision layer, 784
 * patches; ~3.3 ms a 2B decoder layer's 223-token causal prefill); here, per head, the keys are packed as
 * [L / 32][D / 2][32][2] (one 64-byte load = one pair of dimensions of 16 keys, lane = key) and the values as
 * [L / 2][Dp][2] (lane = dimension, a pair of keys), and PA_MR = 6 queries at a time take:
 *   scores = q · kᵀ with vdpbf16ps (fp32 sums of the bf16 products), scaled, in fp32;
 *   p = exp(score - row max) in fp32, rounded to bf16 (torch's flash kernel rounds p to bf16 as well);
 *   out = (p · v with vdpbf16ps) / sum of the fp32 p, rounded once to bf16.
 * The softmax is exact over the whole row (no online rescaling): a row of scores lives in L1/L2. Compiled only
 * with the AVX512F/BW builds, for CPUs with AVX512-BF16 (the caller checks the run's ISA). D even, at most 256. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__GNUC__) && !defined(__clang__)
#define PA_MR 6
#define PA_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

int qvl_prefill_attention_available(void) { return 1; }

static inline uint32_t load_u32(const uint16_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* scores S[i][0 .. sp) = q_i · k_j (row stride Lp) for PA_MR query rows (pointers) against keys packed
 * [Lp / 32][D / 2][32] pairs; sp a multiple of 32, at most Lp */
PA_BF16 static void pa_scores(const uint16_t *const *qrow, const uint32_t *kp, int64_t D, int64_t sp, int64_t Lp,
                              float *S) {
#define PA_INIT(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
#define PA_DOT(i) {                                                                                             \
        __m512bh a = (__m512bh)_mm512_set1_epi32((int)load_u32(qrow[i] + 2 * dp));                             \
        c##i##0 = _mm512_dpbf16_ps(c##i##0, a, k0);                                                             \
        c##i##1 = _mm512_dpbf16_ps(c##i##1, a, k1); }
#define PA_STORE(i) {                                                                                           \
        _mm512_storeu_ps(S + i * Lp + jb * 32, c##i##0);                                                        \
        _mm512_storeu_ps(S + i * Lp + jb * 32 + 16, c##i##1); }
    for (int64_t jb = 0; jb < sp / 32; jb++) {
        PA_INIT(0) PA_INIT(1) PA_INIT(2) PA_INIT(3) PA_INIT(4) PA_INIT(5)
        const uint32_t *kb = kp + jb * (D / 2) * 32;
        for (int64_t dp = 0; dp < D / 2; dp++) {
            __m512bh k0 = (__m512bh)_mm512_loadu_si512((const void *)(kb + dp * 32));
            __m512bh k1 = (__m512bh)_mm512_loadu_si512((const void *)(kb + dp * 32 + 16));
            PA_DOT(0) PA_DOT(1) PA_DOT(2) PA_DOT(3) PA_DOT(4) PA_DOT(5)
        }
        PA_STORE(0) PA_STORE(1) PA_STORE(2) PA_STORE(3) PA_STORE(4) PA_STORE(5)
    }
#undef PA_INIT
#undef PA_DOT
#undef PA_STORE
}

/* acc[i][0 .. nv * 16) = sum over key pairs of P[i] (bf16 pairs) · values packed [Lh][Dp][2], dims d0 ..; nv is a
 * constant in each caller (4, or 2 for the last 32 dimensions), so each gets its own unrolled body. */
PA_BF16 static inline __attribute__((always_inline)) void pa_values_n(const uint16_t *P, int64_t Lp,
                                                                     const uint16_t *vp, int64_t Lh, int64_t Dp,
                                                                     int64_t d0, const int nv, float *acc) {
    __m512 a[PA_MR][4];
    for (int i = 0; i < PA_MR; i++) for (int q = 0; q < nv; q++) a[i][q] = _mm512_setzero_ps();
    for (int64_t jp = 0; jp < Lh; jp++) {
        const uint16_t *vr = vp + (jp * Dp + d0) * 2;
        __m512bh v[4];
        for (int q = 0; q < nv; q++) v[q] = (__m512bh)_mm512_loadu_si512((const void *)(vr + 32 * q));
#pragma GCC unroll 6
        for (int i = 0; i < PA_MR; i++) {
            __m512bh p = (__m512bh)_mm512_set1_epi32((int)load_u32(P + i * Lp + 2 * jp));
            for (int q = 0; q < nv; q++) a[i][q] = _mm512_dpbf16_ps(a[i][q], p, v[q]);
        }
    }
    for (int i = 0; i < PA_MR; i++) for (int q = 0; q < nv; q++) _mm512_storeu_ps(acc + i * 64 + q * 16, a[i][q]);
}

PA_BF16 static void pa_values(const uint16_t *P, int64_t Lp, const uint16_t *vp, int64_t Lh, int64_t Dp, int64_t d0,
                              int nv, float *acc) {
    if (nv == 4) pa_values_n(P, Lp, vp, Lh, Dp, d0, 4, acc);
    else pa_values_n(P, Lp, vp, Lh, Dp, d0, 2, acc);
}

/* q: bf16, element (query t, head h, dim d) at q + t * q_tok + h * q_head + d, t < L; k, v likewise over Lk keys and
 * KVH heads (q head h reads kv head h / (H / KVH)); out [L, H, D] bf16. causal: query t is position t + Lk - L and
 * sees keys j <= t + Lk - L (the decoder's prefill after Lk - L cached positions); else every key (the vision
 * tower's). Key blocks past what a block of PA_MR queries can see are neither computed nor summed. */
int qvl_prefill_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t L,
                          int64_t Lk, int64_t H, int64_t KVH, int64_t D, int64_t q_tok, int64_t q_head, int64_t k_tok,
                          int64_t k_head, int64_t v_tok, int64_t v_head, float scale, int causal, int threads) {
    if (L <= 0 || Lk < L || H <= 0 || KVH <= 0 || H % KVH || D <= 0 || D % 2 || D > 256) return 1;
    const int64_t Lp = (Lk + 31) / 32 * 32, Lh = (Lk + 1) / 2, Dp = (D + 31) / 32 * 32, groups = H / KVH;
    const int64_t offset = causal ? Lk - L : 0;
    const int64_t kstride = Lp * D / 2, vstride = Lh * Dp * 2;        /* per kv head: uint32 pairs, uint16 values */
    uint32_t *kp = (uint32_t *)aligned_alloc(64, (size_t)(KVH * kstride * 4));
    uint16_t *vp = (uint16_t *)aligned_alloc(64, (size_t)((KVH * vstride * 2 + 63) / 64 * 64));
    if (!kp || !vp) { free(kp); free(vp); return 2; }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t h = 0; h < KVH; h++) {
        uint32_t *kh = kp + h * kstride;
        for (int64_t jb = 0; jb < Lp / 32; jb++)
            for (int64_t dp = 0; dp < D / 2; dp++)
                for (int64_t l = 0; l < 32; l++) {
                    int64_t j = jb * 32 + l;
                    kh[(jb * (D / 2) + dp) * 32 + l] = j < Lk ? load_u32(k + j * k_tok + h * k_head + 2 * dp) : 0u;
                }
        uint16_t *vh = vp + h * vstride;
        for (int64_t jp = 0; jp < Lh; jp++)
            for (int64_t d = 0; d < Dp; d++)
                for (int64_t e = 0; e < 2; e++) {
                    int64_t j = 2 * jp + e;
                    vh[(jp * Dp + d) * 2 + e] = j < Lk && d < D ? v[j * v_tok + h * v_head + d] : 0;
                }
    }
    const int64_t blocks = (L + PA_MR - 1) / PA_MR;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *S = (float *)aligned_alloc(64, (size_t)(PA_MR * Lp * 4));
        uint16_t *P = (uint16_t *)aligned_alloc(64, (size_t)((PA_MR * Lp * 2 + 63) / 64 * 64));
        float *acc = (float *)aligned_alloc(64, (size_t)(PA_MR * 64 * 4));
        if (!S || !P || !acc) failed = 1;
        else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < H * blocks; item++) {
                const int64_t h = item / blocks, m0 = (item % blocks) * PA_MR, kvh = h / groups;
                const int64_t last = (m0 + PA_MR < L ? m0 + PA_MR : L) - 1;       /* the block's last query row */
                const int64_t seen = causal ? last + offset + 1 : Lk;            /* keys any of its rows sees */
                const int64_t sp = (seen + 31) / 32 * 32;                        /* ... in whole key blocks */
                const uint16_t *qrow[PA_MR];
                int64_t keys[PA_MR];                                             /* keys row i sees */
                for (int i = 0; i < PA_MR; i++) {
                    int64_t t = m0 + i < L ? m0 + i : L - 1;           /* rows past L repeat the last; not stored */
                    qrow[i] = q + t * q_tok + h * q_head;
                    keys[i] = causal ? t + offset + 1 : Lk;
                }
                pa_scores(qrow, kp + kvh * kstride, D, sp, Lp, S);
                float total[PA_MR];
                for (int i = 0; i < PA_MR; i++) {
                    float *s = S + i * Lp;
                    const int64_t n = keys[i];
                    const __m512 sc = _mm512_set1_ps(scale);
                    __m512 top = _mm512_set1_ps(-INFINITY);
                    int64_t j = 0;
                    for (; j + 16 <= n; j += 16) top = _mm512_max_ps(top, _mm512_mul_ps(_mm512_loadu_ps(s + j), sc));
                    const __mmask16 tail = (__mmask16)((1u << (n % 16)) - 1u);
                    if (j < n) top = _mm512_mask_max_ps(top, tail, top, _mm512_mul_ps(_mm512_loadu_ps(s + j), sc));
                    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(top));
                    __m512 sum = _mm512_setzero_ps();
                    uint16_t *p = P + i * Lp;
                    for (j = 0; j < sp; j += 16) {
                        __m512 e = vexp_nonpositive(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j), sc), mx));
                        if (j + 16 > n) e = _mm512_maskz_mov_ps(j < n ? tail : 0, e);   /* keys it does not see: 0 */
                        sum = _mm512_add_ps(sum, e);
                        _mm256_storeu_si256((__m256i *)(p + j), bf16_round16(e));
                    }
                    total[i] = _mm512_reduce_add_ps(sum);
                }
                const int64_t pairs = (seen + 1) / 2;
                for (int64_t d0 = 0; d0 < Dp; d0 += 64) {
                    const int nv = Dp - d0 >= 64 ? 4 : 2;
                    pa_values(P, Lp, vp + kvh * vstride, pairs, Dp, d0, nv, acc);
                    for (int i = 0; i < PA_MR && m0 + i < L; i++) {
                        const __m512 inv = _mm512_set1_ps(1.0f / total[i]);
                        for (int qq = 0; qq < nv; qq++) {
                            int64_t d = d0 + qq * 16;
                            if (d >= D) break;
                            __mmask16 valid = D - d >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - d)) - 1u);
                            __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + i * 64 + qq * 16), inv);
                            _mm256_mask_storeu_epi16(out + ((m0 + i) * H + h) * D + d, valid, bf16_round16(o));
                        }
                    }
                }
            }
        }
        free(S); free(P); free(acc);
    }
    free(kp); free(vp);
    return failed ? 2 : 0;
}
#else
int qvl_prefill_attention_available(void) { return 0; }
int qvl_prefill_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t L,
                          int64_t Lk, int64_t H, int64_t KVH, int64_t D, int64_t q_tok, int64_t q_head, int64_t k_tok,
                          int64_t k_head, int64_t v_tok, int64_t v_head, float scale, int causal, int threads) {
    (void)q; (void)k; (void)v; (void)out; (void)L; (void)Lk; (void)H; (void)KVH; (void)D; (void)q_tok; (void)q_head;
    (void)k_tok; (void)k_head; (void)v_tok; (void)v_head; (void)scale; (void)causal; (void)threads;
    return 3;
}
#endif

/* ---- the decoder stack of one decode step in one call ------------------------------------------------------------
 * For batch 1 and one new token: each layer's pre-norm, q/k/v projections, q/k RMSNorm, rotary, KV append,
 * attention over the cache, output projection and residual, then the post-attention norm, gate/up, SiLU · up, down
 * projection and residual, calling the same kernels the per-op path calls (qvl_rms_norm, the int8 or int4 decode
 * GEMVs, qvl_rope, qvl_int8_rows_quantize, the decode attentions), so those steps give the same bits. The residual
 * adds round as torch's bf16 add does; SiLU is vectorised with the Cephes exp (vexp_nonpositive of -|x|; it may differ
 * from torch's in the last fp32 bits, so the product can round to the neighbouring bf16; 6144 bf16 values: 41 us
 * with libm's expf one by one, 3.6 us AVX-512, 6.7 us AVX2, ~1 ms of serial work a 2B token). All buffers and weights on the CPU; x [hidden] is updated in
 * place. Saves the ~15 Python-level ops a layer (~5-6 ms a 2B token on the 2-core VM). */
typedef struct {
    const void *attn_norm, *mlp_norm, *q_norm, *k_norm;   /* [hidden], [hidden], [head_dim] x 2; activations' dtype */
    const void *w[7];              /* q, k, v, o, gate, up, down: int8 TILED weights or int4 INT4_TILED codes */
    const void *s[7];              /* their fp32 row scales (int8) or tiled bf16 scale_zero (int4) */
    void *k_cache, *v_cache;       /* [kv_heads, max_len, head_dim] rows: the activations' dtype, or int8 */
    float *k_scale, *v_scale;      /* int8 caches: one fp32 scale per row */
} qvl_decode_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, group;
    int64_t position;              /* cached positions before this token: the new row's index */
    int64_t kv_strides[3];         /* elements per batch, kv head and position of the key and value caches */
    int64_t scale_strides[3];      /* floats per batch, kv head and position of the int8 caches' scales */
    float eps, attn_scale;
    int bf16, weights_int4, kv_int8, threads;
} qvl_decode_shape;

/* y = a + b, rounded to the activations' dtype */
static void residual_add(void *a, const void *b, int bf16, int64_t n) {
    if (bf16) {
        uint16_t *x = (uint16_t *)a; const uint16_t *y = (const uint16_t *)b;
        for (int64_t i = 0; i < n; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(y[i]));
    } else {
        float *x = (float *)a; const float *y = (const float *)b;
        for (int64_t i = 0; i < n; i++) x[i] += y[i];
    }
}

/* gate <- silu(gate) * up, each op rounded to the activations' dtype as torch rounds it */
static void silu_mul(void *gate, const void *up, int bf16, int64_t n) {
    int64_t i = 0;
#if LANES > 1
    /* silu(x) = x / (1 + e^-x), as x / (1 + e) for x >= 0 and x e / (1 + e) below, e = e^-|x| (never overflows) */
    const vf one = vset1(1.0f), minus_one = vset1(-1.0f);
    for (; i + LANES <= n; i += LANES) {
        const vf x = load_as_f32(gate, bf16, i);
        const vf e = vexp_nonpositive(vmul(minus_one, vcopysign(x, one)));
        vf s = vdiv(vselect_nonnegative(x, x, vmul(x, e)), vadd(one, e));
        if (bf16) s = vround_bf16(s);
        vstore_as(gate, bf16, i, vmul(s, load_as_f32(up, bf16, i)));
    }
#endif
    if (bf16) {
        uint16_t *g = (uint16_t *)gate; const uint16_t *u = (const uint16_t *)up;
        for (; i < n; i++) {
            const float x = bf16_to_f32(g[i]);
            g[i] = f32_to_bf16(to_bf16_value(x / (1.0f + expf(-x))) * bf16_to_f32(u[i]));
        }
    } else {
        float *g = (float *)gate; const float *u = (const float *)up;
        for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

static int decode_linears(const qvl_decode_shape *c, int count, const void *const *w, const void *const *s,
                          const int64_t *N, void *const *y, const void *x, int64_t K) {
    if (c->weights_int4)
        return qvl_int4_tiles_gemv_many(count, (const uint8_t *const *)w, (const uint16_t *const *)s, N, y, c->group,
                                        x, c->bf16, c->bf16, 1, K, c->threads);
    return qvl_int8_gemv_a8_tiled_many(count, (const int8_t *const *)w, (const float *const *)s, N, y, x, c->bf16,
                                       c->bf16, 1, K, c->threads);
}

int qvl_decode_layers(const qvl_decode_layer *layers, int64_t count, const qvl_decode_shape *c, const void *cos,
                      const void *sin, void *x) {
    const int64_t H = c->hidden, d = c->head_dim, qn = c->heads * d, kn = c->kv_heads * d, I = c->inter;
    const int64_t esize = c->bf16 ? 2 : 4, pos = c->position;
    if (H > ELEM_MAX || d > ELEM_MAX) return 1;
    char *work = (char *)malloc((size_t)((H + 4 * qn + 4 * kn + H + 3 * I) * esize));
    if (!work) return 2;
    char *xn = work, *q = xn + H * esize, *k = q + qn * esize, *v = k + kn * esize, *qr = v + kn * esize;
    char *kr = qr + qn * esize, *qh = kr + kn * esize, *kh = qh + qn * esize, *att = kh + kn * esize;
    char *o = att + qn * esize, *gate = o + H * esize, *up = gate + I * esize, *down = up + I * esize;
    const int64_t n_qkv[3] = {qn, kn, kn}, n_gu[2] = {I, I};
    int rc = 0;
    for (int64_t l = 0; l < count && !rc; l++) {
        const qvl_decode_layer *L = layers + l;
        void *qkv[3] = {q, k, v}, *gu[2] = {gate, up};
        rc = qvl_rms_norm(x, c->bf16, L->attn_norm, c->bf16, xn, c->bf16, 1, H, c->eps);
        if (!rc) rc = decode_linears(c, 3, L->w, L->s, n_qkv, qkv, xn, H);
        if (!rc) rc = qvl_rms_norm(q, c->bf16, L->q_norm, c->bf16, qh, c->bf16, c->heads, d, c->eps);
        if (!rc) rc = qvl_rms_norm(k, c->bf16, L->k_norm, c->bf16, kh, c->bf16, c->kv_heads, d, c->eps);
        if (!rc) rc = qvl_rope(qh, kh, cos, sin, qr, kr, c->bf16, 1, 1, c->heads, c->kv_heads, d);
        if (rc) break;
        if (c->kv_int8) {
            int8_t *kc = (int8_t *)L->k_cache + pos * c->kv_strides[2], *vc = (int8_t *)L->v_cache + pos * c->kv_strides[2];
            rc = qvl_int8_rows_quantize(kr, c->bf16, kc, L->k_scale + pos * c->scale_strides[2], c->kv_heads, 1, d,
                                        c->kv_strides[1], c->scale_strides[1]);
            if (!rc) rc = qvl_int8_rows_quantize(v, c->bf16, vc, L->v_scale + pos * c->scale_strides[2], c->kv_heads,
                                                 1, d, c->kv_strides[1], c->scale_strides[1]);
            if (!rc) rc = qvl_decode_attention_int8(qr, (const int8_t *)L->k_cache, L->k_scale,
                                                    (const int8_t *)L->v_cache, L->v_scale, att, c->bf16, 1, c->heads,
                                                    c->kv_heads, pos + 1, d, c->kv_strides, c->scale_strides,
                                                    c->kv_strides, c->scale_strides, c->attn_scale, c->threads);
        } else {
            for (int64_t h = 0; h < c->kv_heads; h++) {
                const int64_t at = (h * c->kv_strides[1] + pos * c->kv_strides[2]) * esize;
                memcpy((char *)L->k_cache + at, kr + h * d * esize, (size_t)(d * esize));
                memcpy((char *)L->v_cache + at, v + h * d * esize, (size_t)(d * esize));
            }
            rc = qvl_decode_attention(qr, L->k_cache, L->v_cache, att, c->bf16, 1, c->heads, c->kv_heads, pos + 1, d,
                                      c->kv_strides, c->kv_strides, c->attn_scale, c->threads);
        }
        void *oy[1] = {o};
        if (!rc) rc = decode_linears(c, 1, L->w + 3, L->s + 3, &H, oy, att, qn);
        if (rc) break;
        residual_add(x, o, c->bf16, H);
        rc = qvl_rms_norm(x, c->bf16, L->mlp_norm, c->bf16, xn, c->bf16, 1, H, c->eps);
        if (!rc) rc = decode_linears(c, 2, L->w + 4, L->s + 4, n_gu, gu, xn, H);
        if (rc) break;
        silu_mul(gate, up, c->bf16, I);
        void *dy[1] = {down};
        rc = decode_linears(c, 1, L->w + 6, L->s + 6, &H, dy, gate, I);
        if (!rc) residual_add(x, down, c->bf16, H);
    }
    free(work);
    return rc;
}
