#define _POSIX_C_SOURCE 200809L
/* FP8-block (E4M3 bytes + one scale per 128x128 block) -> GGUF F32 / F16 / BF16 / Q8_0 / MXFP4 bytes.
 *
 * Plain C99 + pthreads, no torch headers. Fused: each element is dequantized on the fly,
 *   x = e4m3(byte) * s          (one float32 multiply, s = F32 scale as stored or E8M0 2**(b-127)),
 * exactly the float32 the torch path (checkpoint._decode_fp8_block) produces, then encoded with the
 * float32 operation order of formats/gguf_quants.py (itself checked against gguf-py):
 *   F32   the bits of x;  F16  IEEE round-to-nearest-even (subnormals, >= 65520 -> inf);  BF16 RNE.
 *   Q8_0  per 32-block: amax = max|x|, d = amax / 127, inv = d ? 1 / d : 0, v = x * inv,
 *         q = trunc(v) + trunc(2 * (v - trunc(v)))  (round half away, every step exact), fp16(d), q.
 *   MXFP4 per 32-block: the E8M0 byte e comes from the caller (numpy's float32 log2 on the block
 *         maxima, v4c_fp8_amax32), d = 2**(e-128); e >= 2: k = min(ceil(|x| * (2 / d)), 32) -> code
 *         table (as comparisons, see mxfp4_block); e < 2: argmin_i |d * kvalue_i - x| (first index on ties). Byte 0 = e, then byte j =
 *         code[j] | code[j + 16] << 4.
 * Since x = e4m3(b) * s and float32 rounding is monotonic and sign-symmetric, max|x| over a block is
 * |e4m3(m) * s| for m its largest magnitude byte: no per-element max is needed.
 * Per (128-row block, 128-column block) the 256 products (and their F16 / BF16 encodings) are tabled.
 * Non-finite values (NaN bytes 0x7F / 0xFF, NaN/Inf scales, overflowing products) are counted exactly
 * (the return value); the output is then unspecified and the caller refuses it.
 * Build with -ffp-contract=off and without -ffast-math (no FMA, no reciprocal rewrites).
 * Layout: raw uint8 [n, k] row-major, scale [ceil(n/128), ceil(k/128)] (float32 or E8M0 bytes),
 * out: row-major GGUF blocks, [n, k * 4 | 2 | 2] or [n, k / 32 * (34 | 17)] bytes.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define FP8_BLOCK 128
#define QK 32
#define MAX_THREADS 64
/* GGML type ids (ggml.h enum ggml_type) */
#define T_F32 0
#define T_F16 1
#define T_Q8_0 8
#define T_BF16 30
#define T_MXFP4 39

