#define _POSIX_C_SOURCE 200809L
/* FP8-block (E4M3 bytes + one scale per 128x128 block) -> NVFP4 RTN, in float32.
 *
 * Plain C99 + pthreads, no torch headers. Reproduces the float32 operation order of
 * formats/nvfp4.py + formats/fp8_block.py (the torch codec) bit for bit:
 *   s          = 128-block scale (F32 as stored, or E8M0 byte b -> 2**(b-127))
 *   block_amax = e4m3(max magnitude byte of the 16-block) * s            (one float32 multiply)
 *   MODELOPT:  ws = e4m3_rne(clamp(block_amax / (6 * g), +-448)),  eff = ws * g
 *   COMPR.T.:  ws = e4m3_rne(clamp(g * (block_amax / 6), +-448)),  eff = ws / g
 *   safe = eff == 0 ? 1 : eff;   q = (fp8 * s) / safe;   code = E2M1 RNE of q (sign of q kept)
 * Build with -ffp-contract=off and without -ffast-math (no FMA, no reciprocal rewrites).
 * Layout: raw uint8 [n, k] row-major (k % 16 == 0), scale [ceil(n/128), ceil(k/128)],
 * block_amax float32 [n, k/16], packed uint8 [n, k/2] (low nibble = even element),
 * ws uint8 E4M3 [n, k/16].
 *
 * Two call sequences give the same bytes:
 *   two-stage (reference): v4c_fp8_block_amax (writes block_amax [n, k/16]) then v4c_fp8_encode;
 *   fused (hot path):      v4c_fp8_amax (tensor amax only, from the max magnitude byte of each 128x128 block:
 *                          e4m3 is monotonic in byte & 0x7F and s >= 0, so max(e4m3(m16) * s) over a block's
 *                          16-blocks == e4m3(max m16) * s, float32 rounding being monotonic) then
 *                          v4c_fp8_encode_fused (the 16-block's max byte m recomputed in the encode pass; ws and
 *                          the E2M1 thresholds cached per (128-block, m), as block_amax = e4m3(m) * s exactly).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rows.h"
#ifdef __SSE2__
#include <emmintrin.h>
#endif
#ifdef __SSSE3__
#include <tmmintrin.h>
#endif
#ifdef __SSE4_1__
#include <smmintrin.h>
#endif

#define FP8_BLOCK 128
#define NV_BLOCK 16
#define MAX_THREADS 64

static float e4m3_value(unsigned b) { /* non-NaN E4M3 byte -> float32 (exact) */
    unsigned e = (b >> 3) & 15u, m = b & 7u;
    float v = (e == 0) ? ldexpf((float)m, -9) : ldexpf((float)(8u + m), (int)e - 10);
    return (b & 0x80u) ? -v : v;
}

