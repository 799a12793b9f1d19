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
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

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

/* E2M1 code of q: magnitude bounds .25 .75 1.25 1.75 2.5 3.5 5 (ties to even: >= on .75 1.75 3.5). */
static inline unsigned e2m1_code(float q) {
    float a = fabsf(q);
    unsigned c = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
    return c | (signbit(q) ? 8u : 0u);
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

static void *amax_rows(void *arg) {
    job_t *j = (job_t *)arg;
    float lut[128];
    for (unsigned b = 0; b < 128; b++) lut[b] = e4m3_value(b);
    int64_t nb = j->k / NV_BLOCK, bk = (j->k + FP8_BLOCK - 1) / FP8_BLOCK;
    float best = 0.0f;
    for (int64_t i = j->r0; i < j->r1; i++) {
        const uint8_t *row = j->raw + i * j->k;
        if (i == j->r0 || i % FP8_BLOCK == 0) { /* check this block-row's scales once */
            for (int64_t c = 0; c < bk; c++) {
                int64_t idx = (i / FP8_BLOCK) * bk + c;
                if (j->e8m0 ? ((const uint8_t *)j->scale)[idx] == 0xFF : !isfinite(((const float *)j->scale)[idx]))
                    j->bad_scale = 1;
            }
        }
        for (int64_t b = 0; b < nb; b++) {
            unsigned m = 0;
            for (int t = 0; t < NV_BLOCK; t++) {
                unsigned v = row[b * NV_BLOCK + t] & 0x7Fu;
                m = v > m ? v : m;
            }
            if (m == 0x7F) {
                for (int t = 0; t < NV_BLOCK; t++) j->nan_count += (row[b * NV_BLOCK + t] & 0x7Fu) == 0x7Fu;
                m = 0;
            }
            float ba = lut[m] * block_scale(j, i, b * NV_BLOCK);
            j->block_amax[i * nb + b] = ba;
            if (ba > best || ba != ba) best = (ba != ba || best != best) ? NAN : ba;
        }
    }
    j->amax = best;
    return NULL;
}

static void *encode_rows(void *arg) {
    job_t *j = (job_t *)arg;
    float lut[256];
    for (unsigned b = 0; b < 256; b++) lut[b] = ((b & 0x7F) == 0x7F) ? NAN : e4m3_value(b);
    const float g = j->gscale;
    const float six_g = 6.0f * g;
    int64_t nb = j->k / NV_BLOCK;
    for (int64_t i = j->r0; i < j->r1; i++) {
        const uint8_t *row = j->raw + i * j->k;
        uint8_t *out = j->packed + i * (j->k / 2);
        for (int64_t b = 0; b < nb; b++) {
            float s = block_scale(j, i, b * NV_BLOCK);
            float ba = j->block_amax[i * nb + b];
            uint8_t w = j->modelopt ? e4m3_rne(ba / six_g) : e4m3_rne(g * (ba / 6.0f));
            j->ws[i * nb + b] = w;
            float wf = ((w & 0x7F) == 0x7F) ? NAN : e4m3_value(w);
            float eff = j->modelopt ? wf * g : wf / g;
            float safe = (eff == 0.0f) ? 1.0f : eff;
            const uint8_t *x = row + b * NV_BLOCK;
            uint8_t *o = out + b * (NV_BLOCK / 2);
            for (int t = 0; t < NV_BLOCK; t += 2) {
                float q0 = (lut[x[t]] * s) / safe;
                float q1 = (lut[x[t + 1]] * s) / safe;
                o[t / 2] = (uint8_t)(e2m1_code(q0) | (e2m1_code(q1) << 4));
            }
        }
    }
    return NULL;
}

static void run_threads(job_t *base, int nthreads, void *(*fn)(void *), job_t *jobs) {
    int64_t n = base->n;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > n) nthreads = (int)(n > 0 ? n : 1);
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = *base;
        jobs[t].r0 = n * t / nthreads;
        jobs[t].r1 = n * (t + 1) / nthreads;
        started[t] = 0;
    }
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tid[t], NULL, fn, &jobs[t]) == 0;
    fn(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else fn(&jobs[t]); /* thread could not start: do its rows here */
    }
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
    int64_t nan_count = 0;
    int bad = 0;
    float best = 0.0f;
    int used = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    if (used > n) used = (int)(n > 0 ? n : 1);
    for (int t = 0; t < used; t++) {
        nan_count += jobs[t].nan_count;
        bad |= jobs[t].bad_scale;
        float a = jobs[t].amax;
        if (a != a || best != best) best = NAN;
        else if (a > best) best = a;
    }
    *amax_out = best;
    return bad ? -1 : nan_count;
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