static float e4m3_value(unsigned b) { /* E4M3 byte -> float32 (exact); 0x7F / 0xFF -> the NaN torch gives */
    if ((b & 0x7Fu) == 0x7Fu) {
        uint32_t bits = (b & 0x80u) ? 0xFFF00000u : 0x7FF00000u; /* not quiet-NaN canonical; never encoded */
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    unsigned e = (b >> 3) & 15u, m = b & 7u;
    float v = (e == 0) ? ldexpf((float)m, -9) : ldexpf((float)(8u + m), (int)e - 10);
    return (b & 0x80u) ? -v : v;
}

static float e8m0_value(unsigned b) { /* E8M0 byte -> 2**(b-127), exact incl. b == 0; 0xFF -> NaN */
    if (b == 0xFFu) return NAN;
    uint32_t bits = b ? ((uint32_t)b << 23) : 0x00400000u;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float e8m0_half(unsigned e) { /* ggml_e8m0_to_fp32_half: 2**(e-128), subnormal below e = 2 */
    uint32_t bits = e < 2 ? (0x00200000u << e) : ((uint32_t)(e - 1) << 23);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float32 -> IEEE binary16, round to nearest even (as torch's .to(float16) and numpy's astype). */
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u | (uint16_t)((a >> 13) & 0x3FFu); /* NaN (never encoded) */
    if (a >= 0x477FF000u) return sign | 0x7C00u;  /* >= 65520 (halfway above 65504, odd) -> inf */
    if (a >= 0x38800000u) {                       /* normal half: drop 13 mantissa bits, RNE */
        a += 0xC8000FFFu + ((a >> 13) & 1u);      /* rebias exponent (-112 << 23) and round */
        return sign | (uint16_t)(a >> 13);
    }
    float m = fabsf(f) * 16777216.0f;             /* subnormal half: units of 2**-24, exact scaling */
    return sign | (uint16_t)lrintf(m);            /* RNE (default rounding mode); 1024 == min normal */
}

static uint16_t f32_to_bf16(float f) { /* RNE, as torch's round_to_nearest_even (NaN never encoded) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0u;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline unsigned mag_max32(const uint8_t *x) { /* max of (byte & 0x7F) over 32 bytes */
#ifdef __SSE2__
    __m128i k7 = _mm_set1_epi8(0x7F);
    __m128i m = _mm_max_epu8(_mm_and_si128(_mm_loadu_si128((const __m128i *)x), k7),
                             _mm_and_si128(_mm_loadu_si128((const __m128i *)(x + 16)), k7));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
    return (unsigned)_mm_cvtsi128_si32(m) & 0xFFu;
#else
    unsigned m = 0;
    for (int t = 0; t < QK; t++) {
        unsigned v = x[t] & 0x7Fu;
        m = v > m ? v : m;
    }
    return m;
#endif
}

static int64_t count_bad(const uint8_t *x, int64_t len, const float *tab) {
    int64_t c = 0;
    for (int64_t j = 0; j < len; j++) c += !isfinite(tab[x[j]]);
    return c;
}

/* MXFP4 magnitude code of k = ceil(2|x|/d) is MX_MAG[min(k, 32)] = {0,0,1,1,2,2,3,3,4,4,4,5,5,5,5,6 x6, 7 x12}
 * (formats/gguf_quants.py _MXFP4_MAG); reference kvalues for the e < 2 argmin rule: */
static const float MX_KV[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

typedef struct {
    const uint8_t *raw;
    int64_t n, k;
    const void *scale;
    int e8m0, qtype;
    const uint8_t *mx_exp;   /* MXFP4: E8M0 byte per 32-block [n, k/32] */
    const uint8_t *mx_etab;  /* fused MXFP4: E8M0 byte per (128x128 block, max magnitude byte) [bn, bk, 128] */
    int8_t *thr;             /* fused MXFP4: [bk][256][8] magnitude-byte thresholds per (column block, e) */
    uint32_t *thr_stamp;     /* [bk][256]: row block + 1 the thresholds were computed for (0: none) */
    uint8_t *out;            /* encode: GGUF bytes */
    float *amax;             /* amax pass: [n, k/32] */
    int64_t r0, r1;          /* this thread's rows */
    int64_t bad;             /* non-finite values seen */
    float *ftab;             /* [bk][256] products of the current row block */
    uint16_t *htab;          /* [bk][256] F16 / BF16 encodings */
    uint8_t *tab_bad;        /* [bk]: some non-NaN byte has a non-finite product */
} job_t;

static float block_scale(const job_t *j, int64_t rb, int64_t cb) {
    int64_t bk = (j->k + FP8_BLOCK - 1) / FP8_BLOCK;
    if (j->e8m0) return e8m0_value(((const uint8_t *)j->scale)[rb * bk + cb]);
    return ((const float *)j->scale)[rb * bk + cb];
}

static void build_tables(job_t *j, const float *lut, int64_t rb) {
    int64_t bk = (j->k + FP8_BLOCK - 1) / FP8_BLOCK;
    for (int64_t cb = 0; cb < bk; cb++) {
        float s = block_scale(j, rb, cb);
        float *t = j->ftab + cb * 256;
        uint8_t bad = 0;
        for (unsigned b = 0; b < 256; b++) {
            t[b] = lut[b] * s;                     /* the torch path's one float32 multiply */
            if ((b & 0x7Fu) != 0x7Fu && !isfinite(t[b])) bad = 1;
        }
        j->tab_bad[cb] = bad;
        if (j->htab) {
            uint16_t *h = j->htab + cb * 256;
            for (unsigned b = 0; b < 256; b++) h[b] = j->qtype == T_F16 ? f32_to_f16(t[b]) : f32_to_bf16(t[b]);
        }
    }
}

static inline int64_t nan_bytes(const uint8_t *x, int64_t len) {
    int64_t c = 0;
    for (int64_t t = 0; t < len; t++) c += (x[t] & 0x7Fu) == 0x7Fu;
    return c;
}

/* Plain float outputs (F32 / F16 / BF16) of one row: table lookups per 128-column segment. */
static void row_plain(job_t *j, const uint8_t *row, uint8_t *out) {
    int64_t k = j->k;
    for (int64_t c0 = 0, cb = 0; c0 < k; c0 += FP8_BLOCK, cb++) {
        int64_t len = k - c0 < FP8_BLOCK ? k - c0 : FP8_BLOCK;
        const uint8_t *x = row + c0;
        const float *t = j->ftab + cb * 256;
        j->bad += j->tab_bad[cb] ? count_bad(x, len, t) : nan_bytes(x, len);
        if (j->qtype == T_F32) {
            float *o = (float *)(void *)out + c0;  /* out is 4-byte aligned (torch allocation, k*4 per row) */
            for (int64_t q = 0; q < len; q++) o[q] = t[x[q]];
        } else {
            const uint16_t *h = j->htab + cb * 256;
            uint16_t *o = (uint16_t *)(void *)out + c0;
            for (int64_t q = 0; q < len; q++) o[q] = h[x[q]];
        }
    }
}

/* Max |x| of one 32-block (x = t[byte]) and its non-finite count (added to *bad). */
static inline float block_amax(const uint8_t *x, const float *t, int tab_bad, int64_t *bad) {
    unsigned m = mag_max32(x);
    float a = fabsf(t[m]);
    if (m == 0x7Fu || (tab_bad && !isfinite(a))) {
        *bad += count_bad(x, QK, t);
        return NAN;
    }
    return a;
}

static void q8_0_block(const uint8_t *x, const float *t, float amax, uint8_t *out) {
    float d = amax / 127.0f;
    float inv = d != 0.0f ? 1.0f / d : 0.0f;
    float xb[QK];
    int8_t q[QK];
    for (int i = 0; i < QK; i++) xb[i] = t[x[i]];
    for (int i = 0; i < QK; i++) {
        float v = xb[i] * inv;
        float tv = truncf(v);
        q[i] = (int8_t)(tv + truncf((v - tv) * 2.0f));
    }
    uint16_t h = f32_to_f16(d);
    out[0] = (uint8_t)(h & 0xFFu);
    out[1] = (uint8_t)(h >> 8);
    memcpy(out + 2, q, QK);
}

static void mxfp4_block(const uint8_t *x, const float *t, unsigned e, uint8_t *out) {
    float d = e8m0_half(e);
    float xb[QK];
    uint8_t c[QK];
    for (int i = 0; i < QK; i++) xb[i] = t[x[i]];
    if (e >= 2) {
        /* code = MX_MAG[min(ceil(a), 32)], a = |x| * (2 / d); MX_MAG steps up at ceil(a) = 2 4 6 8 11 15 21,
         * and ceil(a) >= K <=> a > K - 1 for integer K: a branch-free count the compiler vectorizes. */
        float d2 = 2.0f / d;                        /* exact: d is a normal power of two */
        for (int i = 0; i < QK; i++) {
            float a = fabsf(xb[i]) * d2;
            unsigned m = (unsigned)(a > 1.0f) + (a > 3.0f) + (a > 5.0f) + (a > 7.0f) + (a > 10.0f) + (a > 14.0f)
                         + (a > 20.0f);
            uint32_t bits;
            memcpy(&bits, &xb[i], 4);
            c[i] = (uint8_t)(m | ((m != 0) & (bits >> 31)) << 3);
        }
    } else {                                        /* subnormal scale: the reference argmin rule */
        for (int i = 0; i < QK; i++) {
            int best = 0;
            float be = fabsf(d * MX_KV[0] - xb[i]);
            for (int q = 1; q < 16; q++) {
                float err = fabsf(d * MX_KV[q] - xb[i]);
                if (err < be) { be = err; best = q; }
            }
            c[i] = (uint8_t)best;
        }
    }
    out[0] = (uint8_t)e;
    for (int i = 0; i < 16; i++) out[1 + i] = (uint8_t)(c[i] | (c[i + 16] << 4));
}

/* Fused MXFP4 (e >= 2): the code magnitude of x = t[b] is m = sum over K in MX_STEPS of (|x| * (2 / d) > K),
 * as mxfp4_block computes it. |t[b]| = |t[b & 0x7F]| is nondecreasing in the magnitude byte (e4m3 is monotonic,
 * the float32 product with the block's finite scale rounds monotonically), so each (|x| * d2 > K) holds exactly
 * for the magnitude bytes above a threshold thr_K (-1..126): thr_K + 1 is the first byte, found by bisection,
 * for which that same float32 expression is true. Then m = sum_K (byte & 0x7F > thr_K): byte compares. The sign
 * bit of x is the byte's sign bit XOR the scale's (IEEE), needed only where m != 0 (x != 0 there). */
static const float MX_STEPS[7] = {1.0f, 3.0f, 5.0f, 7.0f, 10.0f, 14.0f, 20.0f};

static const int8_t *mx_thresholds(job_t *j, int64_t rb, int64_t cb, unsigned e, const float *t) {
    int8_t *thr = j->thr + (cb * 256 + e) * 8;
    uint32_t *stamp = j->thr_stamp + cb * 256 + e;
    if (*stamp == (uint32_t)(rb + 1)) return thr;
    float d2 = 2.0f / e8m0_half(e);                 /* exact: d is a normal power of two for e >= 2 */
    for (int q = 0; q < 7; q++) {
        int lo = 0, hi = 127;                       /* first magnitude byte in [lo, hi) with the test true */
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (fabsf(t[mid]) * d2 > MX_STEPS[q]) hi = mid;
            else lo = mid + 1;
        }
        thr[q] = (int8_t)(lo - 1);
    }
    *stamp = (uint32_t)(rb + 1);
    return thr;
}

#ifdef __SSE2__
static inline __m128i mx_codes16(__m128i v, const __m128i *thr, __m128i flip) {
    __m128i zero = _mm_setzero_si128();
    __m128i mag = _mm_and_si128(v, _mm_set1_epi8(0x7F));
    __m128i c = zero;
    for (int q = 0; q < 7; q++) c = _mm_sub_epi8(c, _mm_cmpgt_epi8(mag, thr[q]));   /* cmpgt: -1 where true */
    __m128i neg = _mm_xor_si128(_mm_cmplt_epi8(v, zero), flip);                        /* x < 0 */
    __m128i sgn = _mm_and_si128(_mm_and_si128(neg, _mm_cmpgt_epi8(c, zero)), _mm_set1_epi8(8));
    return _mm_or_si128(c, sgn);
}
#endif

/* One MXFP4 block from thresholds (e >= 2): the bytes mxfp4_block writes. flip: the scale's sign bit. */
static void mxfp4_block_thr(const uint8_t *x, const int8_t *thr, unsigned flip, unsigned e, uint8_t *out) {
    out[0] = (uint8_t)e;
#ifdef __SSE2__
    __m128i tv[7];
    for (int q = 0; q < 7; q++) tv[q] = _mm_set1_epi8(thr[q]);
    __m128i fl = flip ? _mm_set1_epi8(-1) : _mm_setzero_si128();
    __m128i c0 = mx_codes16(_mm_loadu_si128((const __m128i *)x), tv, fl);
    __m128i c1 = mx_codes16(_mm_loadu_si128((const __m128i *)(x + 16)), tv, fl);
    /* c1's bytes are < 16: a 16-bit shift by 4 moves nothing across bytes */
    _mm_storeu_si128((__m128i *)(void *)(out + 1), _mm_or_si128(c0, _mm_slli_epi16(c1, 4)));
#else
    uint8_t c[QK];
    for (int i = 0; i < QK; i++) {
        int mag = x[i] & 0x7F;
        unsigned m = 0;
        for (int q = 0; q < 7; q++) m += mag > thr[q];
        c[i] = (uint8_t)(m | ((m != 0) & ((x[i] >> 7) ^ flip)) << 3);
    }
    for (int i = 0; i < 16; i++) out[1 + i] = (uint8_t)(c[i] | (c[i + 16] << 4));
#endif
}

static void *run_rows(void *arg) {
    job_t *j = (job_t *)arg;
    float lut[256];
    for (unsigned b = 0; b < 256; b++) lut[b] = e4m3_value(b);
    int64_t bk = (j->k + FP8_BLOCK - 1) / FP8_BLOCK, nb = j->k / QK;
    int plain = j->qtype == T_F32 || j->qtype == T_F16 || j->qtype == T_BF16;
    int64_t row_bytes = j->qtype == T_F32 ? j->k * 4 : plain ? j->k * 2 : nb * (j->qtype == T_Q8_0 ? 34 : 17);
    int64_t rb_cur = -1;
    for (int64_t i = j->r0; i < j->r1; i++) {
        if (i / FP8_BLOCK != rb_cur) {
            rb_cur = i / FP8_BLOCK;
            build_tables(j, lut, rb_cur);
        }
        const uint8_t *row = j->raw + i * j->k;
        if (plain) {
            row_plain(j, row, j->out + i * row_bytes);
            continue;
        }
        for (int64_t b = 0; b < nb; b++) {
            int64_t cb = (b * QK) / FP8_BLOCK;
            const float *t = j->ftab + cb * 256;
            const uint8_t *x = row + b * QK;
            if (j->mx_etab) {                       /* fused MXFP4: exponent from the block's max magnitude byte */
                unsigned m = mag_max32(x);
                float a = fabsf(t[m]);
                if (m == 0x7Fu || (j->tab_bad[cb] && !isfinite(a))) {
                    j->bad += count_bad(x, QK, t);
                    continue;
                }
                unsigned e = j->mx_etab[(rb_cur * bk + cb) * 128 + m];
                uint8_t *o = j->out + i * row_bytes + b * 17;
                uint32_t sbits;
                memcpy(&sbits, &t[1], 4);           /* t[1] = 2**-9 * s: the scale's sign */
                if (e >= 2) mxfp4_block_thr(x, mx_thresholds(j, rb_cur, cb, e, t), sbits >> 31, e, o);
                else mxfp4_block(x, t, e, o);
                continue;
            }
            float a = block_amax(x, t, j->tab_bad[cb], &j->bad);
            if (j->amax) { j->amax[i * nb + b] = a; continue; }
            if (a != a) continue;                   /* non-finite block: counted, output refused */
            if (j->qtype == T_Q8_0) q8_0_block(x, t, a, j->out + i * row_bytes + b * 34);
            else mxfp4_block(x, t, j->mx_exp[i * nb + b], j->out + i * row_bytes + b * 17);
        }
    }
    return NULL;
}

static int64_t run_threads(job_t *base, int nthreads) {
    int64_t n = base->n, bk = (base->k + FP8_BLOCK - 1) / FP8_BLOCK;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > n) nthreads = (int)(n > 0 ? n : 1);
    int need_h = base->qtype == T_F16 || base->qtype == T_BF16;
    size_t thr_bytes = base->mx_etab ? (size_t)bk * 256 * (8 + sizeof(uint32_t)) : 0;
    size_t per = (size_t)bk * (256 * sizeof(float) + (need_h ? 256 * sizeof(uint16_t) : 0) + 1) + thr_bytes;
    per = (per + 15) & ~(size_t)15;
    char *mem = (char *)malloc(per * (size_t)nthreads);
    if (!mem) return -1;
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        char *m = mem + per * (size_t)t;
        jobs[t] = *base;
        jobs[t].r0 = n * t / nthreads;
        jobs[t].r1 = n * (t + 1) / nthreads;
        jobs[t].ftab = (float *)(void *)m;
        jobs[t].htab = need_h ? (uint16_t *)(void *)(m + (size_t)bk * 256 * sizeof(float)) : NULL;
        jobs[t].tab_bad = (uint8_t *)(m + (size_t)bk * 256 * (sizeof(float) + (need_h ? sizeof(uint16_t) : 0)));
        if (base->mx_etab) {
            jobs[t].thr_stamp = (uint32_t *)(void *)(m + (((size_t)bk * (256 * sizeof(float) + 1) + 3) & ~(size_t)3));
            jobs[t].thr = (int8_t *)(jobs[t].thr_stamp + bk * 256);
            memset(jobs[t].thr_stamp, 0, (size_t)bk * 256 * sizeof(uint32_t));
        }
        started[t] = 0;
    }
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tid[t], NULL, run_rows, &jobs[t]) == 0;
    run_rows(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else run_rows(&jobs[t]); /* thread could not start: do its rows here */
    }
    int64_t bad = 0;
    for (int t = 0; t < nthreads; t++) bad += jobs[t].bad;
    free(mem);
    return bad;
}