static float e8m0_value(unsigned b) { /* E8M0 byte (not 0xFF) -> 2**(b-127), exact incl. b == 0 */
    uint32_t bits = b ? ((uint32_t)b << 23) : 0x00400000u;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float32 -> E4M3 byte: clamp to +-448, round to nearest even (subnormals included); NaN -> 0x7F. */
static uint8_t e4m3_rne(float x) {
    if (x != x) return 0x7F;
    uint8_t sign = signbit(x) ? 0x80 : 0;
    float a = fabsf(x);
    if (a > 448.0f) a = 448.0f;
    if (a < 0.015625f) { /* below 2**-6: subnormal grid 2**-9, exact scaling then RNE */
        return sign | (uint8_t)lrintf(a * 512.0f); /* 8 -> 0x08 == min normal */
    }
    uint32_t bits;
    memcpy(&bits, &a, 4);
    bits = bits + 0x7FFFFu + ((bits >> 20) & 1u); /* RNE to 3 mantissa bits */
    int e = (int)(bits >> 23) - 127;
    unsigned m = (bits >> 20) & 7u;
    return sign | (uint8_t)(((e + 7) << 3) | m);
}

/* E2M1 magnitude bounds .25 .75 1.25 1.75 2.5 3.5 5; ties go to the even code, so the bound is
 * inclusive (>=) before an even code (.75 1.75 3.5) and exclusive (>) otherwise. */
static const float E2M1_BOUND[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
static const int E2M1_INCLUSIVE[7] = {0, 1, 0, 1, 0, 1, 0};

/* For one (FP8 scale s >= 0, NVFP4 factor safe > 0) pair: thr[i] = smallest magnitude byte m
 * (0..126) whose q = (e4m3(m) * s) / safe passes bound i, or 127 if none. Exact: q is monotonic
 * in m (float32 rounding is monotonic, s >= 0, safe > 0) and symmetric in the sign, so the E2M1
 * magnitude code of byte x is #{i : (x & 0x7F) >= thr[i]} and its sign bit is x's (signbit(q)). */
static inline int e2m1_pass(const float *lut, float s, float safe, int i, int m) {
    float a = fabsf((lut[m] * s) / safe);
    return E2M1_INCLUSIVE[i] ? (a >= E2M1_BOUND[i]) : (a > E2M1_BOUND[i]);
}

static void e2m1_thresholds(const float *lut, float s, float safe, uint8_t thr[7]) {
    /* Start from the byte nearest bound * safe / s (an estimate, off by at most a step or two), then walk to the
     * exact answer with the predicate itself: down while m - 1 passes, up while m fails (never evaluating byte
     * 127, which is NaN). Monotonicity makes the result the first passing m in 0..126, or 127 if none. */
    for (int i = 0; i < 7; i++) {
        float t = (E2M1_BOUND[i] * safe) / s;             /* s == 0: inf -> 0x7E, then up to 127 */
        int m = (t != t) ? 127 : (e4m3_rne(t) & 0x7F);
        while (m > 0 && e2m1_pass(lut, s, safe, i, m - 1)) m--;
        while (m < 127 && !e2m1_pass(lut, s, safe, i, m)) m++;
        thr[i] = (uint8_t)m;
    }
}

/* 16 E4M3 bytes -> 8 packed NVFP4 bytes (low nibble = even element) given the block's thresholds. */
static inline void encode16(const uint8_t *x, const uint8_t thr[7], uint8_t *out) {
#ifdef __SSE2__
    __m128i v = _mm_loadu_si128((const __m128i *)x);
    __m128i mag = _mm_and_si128(v, _mm_set1_epi8(0x7F));
    __m128i code = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x08)); /* sign -> bit 3 */
    for (int i = 0; i < 7; i++) /* mag >= thr <=> mag > thr - 1 (all values in 0..127, signed compare) */
        code = _mm_sub_epi8(code, _mm_cmpgt_epi8(mag, _mm_set1_epi8((char)(thr[i] - 1))));
    __m128i pair = _mm_and_si128(_mm_or_si128(code, _mm_srli_epi16(code, 4)), _mm_set1_epi16(0x00FF));
    _mm_storel_epi64((__m128i *)out, _mm_packus_epi16(pair, pair));
#else
    for (int t = 0; t < NV_BLOCK; t += 2) {
        unsigned c[2];
        for (int u = 0; u < 2; u++) {
            unsigned m = x[t + u] & 0x7Fu, k = 0;
            for (int i = 0; i < 7; i++) k += m >= thr[i];
            c[u] = k | ((x[t + u] & 0x80u) >> 4);
        }
        out[t / 2] = (uint8_t)(c[0] | (c[1] << 4));
    }
#endif
}

static inline unsigned mag_max16(const uint8_t *x) {
#ifdef __SSE2__
    __m128i m = _mm_and_si128(_mm_loadu_si128((const __m128i *)x), _mm_set1_epi8(0x7F));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
    return (unsigned)_mm_cvtsi128_si32(m) & 0xFFu;
#else
    unsigned m = 0;
    for (int t = 0; t < NV_BLOCK; t++) {
        unsigned v = x[t] & 0x7Fu;
        m = v > m ? v : m;
    }
    return m;
#endif
}

typedef struct {
    const uint8_t *raw;
    int64_t n, k;
    const void *scale;
    int e8m0;
    float *block_amax;       /* stage 1 out / stage 2 in */
    float gscale;
    int modelopt;
    uint8_t *packed, *ws;    /* stage 2 out */
    int64_t r0, r1;          /* this thread's rows */
    int64_t nan_count;       /* stage 1: NaN bytes seen */
    int bad_scale;           /* stage 1: E8M0 0xFF or non-finite F32 scale seen */
    float amax;              /* stage 1: max block amax of these rows */
} job_t;

