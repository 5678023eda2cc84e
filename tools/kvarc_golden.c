/* kvarc-golden - writes the golden test vectors of every record format.
 *
 *   kvarc-golden OUTDIR        write OUTDIR/<format>_d<head_dim>.golden
 *                              and OUTDIR/sig2_d<head_dim>.golden
 *
 * Each file is self-contained text (SCHEMA.md section 8): the inputs (as
 * their exact bytes, in hex) and every output the kernels must reproduce
 * byte for byte: records, signature bits and scales, decoded K and V,
 * the prepared query and its asymmetric and Hamming scores. Inputs come
 * from splitmix64 seeded with GOLDEN_SEED, so the tool is reproducible;
 * the test (tests/test_golden.c) reads the inputs from the file, not from
 * this generator, so another implementation needs only the file. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvg.h"

#define GOLDEN_SEED 0x6b76617263ull   /* "kvarc" */
#define NTOK 8

static uint64_t rng_state;

static float gauss(void)
{
    double u1 = ((double)(kvarc_splitmix64(&rng_state) >> 11) + 0.5) * 0x1p-53;
    double u2 = ((double)(kvarc_splitmix64(&rng_state) >> 11) + 0.5) * 0x1p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static void hex(FILE *f, const char *key, long idx, const void *p, size_t n)
{
    const uint8_t *b = p;
    if (idx >= 0)
        fprintf(f, "%s %ld ", key, idx);
    else
        fprintf(f, "%s ", key);
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%02x", b[i]);
    fputc('\n', f);
}

static int write_one(const char *dir, const kvarc_format_info *fi, int d)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s_d%d.golden", dir, fi->name, d);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "kvarc-golden: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    kvarc_dtype dt = fi->id == KVARC_FMT_F16 ? KVARC_DTYPE_F16
                   : fi->id == KVARC_FMT_BF16 ? KVARC_DTYPE_BF16 : KVARC_DTYPE_F32;
    uint64_t seed = GOLDEN_SEED ^ ((uint64_t)fi->id << 32) ^ (uint64_t)d;
    rng_state = seed;
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, d, seed);
    size_t es = kvarc_dtype_size(dt);
    float mu_k[KVARC_HEAD_DIM_MAX], mu_v[KVARC_HEAD_DIM_MAX], q[KVARC_HEAD_DIM_MAX];
    uint8_t k[NTOK * KVARC_HEAD_DIM_MAX * 4], v[NTOK * KVARC_HEAD_DIM_MAX * 4];
    for (int i = 0; i < d; i++) {
        mu_k[i] = 0.5f * gauss();
        mu_v[i] = 0.1f * gauss();
        q[i] = gauss();
    }
    for (int t = 0; t < NTOK; t++)
        for (int i = 0; i < d; i++) {
            float amp = (i % 29 == 3) ? 8.0f : 1.0f;       /* outlier channels */
            float kx = mu_k[i] + amp * gauss(), vx = mu_v[i] + gauss();
            if (t == 5)                                    /* a token equal to the mean */
                kx = mu_k[i], vx = mu_v[i];
            kvarc_store_f32(dt, k, (size_t)t * d + i, kx);
            kvarc_store_f32(dt, v, (size_t)t * d + i, vx);
        }
    /* the codec centers what it is given; a token equal to the mean in the
     * input dtype needs the mean in that dtype too */
    for (int i = 0; i < d; i++) {
        mu_k[i] = kvarc_load_f32(dt, k, (size_t)5 * d + i);
        mu_v[i] = kvarc_load_f32(dt, v, (size_t)5 * d + i);
    }
    int rb = kvarc_record_bytes(fi->id, d);
    uint8_t rec[NTOK * 1024], bits[NTOK * KVARC_HEAD_DIM_MAX / 8];
    uint16_t ss[NTOK];
    float kd[NTOK * KVARC_HEAD_DIM_MAX], vd[NTOK * KVARC_HEAD_DIM_MAX], sc[NTOK];
    kvg_codec c = { fi->id, &rot, mu_k, mu_v };
    kvg_query qp;
    int rc = kvg_encode_ref(&c, dt, k, v, NTOK, rec, bits, ss, NULL);
    if (!rc)
        rc = kvg_decode_ref(&c, rec, NTOK, kd, vd);
    if (!rc)
        rc = kvg_query_prep_ref(&rot, mu_k, KVARC_DTYPE_F32, q, &qp);
    if (rc) {
        fprintf(stderr, "kvarc-golden: %s d%d: %s\n", fi->name, d, kvarc_strerror(rc));
        fclose(f);
        return 1;
    }
    fprintf(f, "# kvarc golden vectors, written by kvarc-golden (tools/kvarc_golden.c).\n"
               "# Regenerate only with a format version bump. Layout: schema/SCHEMA.md section 8.\n");
    fprintf(f, "format %s\nformat_id %d\nversion %d\nhead_dim %d\nseed %016llx\ndtype %s\n"
               "tokens %d\n", fi->name, fi->id, fi->version, d, (unsigned long long)seed,
            kvarc_dtype_name(dt), NTOK);
    hex(f, "mu_k", -1, mu_k, (size_t)d * 4);
    hex(f, "mu_v", -1, mu_v, (size_t)d * 4);
    for (int t = 0; t < NTOK; t++) {
        hex(f, "k", t, k + (size_t)t * d * es, (size_t)d * es);
        hex(f, "v", t, v + (size_t)t * d * es, (size_t)d * es);
    }
    for (int t = 0; t < NTOK; t++) {
        hex(f, "record", t, rec + (size_t)t * rb, (size_t)rb);
        hex(f, "sig_bits", t, bits + (size_t)t * d / 8, (size_t)d / 8);
        hex(f, "sig_scale", t, &ss[t], 2);
        hex(f, "dec_k", t, kd + (size_t)t * d, (size_t)d * 4);
        hex(f, "dec_v", t, vd + (size_t)t * d, (size_t)d * 4);
    }
    hex(f, "query", -1, q, (size_t)d * 4);
    hex(f, "q_scale", -1, &qp.qscale, 4);
    hex(f, "q_bias", -1, &qp.bias, 4);
    hex(f, "q8", -1, qp.q8, (size_t)d);
    hex(f, "q_bits", -1, qp.bits, (size_t)d / 8);
    kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, &qp, 1, bits, ss, NTOK, sc);
    hex(f, "score_asym", -1, sc, sizeof sc);
    kvg_score_ref(KVG_SCORE_HAMMING, KVG_COMBINE_MAX, &qp, 1, bits, ss, NTOK, sc);
    hex(f, "score_hamming", -1, sc, sizeof sc);
    if (fclose(f)) {
        fprintf(stderr, "kvarc-golden: writing %s: %s\n", path, strerror(errno));
        return 1;
    }
    printf("wrote %s\n", path);
    return 0;
}