/* Block maxima max|x| per 32-block -> amax [n, k/32] (k % 32 == 0; NaN where a block is non-finite).
 * Returns the number of non-finite dequantized values, or -1 when out of memory. */
int64_t v4c_fp8_amax32(const uint8_t *raw, int64_t n, int64_t k, const void *scale, int e8m0, float *amax,
                       int nthreads) {
    job_t base;
    memset(&base, 0, sizeof base);
    base.raw = raw; base.n = n; base.k = k; base.scale = scale; base.e8m0 = e8m0; base.qtype = T_MXFP4;
    base.amax = amax;
    return run_threads(&base, nthreads);
}

/* GGUF bytes of type qtype (F32 / F16 / BF16 / Q8_0 / MXFP4; MXFP4 needs mx_exp [n, k/32]).
 * Returns the number of non-finite dequantized values (output then unspecified), or -1 when out of
 * memory, or -2 for an unsupported type. */
int64_t v4c_fp8_gguf(const uint8_t *raw, int64_t n, int64_t k, const void *scale, int e8m0, int qtype,
                     const uint8_t *mx_exp, uint8_t *out, int nthreads) {
    if (qtype != T_F32 && qtype != T_F16 && qtype != T_BF16 && qtype != T_Q8_0 && qtype != T_MXFP4) return -2;
    job_t base;
    memset(&base, 0, sizeof base);
    base.raw = raw; base.n = n; base.k = k; base.scale = scale; base.e8m0 = e8m0; base.qtype = qtype;
    base.mx_exp = mx_exp; base.out = out;
    return run_threads(&base, nthreads);
}