static float block_scale(const job_t *j, int64_t i, int64_t c) {
    int64_t bk = (j->k + FP8_BLOCK - 1) / FP8_BLOCK;
    int64_t idx = (i / FP8_BLOCK) * bk + c / FP8_BLOCK;
    if (j->e8m0) return e8m0_value(((const uint8_t *)j->scale)[idx]);
    return ((const float *)j->scale)[idx];
}

static int scale_bad(const job_t *j, int64_t idx) { /* E8M0 0xFF, or F32 NaN/Inf/negative (incl. -0) */
    if (j->e8m0) return ((const uint8_t *)j->scale)[idx] == 0xFF;
    float f = ((const float *)j->scale)[idx];
    return !isfinite(f) || signbit(f);
}

static void *amax_rows(void *arg) {
    job_t *j = (job_t *)arg;
    float lut[128];
    for (unsigned b = 0; b < 128; b++) lut[b] = e4m3_value(b);
    int64_t nb = j->k / NV_BLOCK, bk = (j->k + FP8_BLOCK - 1) / FP8_BLOCK;
    float best = 0.0f;
    for (int64_t i = j->r0; i < j->r1; i++) {
        const uint8_t *row = j->raw + i * j->k;
        if (i == j->r0 || i % FP8_BLOCK == 0) /* check this block-row's scales once */
            for (int64_t c = 0; c < bk; c++) j->bad_scale |= scale_bad(j, (i / FP8_BLOCK) * bk + c);
        float *ba_row = j->block_amax + i * nb;
        for (int64_t b = 0; b < nb; b++) {
            unsigned m = mag_max16(row + b * NV_BLOCK);
            if (m == 0x7F) {
                for (int t = 0; t < NV_BLOCK; t++) j->nan_count += (row[b * NV_BLOCK + t] & 0x7Fu) == 0x7Fu;
                m = 0;
            }
            float ba = lut[m] * block_scale(j, i, b * NV_BLOCK);
            ba_row[b] = ba;
            if (ba > best || ba != ba) best = (ba != ba || best != best) ? NAN : ba;
        }
    }
    j->amax = best;
    return NULL;
}

typedef struct { uint8_t thr[7]; uint8_t valid; } thr_entry;

static void *encode_rows(void *arg) {
    job_t *j = (job_t *)arg;
    float lut[128];
    for (unsigned b = 0; b < 128; b++) lut[b] = e4m3_value(b);
    const float g = j->gscale;
    const float six_g = 6.0f * g;
    int64_t nb = j->k / NV_BLOCK, bk = (j->k + FP8_BLOCK - 1) / FP8_BLOCK;
    /* thresholds depend only on (128-block scale, ws byte): cache them per column block for the
     * current 128-row block */
    thr_entry *cache = (thr_entry *)malloc((size_t)bk * 128 * sizeof(thr_entry));
    thr_entry local;
    int64_t cached_rb = -1;
    for (int64_t i = j->r0; i < j->r1; i++) {
        if (cache && i / FP8_BLOCK != cached_rb) {
            memset(cache, 0, (size_t)bk * 128 * sizeof(thr_entry));
            cached_rb = i / FP8_BLOCK;
        }
        const uint8_t *row = j->raw + i * j->k;
        uint8_t *out = j->packed + i * (j->k / 2);
        const float *ba_row = j->block_amax + i * nb;
        uint8_t *ws_row = j->ws + i * nb;
        for (int64_t b = 0; b < nb; b++) {
            float ba = ba_row[b];
            uint8_t w = j->modelopt ? e4m3_rne(ba / six_g) : e4m3_rne(g * (ba / 6.0f));
            ws_row[b] = w;
            int64_t cb = (b * NV_BLOCK) / FP8_BLOCK;
            thr_entry *e = cache ? &cache[cb * 128 + (w & 0x7F)] : &local;
            if (!e->valid || !cache) {
                float wf = e4m3_value(w); /* w is never NaN: g finite > 0, ba finite */
                float eff = j->modelopt ? wf * g : wf / g;
                float safe = (eff == 0.0f) ? 1.0f : eff;
                e2m1_thresholds(lut, block_scale(j, i, b * NV_BLOCK), safe, e->thr);
                e->valid = 1;
            }
            encode16(row + b * NV_BLOCK, e->thr, out + b * (NV_BLOCK / 2));
        }
    }
    free(cache);
    return NULL;
}

