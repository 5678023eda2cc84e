/* bench-codec - the record codec's speed: the scalar reference against
 * every build of the lanes (codec_simd.c) this CPU runs, one run.
 *
 *   bench-codec [--tokens N] [--head-dim D] [--format q3|q4|i8] [--threads T]
 *
 * On N random keys and values shaped like a model's (outlier channels, a
 * mean), one thread each:
 *   encode     : K/V fp32 -> records + signatures (kvg_encode_isa)
 *   decode     : records -> K and V (kvg_decode_isa)
 *   stage2     : scores of the records at true positions for a GQA group
 *                of 4 query heads, as kvarcd's RerankLayer runs it
 *                (kvg_key_scores_pos_isa, angles from the byte table)
 *   stage2-rm  : the same in remapped position mode (no RoPE:
 *                kvg_key_scores_isa)
 * as ns per record and the ratio to the reference; then the chosen build's
 * encode on T threads (default: every CPU) as tokens per second of an
 * 8B-shaped model (32 layers x 8 KV heads = 256 records a token), the
 * issue's goal being 20000. Every build's output is checked against the
 * reference's before it is timed (exit 1 if one differs). */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvg.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float gauss(void)
{
    double u1 = ((double)(kvarc_splitmix64(&rng) >> 11) + 0.5) * 0x1p-53;
    double u2 = ((double)(kvarc_splitmix64(&rng) >> 11) + 0.5) * 0x1p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

typedef struct job {
    kvg_isa isa;
    const kvg_codec *c;
    const float *k, *v;
    size_t n;
    uint8_t *rec, *bits;
    uint16_t *ss;
    int d, rb;
} job;

static void *encode_job(void *arg)
{
    job *j = arg;
    if (kvg_encode_isa(j->isa, j->c, KVARC_DTYPE_F32, j->k, j->v, j->n, j->rec, j->bits, j->ss, NULL))
        fprintf(stderr, "bench-codec: encode failed\n");
    return NULL;
}

/* Encode j's tokens split over T threads. */
static void encode_threads(const job *j, int threads)
{
    job jobs[256];
    pthread_t th[256];
    int started[256];
    size_t per = (j->n + (size_t)threads - 1) / (size_t)threads;
    for (int i = 0; i < threads; i++) {
        size_t a = (size_t)i * per, m = a >= j->n ? 0 : (j->n - a < per ? j->n - a : per);
        jobs[i] = *j;
        jobs[i].k += a * (size_t)j->d;
        jobs[i].v += a * (size_t)j->d;
        jobs[i].n = m;
        jobs[i].rec += a * (size_t)j->rb;
        jobs[i].bits += a * (size_t)j->d / 8;
        jobs[i].ss += a;
        started[i] = pthread_create(&th[i], NULL, encode_job, &jobs[i]) == 0;
        if (!started[i])
            encode_job(&jobs[i]);
    }
    for (int i = 0; i < threads; i++)
        if (started[i])
            pthread_join(th[i], NULL);
}

/* Best of three runs of f over everything, in seconds. */
#define BEST3(t, stmt)                                                                                             \
    do {                                                                                                          \
        t = 1e30;                                                                                                 \
        for (int rep_ = 0; rep_ < 3; rep_++) {                                                                    \
            double t0_ = now();                                                                                   \
            stmt;                                                                                                 \
            double e_ = now() - t0_;                                                                              \
            if (e_ < t)                                                                                           \
                t = e_;                                                                                           \
        }                                                                                                         \
    } while (0)

int main(int argc, char **argv)
{
    size_t n = 65536;
    int d = 128, fmt = KVARC_FMT_Q3, threads = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            n = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--head-dim") && i + 1 < argc)
            d = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--format") && i + 1 < argc) {
            const kvarc_format_info *fi = kvarc_format_by_name(argv[++i]);
            if (!fi || !fi->rotated) {
                fprintf(stderr, "bench-codec: --format %s: not a quantized format (q3, q4, i8)\n", argv[i]);
                return 2;
            }
            fmt = fi->id;
        } else {
            fprintf(stderr, "usage: bench-codec [--tokens N] [--head-dim 64|128|256] [--format q3|q4|i8] "
                            "[--threads T]\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    if (kvarc_head_dim_check(d) || n < 1 || n > (1u << 24) || threads < 0 || threads > 256) {
        fprintf(stderr, "bench-codec: --head-dim must be 64, 128 or 256, --tokens 1..16777216, --threads 0..256\n");
        return 2;
    }
    if (!threads)
        threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    int rb = kvarc_record_bytes(fmt, d);
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, d, 42);
    float *k = malloc(n * (size_t)d * 4), *v = malloc(n * (size_t)d * 4), mu_k[KVARC_HEAD_DIM_MAX],
          mu_v[KVARC_HEAD_DIM_MAX];
    float *dk = malloc(n * (size_t)d * 4), *dv = malloc(n * (size_t)d * 4);
    float *dk2 = malloc(n * (size_t)d * 4), *dv2 = malloc(n * (size_t)d * 4);
    uint8_t *rec = malloc(n * (size_t)rb), *rec2 = malloc(n * (size_t)rb);
    uint8_t *bits = malloc(n * (size_t)d / 8), *bits2 = malloc(n * (size_t)d / 8);
    uint16_t *ss = malloc(n * 2), *ss2 = malloc(n * 2);
    uint64_t *pos = malloc(n * 8);
    float *sc = malloc(n * 4), *sc2 = malloc(n * 4), *sr = malloc(n * 4), q[4 * KVARC_HEAD_DIM_MAX];
    if (!k || !v || !dk || !dv || !dk2 || !dv2 || !rec || !rec2 || !bits || !bits2 || !ss || !ss2 || !pos || !sc ||
        !sc2 || !sr) {
        fprintf(stderr, "bench-codec: out of memory for %zu tokens\n", n);
        return 1;
    }
    for (int i = 0; i < d; i++) {
        mu_k[i] = 0.5f * (float)((i * 37) % 7 - 3);
        mu_v[i] = 0.1f * gauss();
    }
    for (size_t t = 0; t < n; t++) {
        for (int i = 0; i < d; i++) {
            float amp = (i % 29 == 3) ? 10.0f : 1.0f;
            k[t * (size_t)d + (size_t)i] = mu_k[i] + amp * gauss();
            v[t * (size_t)d + (size_t)i] = gauss();
        }
        pos[t] = 1000 + 16 * t;                       /* spread like a shortlist over 1M */
    }
    for (int i = 0; i < 4 * d; i++)
        q[i] = gauss();
    kvg_codec c = { fmt, &rot, mu_k, mu_v };
    kvg_rope rp;
    kvg_rope_table tb;
    if (kvg_rope_init(&rp, d, d, 0, 500000.0f) || kvg_rope_table_init(&tb, &rp)) {
        fprintf(stderr, "bench-codec: RoPE setup failed\n");
        return 1;
    }
    printf("bench-codec: head_dim %d, %s (%d B records), %zu tokens; best build here: %s\n", d,
           kvarc_format_get(fmt)->name, rb, n, kvg_codec_isa_name(kvg_codec_isa_best()));
    printf("  %-9s %-40s %12s %10s\n", "op", "build", "ns/record", "vs ref");
    double ref[4] = { 0, 0, 0, 0 };
    int bad = 0;
    kvg_encode_ref(&c, KVARC_DTYPE_F32, k, v, n, rec, bits, ss, NULL);
    kvg_decode_ref(&c, rec, n, dk, dv);
    kvg_key_scores_pos_ref(&c, &rp, &tb, q, 4, rec, pos, n, sc);
    kvg_key_scores_ref(&c, q, 4, rec, n, sr);
    for (int isa = KVG_ISA_REF; isa <= KVG_ISA_V4; isa++) {
        if (!kvg_codec_isa_supported((kvg_isa)isa))
            continue;
        double t[4];
        /* the bits first: a build that differs from the reference is not timed */
        kvg_encode_isa((kvg_isa)isa, &c, KVARC_DTYPE_F32, k, v, n, rec2, bits2, ss2, NULL);
        kvg_decode_isa((kvg_isa)isa, &c, rec, n, dk2, dv2);
        kvg_key_scores_pos_isa((kvg_isa)isa, &c, &rp, &tb, q, 4, rec, pos, n, sc2);
        if (memcmp(rec, rec2, n * (size_t)rb) || memcmp(bits, bits2, n * (size_t)d / 8) || memcmp(ss, ss2, n * 2) ||
            memcmp(dk, dk2, n * (size_t)d * 4) || memcmp(dv, dv2, n * (size_t)d * 4) || memcmp(sc, sc2, n * 4) ||
            (kvg_key_scores_isa((kvg_isa)isa, &c, q, 4, rec, n, sc2), memcmp(sr, sc2, n * 4))) {
            fprintf(stderr, "bench-codec: %s differs from the reference\n", kvg_codec_isa_name((kvg_isa)isa));
            bad = 1;
            continue;
        }
        BEST3(t[0], kvg_encode_isa((kvg_isa)isa, &c, KVARC_DTYPE_F32, k, v, n, rec2, bits2, ss2, NULL));
        BEST3(t[1], kvg_decode_isa((kvg_isa)isa, &c, rec, n, dk2, dv2));
        BEST3(t[2], kvg_key_scores_pos_isa((kvg_isa)isa, &c, &rp, &tb, q, 4, rec, pos, n, sc2));
        BEST3(t[3], kvg_key_scores_isa((kvg_isa)isa, &c, q, 4, rec, n, sc2));
        static const char *ops[4] = { "encode", "decode", "stage2", "stage2-rm" };
        for (int o = 0; o < 4; o++) {
            if (isa == KVG_ISA_REF)
                ref[o] = t[o];
            printf("  %-9s %-40s %12.1f %9.2fx\n", ops[o], kvg_codec_isa_name((kvg_isa)isa), 1e9 * t[o] / (double)n,
                   ref[o] / t[o]);
        }
    }
    /* the chosen build on T threads: the 8B shape's archiving rate */
    job base = { kvg_codec_isa_best(), &c, k, v, n, rec2, bits2, ss2, d, rb };
    double te;
    BEST3(te, encode_threads(&base, threads));
    double rps = (double)n / te;
    printf("  encode on %d thread%s (%s): %.0f records/s = %.0f tokens/s of the 8B shape (256 records a token; "
           "goal 20000)\n",
           threads, threads == 1 ? "" : "s", kvg_codec_isa_name(kvg_codec_isa_best()), rps, rps / 256.0);
    kvg_rope_table_free(&tb);
    free(k); free(v); free(dk); free(dv); free(dk2); free(dv2); free(rec); free(rec2);
    free(bits); free(bits2); free(ss); free(ss2); free(pos); free(sc); free(sc2); free(sr);
    return bad;
}
