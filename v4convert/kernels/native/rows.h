/* Row-parallel launch shared by the C kernels of this folder (included by each .c; load_library hashes it too).
 *
 * V4C_DEFINE_RUN_THREADS(job_t, max_threads) defines
 *     static int run_threads(job_t *base, int nthreads, void *(*fn)(void *), job_t *jobs)
 * which copies *base into jobs[0..t) (t = nthreads clamped to [1, min(max_threads, n)]), gives job i the rows
 * [n*i/t, n*(i+1)/t) of base->n, runs job 0 on the calling thread and the others on pthreads (a thread that cannot
 * start has its rows run here afterwards), joins them and returns t. job_t must have int64_t fields n, r0, r1;
 * jobs must hold max_threads entries. */
#ifndef V4C_ROWS_H
#define V4C_ROWS_H
#include <pthread.h>
#include <stdint.h>

#define V4C_DEFINE_RUN_THREADS(job_type, max_threads)                                                        \
    static int run_threads(job_type *base, int nthreads, void *(*fn)(void *), job_type *jobs) {            \
        int64_t n = base->n;                                                                                 \
        if (nthreads < 1) nthreads = 1;                                                                      \
        if (nthreads > (max_threads)) nthreads = (max_threads);                                              \
        if (nthreads > n) nthreads = (int)(n > 0 ? n : 1);                                                   \
        pthread_t tid[(max_threads)];                                                                        \
        int started[(max_threads)];                                                                          \
        for (int t = 0; t < nthreads; t++) {                                                                 \
            jobs[t] = *base;                                                                                 \
            jobs[t].r0 = n * t / nthreads;                                                                   \
            jobs[t].r1 = n * (t + 1) / nthreads;                                                             \
            started[t] = 0;                                                                                  \
        }                                                                                                    \
        for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tid[t], NULL, fn, &jobs[t]) == 0;    \
        fn(&jobs[0]);                                                                                        \
        for (int t = 1; t < nthreads; t++) {                                                                 \
            if (started[t]) pthread_join(tid[t], NULL);                                                      \
            else fn(&jobs[t]);                                                                               \
        }                                                                                                    \
        return nthreads;                                                                                     \
    }

#endif