/* ---------------------------------------------------------------- fused path */
/* Stage 1: per thread, the vertical max of (byte & 0x7F) over each 16-column chunk of the rows of the current
 * 128-row block; at the block row's end (or the thread's last row) each 128-column block's max byte m gives
 * e4m3(m) * s. NaN bytes (m == 0x7F) are counted over that stretch of rows (a refusal follows anyway). */
static void amax_flush(job_t *j, const uint8_t *acc, int64_t ra, int64_t rb_end, const float *lut, float *best) {
    int64_t nb = j->k / NV_BLOCK, bk = (j->k + FP8_BLOCK - 1) / FP8_BLOCK;
    for (int64_t c = 0; c < bk; c++) {
        int64_t b0 = c * (FP8_BLOCK / NV_BLOCK), b1 = b0 + FP8_BLOCK / NV_BLOCK;
        if (b1 > nb) b1 = nb;
        unsigned m = 0;
        for (int64_t t = b0 * NV_BLOCK; t < b1 * NV_BLOCK; t++) m = acc[t] > m ? acc[t] : m;
        if (m == 0x7F) {
            for (int64_t i = ra; i < rb_end; i++)
                for (int64_t t = b0 * NV_BLOCK; t < b1 * NV_BLOCK; t++)
                    j->nan_count += (j->raw[i * j->k + t] & 0x7Fu) == 0x7Fu;
            m = 0;
        }
        float ba = lut[m] * block_scale(j, ra, c * FP8_BLOCK);
        if (ba > *best || ba != ba) *best = (ba != ba || *best != *best) ? NAN : ba;
    }
}

static void *amax_fused_rows(void *arg) {
    job_t *j = (job_t *)arg;
    float lut[128];
    for (unsigned b = 0; b < 128; b++) lut[b] = e4m3_value(b);
    int64_t k = j->k, bk = (k + FP8_BLOCK - 1) / FP8_BLOCK;
    uint8_t *acc = (uint8_t *)malloc((size_t)k);
    float best = 0.0f;
    int64_t ra = j->r0; /* first row of the current stretch */
    if (acc) memset(acc, 0, (size_t)k);
    for (int64_t i = j->r0; i < j->r1 && acc; i++) {
        const uint8_t *row = j->raw + i * k;
        if (i == j->r0 || i % FP8_BLOCK == 0)
            for (int64_t c = 0; c < bk; c++) j->bad_scale |= scale_bad(j, (i / FP8_BLOCK) * bk + c);
        int64_t t = 0;
#ifdef __SSE2__
        const __m128i m7f = _mm_set1_epi8(0x7F);
        for (; t < k; t += NV_BLOCK) {
            __m128i v = _mm_and_si128(_mm_loadu_si128((const __m128i *)(row + t)), m7f);
            __m128i a = _mm_loadu_si128((const __m128i *)(acc + t));
            _mm_storeu_si128((__m128i *)(acc + t), _mm_max_epu8(a, v));
        }
#else
        for (; t < k; t++) {
            unsigned v = row[t] & 0x7Fu;
            acc[t] = v > acc[t] ? (uint8_t)v : acc[t];
        }
#endif
        if (i + 1 == j->r1 || (i + 1) % FP8_BLOCK == 0) {
            amax_flush(j, acc, ra, i + 1, lut, &best);
            memset(acc, 0, (size_t)k);
            ra = i + 1;
        }
    }
    if (!acc) { /* out of memory: the two-stage rows give the same amax */
        j->bad_scale = 2;
    }
    free(acc);
    j->amax = best;
    return NULL;
}

