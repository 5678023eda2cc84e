/* test_golden: every committed golden file (schema/golden/, *.golden) is
 * reproduced byte for byte: records, signatures, decoded K/V, prepared
 * query and both stage-1 scores; for kind-2 signatures (sig2_*), the
 * signatures at true positions, the turned query, the block biases and
 * the scores. Inputs are read from the file itself. */
#include <dirent.h>
#include <string.h>

#include "kvg.h"
#include "testutil.h"

#define MAXTOK 8

typedef struct golden {
    char format[16];
    int format_id, version, head_dim, tokens;
    unsigned long long seed;
    char dtype[8];
    uint8_t mu_k[1024], mu_v[1024], query[1024], q_scale[4], q_bias[4], q8[256], q_bits[32];
    uint8_t k[MAXTOK][1024], v[MAXTOK][1024], record[MAXTOK][1024], sig_bits[MAXTOK][32];
    uint8_t sig_scale[MAXTOK][2], dec_k[MAXTOK][1024], dec_v[MAXTOK][1024];
    uint8_t score_asym[MAXTOK * 4], score_hamming[MAXTOK * 4];
} golden;

/* Parse hex into out (at most cap bytes); returns byte count or -1. */
static long unhex(const char *s, uint8_t *out, size_t cap)
{
    size_t n = 0;
    while (s[0] && s[0] != '\n') {
        unsigned b;
        if (n >= cap || sscanf(s, "%2x", &b) != 1)
            return -1;
        out[n++] = (uint8_t)b;
        s += 2;
    }
    return (long)n;
}

static int load(const char *path, golden *g)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    static char line[16384];
    memset(g, 0, sizeof *g);
    int ok = 1;
    while (ok && fgets(line, sizeof line, f)) {
        char key[32];
        int idx, off;
        if (line[0] == '#' || sscanf(line, "%31s %n", key, &off) != 1)
            continue;
        const char *rest = line + off;
        struct { const char *name; uint8_t *dst; size_t cap; int indexed; } fields[] = {
            { "mu_k", g->mu_k, 1024, 0 }, { "mu_v", g->mu_v, 1024, 0 },
            { "query", g->query, 1024, 0 }, { "q_scale", g->q_scale, 4, 0 },
            { "q_bias", g->q_bias, 4, 0 }, { "q8", g->q8, 256, 0 }, { "q_bits", g->q_bits, 32, 0 },
            { "score_asym", g->score_asym, sizeof g->score_asym, 0 },
            { "score_hamming", g->score_hamming, sizeof g->score_hamming, 0 },
            { "k", g->k[0], 1024, 1 }, { "v", g->v[0], 1024, 1 },
            { "record", g->record[0], 1024, 1 }, { "sig_bits", g->sig_bits[0], 32, 1 },
            { "sig_scale", g->sig_scale[0], 2, 1 }, { "dec_k", g->dec_k[0], 1024, 1 },
            { "dec_v", g->dec_v[0], 1024, 1 },
        };
        int matched = 0;
        for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
            if (strcmp(key, fields[i].name))
                continue;
            matched = 1;
            uint8_t *dst = fields[i].dst;
            if (fields[i].indexed) {
                int o2;
                if (sscanf(rest, "%d %n", &idx, &o2) != 1 || idx < 0 || idx >= MAXTOK) {
                    ok = 0;
                    break;
                }
                dst += (size_t)idx * fields[i].cap;
                rest += o2;
            }
            ok = unhex(rest, dst, fields[i].cap) >= 0;
        }
        if (matched)
            continue;
        if (!strcmp(key, "format")) sscanf(rest, "%15s", g->format);
        else if (!strcmp(key, "format_id")) sscanf(rest, "%d", &g->format_id);
        else if (!strcmp(key, "version")) sscanf(rest, "%d", &g->version);
        else if (!strcmp(key, "head_dim")) sscanf(rest, "%d", &g->head_dim);
        else if (!strcmp(key, "tokens")) sscanf(rest, "%d", &g->tokens);
        else if (!strcmp(key, "seed")) sscanf(rest, "%llx", &g->seed);
        else if (!strcmp(key, "dtype")) sscanf(rest, "%7s", g->dtype);
        else ok = 0;
    }
    fclose(f);
    return ok && g->tokens > 0 && g->tokens <= MAXTOK ? 0 : -1;
}

