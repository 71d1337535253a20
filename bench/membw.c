/* membw.c - memory read bandwidth, 1 and N threads (pthreads).
 *
 * Sums a >= 1 GiB buffer of uint64 several times per thread count and
 * reports the best pass in GB/s (1e9 bytes/s). Decode of a small LLM is
 * bound by reading the weights once per token, so
 *   decode ceiling (tok/s) ~= read bandwidth / bytes read per token.
 *
 * build: gcc -O3 -march=x86-64-v3 -pthread -o membw membw.c
 * run:   ./membw [--mib 1024] [--passes 5] [--threads 1,2] [--json]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const uint64_t *p;
    size_t n;
    uint64_t sum;
    pthread_barrier_t *bar;
} job_t;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* plain reduction: gcc -O3 -march=x86-64-v3 vectorises it to 256-bit loads
 * (vpaddq ymm), so the loop is bound by memory, not by the core */
static uint64_t sum_range(const uint64_t *restrict p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) s += p[i];
    return s;
}

static void *worker(void *arg) {
    job_t *j = arg;
    pthread_barrier_wait(j->bar);
    j->sum = sum_range(j->p, j->n);
    pthread_barrier_wait(j->bar);
    return NULL;
}

/* one pass with nt threads: returns seconds; the main thread times between
 * the two barriers */
static double pass(const uint64_t *buf, size_t n, int nt, uint64_t *out) {
    pthread_t th[64];
    job_t jobs[64];
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, nt + 1);
    size_t chunk = n / nt;
    for (int t = 0; t < nt; t++) {
        jobs[t].p = buf + t * chunk;
        jobs[t].n = (t == nt - 1) ? n - t * chunk : chunk;
        jobs[t].bar = &bar;
        pthread_create(&th[t], NULL, worker, &jobs[t]);
    }
    pthread_barrier_wait(&bar);
    double t0 = now();
    pthread_barrier_wait(&bar);
    double t1 = now();
    uint64_t s = 0;
    for (int t = 0; t < nt; t++) {
        pthread_join(th[t], NULL);
        s += jobs[t].sum;
    }
    pthread_barrier_destroy(&bar);
    *out = s;
    return t1 - t0;
}

int main(int argc, char **argv) {
    size_t mib = 1024;
    int passes = 5, json = 0;
    char threads_arg[128] = "1,2";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mib") && i + 1 < argc) mib = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--passes") && i + 1 < argc) passes = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            strncpy(threads_arg, argv[++i], sizeof threads_arg - 1);
        } else if (!strcmp(argv[i], "--json")) json = 1;
        else {
            fprintf(stderr, "usage: %s [--mib N>=1024] [--passes N] [--threads 1,2] [--json]\n", argv[0]);
            return 2;
        }
    }
    if (passes < 1) passes = 1;
    size_t bytes = mib << 20;
    size_t n = bytes / sizeof(uint64_t);
    uint64_t *buf;
    if (posix_memalign((void **)&buf, 4096, n * sizeof(uint64_t))) {
        fprintf(stderr, "alloc %zu MiB failed\n", mib);
        return 1;
    }
    for (size_t i = 0; i < n; i++) buf[i] = i * 2654435761u; /* fault in every page */

    uint64_t checksum = 0, s;
    if (json) printf("{\"buffer_mib\": %zu, \"passes\": %d, \"results\": [", mib, passes);
    int first = 1;
    char *save = NULL, *tok = strtok_r(threads_arg, ",", &save);
    for (; tok; tok = strtok_r(NULL, ",", &save)) {
        int nt = atoi(tok);
        if (nt < 1 || nt > 64) continue;
        pass(buf, n, nt, &s); /* warm-up */
        checksum ^= s;
        double best = 1e30, total = 0;
        for (int p = 0; p < passes; p++) {
            double t = pass(buf, n, nt, &s);
            checksum ^= s;
            total += t;
            if (t < best) best = t;
        }
        double gbs_best = bytes / best / 1e9, gbs_mean = bytes * passes / total / 1e9;
        if (json) {
            printf("%s{\"threads\": %d, \"best_gbs\": %.2f, \"mean_gbs\": %.2f}", first ? "" : ", ", nt,
                   gbs_best, gbs_mean);
        } else {
            printf("read bandwidth, %d thread%s: %.2f GB/s best, %.2f GB/s mean (%zu MiB x %d passes)\n", nt,
                   nt == 1 ? " " : "s", gbs_best, gbs_mean, mib, passes);
        }
        first = 0;
        fflush(stdout);
    }
    if (json) printf("], \"checksum\": %llu}\n", (unsigned long long)(checksum & 0xffff));
    free(buf);
    return 0;
}