/* One (128-block, max byte m) entry: the 16-block's E4M3 scale byte w and thr[i] - 1 of its E2M1 bounds. */
typedef struct { int8_t thrm1[8]; uint8_t w; uint8_t pad[3]; int32_t gen; } mthr_entry;

/* 16 E4M3 bytes (their magnitudes in mag) -> 8 packed NVFP4 bytes for thresholds thrm1 (thr - 1). */
static inline void encode16_m(const uint8_t *x, const int8_t thrm1[8], uint8_t *out) {
#if defined(__SSSE3__)
    __m128i v = _mm_loadu_si128((const __m128i *)x);
    __m128i mag = _mm_and_si128(v, _mm_set1_epi8(0x7F));
    __m128i code = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x08));
    __m128i th = _mm_loadl_epi64((const __m128i *)thrm1);
    for (int i = 0; i < 7; i++)
        code = _mm_sub_epi8(code, _mm_cmpgt_epi8(mag, _mm_shuffle_epi8(th, _mm_set1_epi8((char)i))));
    __m128i pair = _mm_and_si128(_mm_or_si128(code, _mm_srli_epi16(code, 4)), _mm_set1_epi16(0x00FF));
    _mm_storel_epi64((__m128i *)out, _mm_packus_epi16(pair, pair));
#else
    uint8_t thr[7];
    for (int i = 0; i < 7; i++) thr[i] = (uint8_t)(thrm1[i] + 1);
    encode16(x, thr, out);
#endif
}

static inline unsigned mag_max16_fast(const uint8_t *x) {
#if defined(__SSE4_1__)
    __m128i m = _mm_and_si128(_mm_loadu_si128((const __m128i *)x), _mm_set1_epi8(0x7F));
    m = _mm_and_si128(_mm_max_epu8(m, _mm_srli_epi16(m, 8)), _mm_set1_epi16(0x00FF)); /* 8 pair maxima */
    m = _mm_sub_epi16(_mm_set1_epi16(0x7F), m);                                        /* max -> min */
    return 0x7Fu - ((unsigned)_mm_cvtsi128_si32(_mm_minpos_epu16(m)) & 0xFFFFu);
#else
    return mag_max16(x);
#endif
}

/* The (128-block of row i and column block b, max byte m) entry, computed as the two-stage path does: block_amax =
 * e4m3(m) * s, then ws and its E2M1 thresholds. */
static void mthr_fill(const job_t *j, mthr_entry *e, const float *lut, int64_t i, int64_t b, unsigned m, int32_t gen) {
    const float g = j->gscale;
    float s = block_scale(j, i, b * NV_BLOCK);
    float ba = lut[m] * s;
    uint8_t w = j->modelopt ? e4m3_rne(ba / (6.0f * g)) : e4m3_rne(g * (ba / 6.0f));
    float wf = e4m3_value(w);
    float eff = j->modelopt ? wf * g : wf / g;
    float safe = (eff == 0.0f) ? 1.0f : eff;
    uint8_t thr[7];
    e2m1_thresholds(lut, s, safe, thr);
    for (int t = 0; t < 7; t++) e->thrm1[t] = (int8_t)(thr[t] - 1);
    e->thrm1[7] = 0;
    e->w = w;
    e->gen = gen;
}