static void check_file(const char *path)
{
    static golden g;
    if (load(path, &g)) {
        CHECK(0, "%s: unreadable or malformed golden file", path);
        return;
    }
    const kvarc_format_info *fi = kvarc_format_get(g.format_id);
    CHECK(fi && !strcmp(fi->name, g.format) && fi->version == g.version,
          "%s: format %s id %d version %d is not this build's", path, g.format, g.format_id, g.version);
    if (!fi)
        return;
    kvarc_dtype dt = !strcmp(g.dtype, "f16") ? KVARC_DTYPE_F16
                   : !strcmp(g.dtype, "bf16") ? KVARC_DTYPE_BF16 : KVARC_DTYPE_F32;
    int d = g.head_dim, n = g.tokens, rb = kvarc_record_bytes(fi->id, d);
    size_t es = kvarc_dtype_size(dt);
    kvarc_rotation rot;
    CHECK_RC(kvarc_rotation_init(&rot, d, g.seed), 0);
    float mu_k[KVARC_HEAD_DIM_MAX], mu_v[KVARC_HEAD_DIM_MAX], q[KVARC_HEAD_DIM_MAX];
    memcpy(mu_k, g.mu_k, (size_t)d * 4);
    memcpy(mu_v, g.mu_v, (size_t)d * 4);
    memcpy(q, g.query, (size_t)d * 4);
    static uint8_t k[MAXTOK * 1024], v[MAXTOK * 1024], rec[MAXTOK * 1024];
    for (int t = 0; t < n; t++) {
        memcpy(k + (size_t)t * d * es, g.k[t], (size_t)d * es);
        memcpy(v + (size_t)t * d * es, g.v[t], (size_t)d * es);
    }
    uint8_t bits[MAXTOK * 32];
    uint16_t ss[MAXTOK];
    float kd[MAXTOK * KVARC_HEAD_DIM_MAX], vd[MAXTOK * KVARC_HEAD_DIM_MAX], sc[MAXTOK];
    kvg_codec c = { fi->id, &rot, mu_k, mu_v };
    /* the reference and every build of the lanes this CPU runs (codec_simd.c) */
    for (int isa = KVG_ISA_REF; isa <= KVG_ISA_V4; isa++) {
        if (!kvg_codec_isa_supported((kvg_isa)isa))
            continue;
        memset(rec, 0xa5, sizeof rec);
        CHECK_RC(kvg_encode_isa((kvg_isa)isa, &c, dt, k, v, (size_t)n, rec, bits, ss, NULL), 0);
        CHECK_RC(kvg_decode_isa((kvg_isa)isa, &c, rec, (size_t)n, kd, vd), 0);
        int bad = 0;
        for (int t = 0; t < n; t++) {
            bad += memcmp(rec + (size_t)t * rb, g.record[t], (size_t)rb) != 0;
            bad += memcmp(bits + (size_t)t * d / 8, g.sig_bits[t], (size_t)d / 8) != 0;
            bad += memcmp(&ss[t], g.sig_scale[t], 2) != 0;
            bad += memcmp(kd + (size_t)t * d, g.dec_k[t], (size_t)d * 4) != 0;
            bad += memcmp(vd + (size_t)t * d, g.dec_v[t], (size_t)d * 4) != 0;
        }
        CHECK(bad == 0, "%s: %s: %d token outputs differ from the golden bytes", path,
              kvg_codec_isa_name((kvg_isa)isa), bad);
    }
    kvg_query qp;
    CHECK_RC(kvg_query_prep_ref(&rot, mu_k, KVARC_DTYPE_F32, q, &qp), 0);
    CHECK(!memcmp(&qp.qscale, g.q_scale, 4) && !memcmp(&qp.bias, g.q_bias, 4) &&
          !memcmp(qp.q8, g.q8, (size_t)d) && !memcmp(qp.bits, g.q_bits, (size_t)d / 8),
          "%s: prepared query differs", path);
    CHECK_RC(kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, &qp, 1, bits, ss, (size_t)n, sc), 0);
    CHECK(!memcmp(sc, g.score_asym, (size_t)n * 4), "%s: asymmetric scores differ", path);
    CHECK_RC(kvg_score_ref(KVG_SCORE_HAMMING, KVG_COMBINE_MAX, &qp, 1, bits, ss, (size_t)n, sc), 0);
    CHECK(!memcmp(sc, g.score_hamming, (size_t)n * 4), "%s: Hamming scores differ", path);
}

/* A kind-2 (true-position) signature file: signatures of the keys at
 * their positions, the turned and prepared query, the block biases and the
 * scores, all recomputed from the file's inputs. */