/* Kind-2 (true-position) signatures, SCHEMA.md section 6.2: one file per
 * head_dim, each with its own RoPE (interleaved pairs at 64, all dims at
 * 128, a partial rotary at 256 so some dimensions never turn), tokens
 * spanning a signature-block boundary near position 1M. */
static int write_sig2(const char *dir, int d)
{
    static const struct { int rotary, layout; float theta; } cfg[] = {
        { 64, 1, 10000.0f }, { 128, 0, 500000.0f }, { 128, 0, 1000000.0f } };
    int ci = d == 64 ? 0 : d == 128 ? 1 : 2;
    char path[4096];
    snprintf(path, sizeof path, "%s/sig2_d%d.golden", dir, d);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "kvarc-golden: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    uint64_t seed = GOLDEN_SEED ^ 0x5167320000ull ^ (uint64_t)d;
    const uint64_t first_pos = 999997, q_pos = 1048581;       /* blocks 15624 and 15625 */
    rng_state = seed;
    kvarc_rotation rot;
    kvg_rope rope;
    kvarc_rotation_init(&rot, d, seed);
    int rc = kvg_rope_init(&rope, d, cfg[ci].rotary, cfg[ci].layout, cfg[ci].theta);
    float mu_k[KVARC_HEAD_DIM_MAX], q[KVARC_HEAD_DIM_MAX], qr[KVARC_HEAD_DIM_MAX], k[NTOK * KVARC_HEAD_DIM_MAX];
    for (int i = 0; i < d; i++) {
        mu_k[i] = (i % 13 == 5 ? 4.0f : 0.5f) * gauss();
        q[i] = gauss();
    }
    for (int t = 0; t < NTOK; t++)
        for (int i = 0; i < d; i++)
            k[t * d + i] = mu_k[i] + ((i % 29 == 3) ? 8.0f : 1.0f) * gauss();
    uint8_t bits[NTOK * KVARC_HEAD_DIM_MAX / 8];
    uint16_t ss[NTOK];
    float bb[2], sc[NTOK];
    kvg_query qp;
    if (!rc)
        rc = kvg_sig_pos_ref(&rope, &rot, mu_k, k, first_pos, NTOK, bits, ss, NULL);
    memcpy(qr, q, sizeof qr);
    kvg_rope_apply(qr, d, rope.rotary_dims, rope.layout, rope.inv_freq, (double)q_pos);
    if (!rc)
        rc = kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, qr, &qp);
    kvg_block_bias_ref(&rope, mu_k, qr, first_pos / KVG_SIG_BLOCK, 2, NULL, 0, bb);
    if (!rc)
        rc = kvg_score_pos_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, &qp, 1, bits, ss, NTOK, first_pos, bb, 2, sc);
    if (rc) {
        fprintf(stderr, "kvarc-golden: sig2 d%d: %s\n", d, kvarc_strerror(rc));
        fclose(f);
        return 1;
    }
    fprintf(f, "# kvarc golden vectors of kind-2 (true-position) signatures, written by kvarc-golden.\n"
               "# Regenerate only with a signature kind bump. Layout: schema/SCHEMA.md section 8.\n");
    fprintf(f, "signature_kind 2\nhead_dim %d\nseed %016llx\nrotary_dims %d\nrope_layout %d\n",
            d, (unsigned long long)seed, cfg[ci].rotary, cfg[ci].layout);
    hex(f, "rope_theta", -1, &cfg[ci].theta, 4);
    fprintf(f, "first_pos %llu\nquery_pos %llu\ntokens %d\n", (unsigned long long)first_pos,
            (unsigned long long)q_pos, NTOK);
    hex(f, "mu_k", -1, mu_k, (size_t)d * 4);
    for (int t = 0; t < NTOK; t++)
        hex(f, "k", t, k + t * d, (size_t)d * 4);
    for (int t = 0; t < NTOK; t++) {
        hex(f, "sig_bits", t, bits + (size_t)t * d / 8, (size_t)d / 8);
        hex(f, "sig_scale", t, &ss[t], 2);
    }
    hex(f, "query", -1, q, (size_t)d * 4);
    hex(f, "q_turned", -1, qr, (size_t)d * 4);
    hex(f, "q_scale", -1, &qp.qscale, 4);
    hex(f, "q8", -1, qp.q8, (size_t)d);
    hex(f, "block_bias", -1, bb, sizeof bb);
    hex(f, "score_asym", -1, sc, sizeof sc);
    if (fclose(f)) {
        fprintf(stderr, "kvarc-golden: writing %s: %s\n", path, strerror(errno));
        return 1;
    }
    printf("wrote %s\n", path);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fprintf(argc == 2 ? stdout : stderr,
                "usage: kvarc-golden OUTDIR\n"
                "Writes OUTDIR/<format>_d<head_dim>.golden for every record format and\n"
                "head_dim 64, 128, 256, and OUTDIR/sig2_d<head_dim>.golden for kind-2\n"
                "(true-position) signatures (the committed copies live in schema/golden/).\n");
        return argc == 2 ? 0 : 2;
    }
    static const int dims[] = { 64, 128, 256 };
    int bad = 0;
    for (int fmt = KVARC_FMT_Q3; fmt <= KVARC_FMT_BF16; fmt++)
        for (int di = 0; di < 3; di++)
            bad |= write_one(argv[1], kvarc_format_get(fmt), dims[di]);
    for (int di = 0; di < 3; di++)
        bad |= write_sig2(argv[1], dims[di]);
    return bad;
}