static inline mthr_entry *mthr_get(const job_t *j, mthr_entry *cache, mthr_entry *local, const float *lut, int64_t i,
                                   int64_t b, unsigned m, int32_t gen) {
    if (m == 0x7F) m = 0; /* NaN: v4c_fp8_amax refused the tensor already; as the two-stage path */
    mthr_entry *e = cache ? &cache[(b / (FP8_BLOCK / NV_BLOCK)) * 128 + m] : local;
    if (!cache || e->gen != gen) mthr_fill(j, e, lut, i, b, m, gen);
    return e;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define V4C_HAVE_AVX2 1
#include <immintrin.h>
/* Two 16-blocks (32 bytes, same 128-column block) per step: the same integer operations as encode16_m and
 * mag_max16_fast on 256-bit registers (each 128-bit lane one block; vpshufb broadcasts within a lane). */
__attribute__((target("avx2"))) static void encode_fused_row_avx2(const job_t *j, mthr_entry *cache,
                                                                  mthr_entry *local, const float *lut, int64_t i,
                                                                  int32_t gen) {
    int64_t nb = j->k / NV_BLOCK;
    const uint8_t *row = j->raw + i * j->k;
    uint8_t *out = j->packed + i * (j->k / 2);
    uint8_t *ws_row = j->ws + i * nb;
    const __m256i m7f = _mm256_set1_epi8(0x7F), lo16 = _mm256_set1_epi16(0x00FF), v7f16 = _mm256_set1_epi16(0x7F);
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(row + b * NV_BLOCK));
        __m256i mag = _mm256_and_si256(v, m7f);
        __m256i mm = _mm256_sub_epi16(v7f16, _mm256_and_si256(_mm256_max_epu8(mag, _mm256_srli_epi16(mag, 8)), lo16));
        unsigned m0 = 0x7Fu - ((unsigned)_mm_cvtsi128_si32(_mm_minpos_epu16(_mm256_castsi256_si128(mm))) & 0xFFFFu);
        unsigned m1 = 0x7Fu - ((unsigned)_mm_cvtsi128_si32(_mm_minpos_epu16(_mm256_extracti128_si256(mm, 1))) & 0xFFFFu);
        mthr_entry *e0 = mthr_get(j, cache, local, lut, i, b, m0, gen);
        __m128i t0 = _mm_loadl_epi64((const __m128i *)e0->thrm1);
        ws_row[b] = e0->w;
        mthr_entry *e1 = mthr_get(j, cache, local, lut, i, b + 1, m1, gen);
        __m128i t1 = _mm_loadl_epi64((const __m128i *)e1->thrm1);
        ws_row[b + 1] = e1->w;
        __m256i th = _mm256_inserti128_si256(_mm256_castsi128_si256(t0), t1, 1);
        __m256i code = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x08));
        for (int t = 0; t < 7; t++)
            code = _mm256_sub_epi8(code, _mm256_cmpgt_epi8(mag, _mm256_shuffle_epi8(th, _mm256_set1_epi8((char)t))));
        __m256i pair = _mm256_and_si256(_mm256_or_si256(code, _mm256_srli_epi16(code, 4)), lo16);
        __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi16(pair, pair), 0x08); /* lane0 q0, lane1 q0 */
        _mm_storeu_si128((__m128i *)(out + b * (NV_BLOCK / 2)), _mm256_castsi256_si128(pk));
    }
    for (; b < nb; b++) { /* odd K/16: the last block alone */
        const uint8_t *x = row + b * NV_BLOCK;
        mthr_entry *e = mthr_get(j, cache, local, lut, i, b, mag_max16_fast(x), gen);
        ws_row[b] = e->w;
        encode16_m(x, e->thrm1, out + b * (NV_BLOCK / 2));
    }
}
#endif

static void *encode_fused_rows(void *arg) {
    job_t *j = (job_t *)arg;
    float lut[128];
    for (unsigned b = 0; b < 128; b++) lut[b] = e4m3_value(b);
    int64_t nb = j->k / NV_BLOCK, bk = (j->k + FP8_BLOCK - 1) / FP8_BLOCK;
    /* entries valid for the current 128-row block only (gen = its index + 1; no clearing between blocks) */
    mthr_entry *cache = (mthr_entry *)calloc((size_t)bk * 128, sizeof(mthr_entry));
    mthr_entry local;
#ifdef V4C_HAVE_AVX2
    int avx2 = __builtin_cpu_supports("avx2") && !getenv("V4C_NO_AVX2");
#endif
    for (int64_t i = j->r0; i < j->r1; i++) {
        int32_t gen = (int32_t)(i / FP8_BLOCK) + 1;
#ifdef V4C_HAVE_AVX2
        if (avx2) {
            encode_fused_row_avx2(j, cache, &local, lut, i, gen);
            continue;
        }
#endif
        const uint8_t *row = j->raw + i * j->k;
        uint8_t *out = j->packed + i * (j->k / 2);
        uint8_t *ws_row = j->ws + i * nb;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *x = row + b * NV_BLOCK;
            mthr_entry *e = mthr_get(j, cache, &local, lut, i, b, mag_max16_fast(x), gen);
            ws_row[b] = e->w;
            encode16_m(x, e->thrm1, out + b * (NV_BLOCK / 2));
        }
    }
    free(cache);
    return NULL;
}