static void check_sig2(const char *path)
{
    FILE *f = fopen(path, "r");
    static char line[16384];
    int d = 0, rotary = -1, layout = -1, n = 0, kind = 0, ok = f != NULL;
    unsigned long long seed = 0, first_pos = 0, q_pos = 0;
    static uint8_t mu[1024], k[MAXTOK][1024], bits[MAXTOK][32], ss[MAXTOK][2], q[1024], qt[1024];
    uint8_t theta[4] = { 0 }, qscale[4], q8[256], bb[8], score[MAXTOK * 4];
    while (ok && fgets(line, sizeof line, f)) {
        char key[32];
        int off, idx, o2;
        if (line[0] == '#' || sscanf(line, "%31s %n", key, &off) != 1)
            continue;
        const char *r = line + off;
        struct { const char *name; uint8_t *dst; size_t cap; } one[] = {
            { "rope_theta", theta, 4 }, { "mu_k", mu, 1024 }, { "query", q, 1024 }, { "q_turned", qt, 1024 },
            { "q_scale", qscale, 4 }, { "q8", q8, 256 }, { "block_bias", bb, 8 }, { "score_asym", score, sizeof score },
        }, per[] = { { "k", k[0], 1024 }, { "sig_bits", bits[0], 32 }, { "sig_scale", ss[0], 2 } };
        int matched = 0;
        for (size_t i = 0; i < sizeof one / sizeof one[0] && !matched; i++)
            if (!strcmp(key, one[i].name))
                matched = 1, ok = unhex(r, one[i].dst, one[i].cap) >= 0;
        for (size_t i = 0; i < sizeof per / sizeof per[0] && !matched; i++)
            if (!strcmp(key, per[i].name)) {
                matched = 1;
                ok = sscanf(r, "%d %n", &idx, &o2) == 1 && idx >= 0 && idx < MAXTOK &&
                     unhex(r + o2, per[i].dst + (size_t)idx * per[i].cap, per[i].cap) >= 0;
            }
        if (matched) continue;
        if (!strcmp(key, "signature_kind")) sscanf(r, "%d", &kind);
        else if (!strcmp(key, "head_dim")) sscanf(r, "%d", &d);
        else if (!strcmp(key, "seed")) sscanf(r, "%llx", &seed);
        else if (!strcmp(key, "rotary_dims")) sscanf(r, "%d", &rotary);
        else if (!strcmp(key, "rope_layout")) sscanf(r, "%d", &layout);
        else if (!strcmp(key, "first_pos")) sscanf(r, "%llu", &first_pos);
        else if (!strcmp(key, "query_pos")) sscanf(r, "%llu", &q_pos);
        else if (!strcmp(key, "tokens")) sscanf(r, "%d", &n);
        else ok = 0;
    }
    if (f)
        fclose(f);
    CHECK(ok && kind == 2 && n > 0 && n <= MAXTOK && rotary >= 0 && layout >= 0, "%s: malformed kind-2 file", path);
    kvarc_rotation rot;
    kvg_rope rope;
    float th;
    memcpy(&th, theta, 4);
    if (!ok || kvarc_rotation_init(&rot, d, seed) || kvg_rope_init(&rope, d, rotary, layout, th)) {
        CHECK(0, "%s: head_dim %d / RoPE not accepted", path, d);
        return;
    }
    float kf[MAXTOK * KVARC_HEAD_DIM_MAX], muf[KVARC_HEAD_DIM_MAX], qf[KVARC_HEAD_DIM_MAX], sc[MAXTOK], b2[2];
    memcpy(muf, mu, (size_t)d * 4);
    memcpy(qf, q, (size_t)d * 4);
    for (int t = 0; t < n; t++)
        memcpy(kf + t * d, k[t], (size_t)d * 4);
    uint8_t ob[MAXTOK * 32];
    uint16_t os[MAXTOK];
    CHECK_RC(kvg_sig_pos_ref(&rope, &rot, muf, kf, first_pos, (size_t)n, ob, os, NULL), 0);
    int bad = 0;
    for (int t = 0; t < n; t++)
        bad += memcmp(ob + (size_t)t * d / 8, bits[t], (size_t)d / 8) != 0 || memcmp(&os[t], ss[t], 2) != 0;
    CHECK(bad == 0, "%s: %d kind-2 signatures differ from the golden bytes", path, bad);
    kvg_rope_apply(qf, d, rope.rotary_dims, rope.layout, rope.inv_freq, (double)q_pos);
    CHECK(!memcmp(qf, qt, (size_t)d * 4), "%s: the query turned to its position differs", path);
    kvg_query qp;
    CHECK_RC(kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, qf, &qp), 0);
    CHECK(!memcmp(&qp.qscale, qscale, 4) && !memcmp(qp.q8, q8, (size_t)d), "%s: prepared query differs", path);
    kvg_block_bias_ref(&rope, muf, qf, first_pos / KVG_SIG_BLOCK, 2, NULL, 0, b2);
    CHECK(!memcmp(b2, bb, 8), "%s: block biases differ", path);
    CHECK_RC(kvg_score_pos_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, &qp, 1, ob, os, (size_t)n, first_pos, b2, 2, sc), 0);
    CHECK(!memcmp(sc, score, (size_t)n * 4), "%s: kind-2 scores differ", path);
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "schema/golden";
    DIR *dp = opendir(dir);
    if (!dp) {
        fprintf(stderr, "test_golden: cannot open %s\n", dir);
        return 1;
    }
    int files = 0, sig2 = 0;
    struct dirent *de;
    while ((de = readdir(dp))) {
        size_t l = strlen(de->d_name);
        if (l < 8 || strcmp(de->d_name + l - 7, ".golden"))
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (!strncmp(de->d_name, "sig2_", 5)) {
            check_sig2(path);
            sig2++;
        } else {
            check_file(path);
            files++;
        }
    }
    closedir(dp);
    CHECK(files == 15, "expected 15 golden files (5 formats x 3 head_dims), found %d", files);
    CHECK(sig2 == 3, "expected 3 kind-2 signature golden files (3 head_dims), found %d", sig2);
    return tu_finish("test_golden");
}