/* |e4m3(m) * s| for m = 0..127 and each of the count block scales s (float32 or E8M0 bytes) -> mags
 * [count, 128]: every max |x| a 32-block of that 128x128 block can have (the product of run_rows' tables). */
void v4c_fp8_block_mags(const void *scale, int64_t count, int e8m0, float *mags) {
    float lut[128];
    for (unsigned b = 0; b < 128; b++) lut[b] = e4m3_value(b);
    for (int64_t c = 0; c < count; c++) {
        float s = e8m0 ? e8m0_value(((const uint8_t *)scale)[c]) : ((const float *)scale)[c];
        for (unsigned b = 0; b < 128; b++) mags[c * 128 + b] = fabsf(lut[b] * s);
    }
}

/* GGUF MXFP4 bytes in one pass: the E8M0 byte of a 32-block is etab[block][m] for m its max magnitude byte
 * (etab [ceil(n/128) * ceil(k/128), 128]: numpy's exponent of v4c_fp8_block_mags), the codes by mx_thresholds.
 * Same bytes as v4c_fp8_gguf(MXFP4) with mx_exp from v4c_fp8_amax32; same return values. */
int64_t v4c_fp8_mxfp4(const uint8_t *raw, int64_t n, int64_t k, const void *scale, int e8m0, const uint8_t *etab,
                      uint8_t *out, int nthreads) {
    if (k % QK) return -2;
    job_t base;
    memset(&base, 0, sizeof base);
    base.raw = raw; base.n = n; base.k = k; base.scale = scale; base.e8m0 = e8m0; base.qtype = T_MXFP4;
    base.mx_etab = etab; base.out = out;
    return run_threads(&base, nthreads);
}