V4C_DEFINE_RUN_THREADS(job_t, MAX_THREADS)

/* Reduce the per-thread results of an amax stage: the largest amax (NaN if any is NaN) into *amax_out; returns
 * -2 (a thread could not allocate: bad_scale bit 2), -1 (a bad block scale) or the NaN byte count. */
static int64_t reduce_amax(const job_t *jobs, int used, float *amax_out) {
    int64_t nan_count = 0;
    int bad = 0;
    float best = 0.0f;
    for (int t = 0; t < used; t++) {
        nan_count += jobs[t].nan_count;
        bad |= jobs[t].bad_scale;
        float a = jobs[t].amax;
        if (a != a || best != best) best = NAN;
        else if (a > best) best = a;
    }
    *amax_out = best;
    if (bad & 2) return -2;
    return bad ? -1 : nan_count;
}

/* Stage 1: block_amax [n, k/16] and the tensor amax. Returns the number of NaN E4M3 bytes,
 * or -1 when a scale is bad (E8M0 0xFF / non-finite F32). */
int64_t v4c_fp8_block_amax(const uint8_t *raw, int64_t n, int64_t k, const void *scale, int e8m0,
                           float *block_amax, float *amax_out, int nthreads) {
    job_t base;
    memset(&base, 0, sizeof base);
    base.raw = raw; base.n = n; base.k = k; base.scale = scale; base.e8m0 = e8m0; base.block_amax = block_amax;
    job_t jobs[MAX_THREADS];
    memset(jobs, 0, sizeof jobs);
    run_threads(&base, nthreads, amax_rows, jobs);
    int used = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    if (used > n) used = (int)(n > 0 ? n : 1);
    return reduce_amax(jobs, used, amax_out);
}

/* Stage 2: E4M3 block scales ws [n, k/16] and packed codes [n, k/2] for global scale g. */
void v4c_fp8_encode(const uint8_t *raw, int64_t n, int64_t k, const void *scale, int e8m0,
                    const float *block_amax, float gscale, int modelopt, uint8_t *packed, uint8_t *ws,
                    int nthreads) {
    job_t base;
    memset(&base, 0, sizeof base);
    base.raw = raw; base.n = n; base.k = k; base.scale = scale; base.e8m0 = e8m0;
    base.block_amax = (float *)block_amax; base.gscale = gscale; base.modelopt = modelopt;
    base.packed = packed; base.ws = ws;
    job_t jobs[MAX_THREADS];
    run_threads(&base, nthreads, encode_rows, jobs);
}

/* Fused stage 1: the tensor amax alone (no block_amax array). Returns as v4c_fp8_block_amax; -2: out of memory. */
int64_t v4c_fp8_amax(const uint8_t *raw, int64_t n, int64_t k, const void *scale, int e8m0, float *amax_out,
                     int nthreads) {
    job_t base;
    memset(&base, 0, sizeof base);
    base.raw = raw; base.n = n; base.k = k; base.scale = scale; base.e8m0 = e8m0;
    job_t jobs[MAX_THREADS];
    memset(jobs, 0, sizeof jobs);
    int used = run_threads(&base, nthreads, amax_fused_rows, jobs);
    return reduce_amax(jobs, used, amax_out);
}

/* Fused stage 2: ws [n, k/16] and packed [n, k/2] for global scale g, straight from the E4M3 bytes. */
void v4c_fp8_encode_fused(const uint8_t *raw, int64_t n, int64_t k, const void *scale, int e8m0, float gscale,
                          int modelopt, uint8_t *packed, uint8_t *ws, int nthreads) {
    job_t base;
    memset(&base, 0, sizeof base);
    base.raw = raw; base.n = n; base.k = k; base.scale = scale; base.e8m0 = e8m0;
    base.gscale = gscale; base.modelopt = modelopt; base.packed = packed; base.ws = ws;
    job_t jobs[MAX_THREADS];
    run_threads(&base, nthreads, encode_fused_rows, jobs);
}