/* ---- OCP / DeepSeek MXFP4 -> GGUF MXFP4 re-pack (bits only; formats/gguf_quants.py repack_mxfp4) ----
 * packed [rows, nb * 16]: byte i = element 2i (low nibble) | element 2i + 1 (high); scale [rows, nb] E8M0.
 * out [rows, nb * 17]: byte 0 = scale, byte 1 + j = element j | element j + 16 << 4. */
typedef struct {
    const uint8_t *packed, *scale;
    uint8_t *out;
    int64_t nb, r0, r1;
    int64_t nan_scales;      /* scale bytes 0xFF (E8M0 NaN) in this thread's rows */
} repack_t;

static void *repack_rows(void *arg) {
    repack_t *j = (repack_t *)arg;
    j->nan_scales = 0;
    for (int64_t i = j->r0; i < j->r1; i++) {
        for (int64_t b = 0; b < j->nb; b++) {
            const uint8_t *src = j->packed + (i * j->nb + b) * 16;
            uint8_t *o = j->out + (i * j->nb + b) * 17;
            o[0] = j->scale[i * j->nb + b];
            j->nan_scales += o[0] == 0xFFu;
#ifdef __SSE2__
            {   /* the loop below on 16 bytes at once: a = lo & 0xF | hi << 4, b = lo >> 4 | hi & 0xF0, interleaved */
                __m128i v = _mm_loadu_si128((const __m128i *)src), k0f = _mm_set1_epi8(0x0F);
                __m128i hi = _mm_srli_si128(v, 8);
                __m128i a = _mm_or_si128(_mm_and_si128(v, k0f), _mm_slli_epi16(_mm_and_si128(hi, k0f), 4));
                __m128i c = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(v, 4), k0f), _mm_andnot_si128(k0f, hi));
                _mm_storeu_si128((__m128i *)(void *)(o + 1), _mm_unpacklo_epi8(a, c));
                continue;
            }
#endif
            for (int t = 0; t < 8; t++) {
                uint8_t lo = src[t], hi = src[8 + t];      /* elements 2t, 2t+1 and 2t+16, 2t+17 */
                o[1 + 2 * t] = (uint8_t)((lo & 0x0Fu) | (hi << 4));
                o[2 + 2 * t] = (uint8_t)((lo >> 4) | (hi & 0xF0u));
            }
        }
    }
    return NULL;
}

/* Returns the number of 0xFF (NaN) scale bytes: the output is then not valid GGUF and the caller refuses it. */
int64_t v4c_mxfp4_repack(const uint8_t *packed, const uint8_t *scale, int64_t rows, int64_t nb, uint8_t *out,
                         int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > rows) nthreads = (int)(rows > 0 ? rows : 1);
    repack_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        jobs[t].packed = packed; jobs[t].scale = scale; jobs[t].out = out; jobs[t].nb = nb;
        jobs[t].r0 = rows * t / nthreads;
        jobs[t].r1 = rows * (t + 1) / nthreads;
        started[t] = 0;
    }
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tid[t], NULL, repack_rows, &jobs[t]) == 0;
    repack_rows(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else repack_rows(&jobs[t]);
    }
    int64_t nan_scales = 0;
    for (int t = 0; t < nthreads; t++) nan_scales += jobs[t].nan_scales;
    return nan_scales;
}
