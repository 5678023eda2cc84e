/* test_libkvarc: libkvarc against a real kvarcd on a unix socket.
 *  - equivalence gate: lossless f16 records and top_k >= the cold tokens
 *    give full causal attention (RoPE, GQA 4) to fp32 tolerance, at decode
 *    steps before, at and long after the hot window fills, in both
 *    position modes' true-position equivalent (true mode);
 *  - a prefill chunk (n_q = 100) equals full causal attention per query;
 *  - a chunk split into 100 query groups by a tiny record cache (q3, top_k
 *    16) gives the same output bits as one group;
 *  - consecutive steps hit the record cache (records not resent);
 *  - a second worker attaching after a sync continues exactly: same
 *    lengths, the next step's output equal to the first worker's;
 *  - fork through the handle, attach to the fork; a shape mismatch names
 *    both sides; bad calls are refused with a message. */
#include <math.h>

#include "kvarcd_util.h"
#include "kvarc.h"
#include "../client/kvarc_internal.h"
#ifdef KVARC_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif
#include "kvg.h"

#define L 2
#define H 2
#define QH 8
#define D 64
#define N 420

static float K[L][H][N][D], V[L][H][N][D], Q[L][QH][N][D];

/* Causal attention of query t (pre-RoPE Q[l][*][t]) over the tokens j <= t
 * with j < sinks or j >= lo (sinks = lo = 0: every token). */
static void window_attention(int l, int t, int sinks, int lo, float *out)
{
    static float kr[N][D];
    for (int hq = 0; hq < QH; hq++) {
        int h = hq / (QH / H);
        float qv[D];
        memcpy(qv, Q[l][hq][t], sizeof qv);
        kvg_rope_ref(qv, D, D, 0, 10000.0f, t);
        double m = -INFINITY, sum = 0, acc[D] = { 0 };
        double *lg = malloc(sizeof(double) * (size_t)(t + 1));
        for (int j = 0; j <= t; j++) {
            lg[j] = -INFINITY;
            if (j >= sinks && j < lo)
                continue;
            memcpy(kr[j], K[l][h][j], sizeof kr[j]);
            kvg_rope_ref(kr[j], D, D, 0, 10000.0f, j);
            double s = 0;
            for (int i = 0; i < D; i++)
                s += (double)qv[i] * kr[j][i];
            lg[j] = s / sqrt((double)D);
            if (lg[j] > m)
                m = lg[j];
        }
        for (int j = 0; j <= t; j++) {
            if (j >= sinks && j < lo)
                continue;
            double w = exp(lg[j] - m);
            sum += w;
            for (int i = 0; i < D; i++)
                acc[i] += w * V[l][h][j][i];
        }
        for (int i = 0; i < D; i++)
            out[hq * D + i] = (float)(acc[i] / sum);
        free(lg);
    }
}

static float max_rel(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0, worst = 0;
    for (size_t i = 0; i < n; i++) {
        num += (double)(a[i] - b[i]) * (a[i] - b[i]);
        den += (double)b[i] * b[i];
        if (fabs(a[i] - b[i]) > worst)
            worst = fabs(a[i] - b[i]);
    }
    return (float)sqrt(num / (den + 1e-30));
}

static void full_attention(int l, int t, float *out)
{
    window_attention(l, t, 0, 0, out);
}

/* Append token t (or tokens [t, t + n)) to every layer of cv. */
static int append_tokens(kvarc_conv *cv, int t, int n)
{
    static float kb[H * N * D], vb[H * N * D];
    for (int l = 0; l < L; l++) {
        for (int h = 0; h < H; h++)
            for (int i = 0; i < n; i++) {
                memcpy(kb + ((size_t)h * n + i) * D, K[l][h][t + i], D * 4);
                memcpy(vb + ((size_t)h * n + i) * D, V[l][h][t + i], D * 4);
            }
        int rc = kvarc_append(cv, (uint32_t)l, KVARC_DTYPE_F32, kb, vb, (uint32_t)n);
        if (rc)
            return rc;
    }
    return 0;
}

/* 1 if conversations a and b store the same records of positions [0, n)
 * of every layer and head (Fetch over the raw transport). */
static int same_records(kvc_conn *k, uint64_t a, uint64_t b, size_t n)
{
    static uint64_t pos[1024];
    char msg[256];
    int same = n <= 1024;
    for (size_t i = 0; same && i < n; i++)
        pos[i] = i;
    for (int l = 0; same && l < L; l++)
        for (int h = 0; same && h < H; h++) {
            ProtobufCMessage *ra = NULL, *rb = NULL;
            Kvarc__V1__FetchRequest fr = KVARC__V1__FETCH_REQUEST__INIT;
            fr.layer = (uint32_t)l;
            fr.head = (uint32_t)h;
            fr.n_positions = n;
            fr.positions = pos;
            fr.conv = a;
            int s1 = kvc_call(k, "Fetch", &fr.base, &kvarc__v1__fetch_reply__descriptor, &ra, 0, msg, sizeof msg);
            fr.conv = b;
            int s2 = kvc_call(k, "Fetch", &fr.base, &kvarc__v1__fetch_reply__descriptor, &rb, 0, msg, sizeof msg);
            Kvarc__V1__FetchReply *fa = (Kvarc__V1__FetchReply *)ra, *fb = (Kvarc__V1__FetchReply *)rb;
            same = !s1 && !s2 && fa->records.len == fb->records.len && fa->records.len > 0 &&
                   !memcmp(fa->records.data, fb->records.data, fa->records.len);
            if (ra)
                protobuf_c_message_free_unpacked(ra, NULL);
            if (rb)
                protobuf_c_message_free_unpacked(rb, NULL);
        }
    return same;
}

/* Decode-step attention of token t on layer l (t must be the last appended). */
static int attend_step(kvarc_conv *cv, int l, int t, float *out)
{
    static float qb[QH * D];
    for (int hq = 0; hq < QH; hq++)
        memcpy(qb + hq * D, Q[l][hq][t], D * 4);
    return kvarc_attend(cv, (uint32_t)l, qb, 1, out);
}

/* The prefill cases' tokens: 0..300 in calls of 100, then 2, then a chunk of 100. */
static int append_402(kvarc_conv *cv)
{
    int rc = 0;
    for (int t0 = 0; t0 < 300 && !rc; t0 += 100)
        rc = append_tokens(cv, t0, 100);
    rc = rc ? rc : append_tokens(cv, 300, 2);
    return rc ? rc : append_tokens(cv, 302, 100);
}

/* The internal id of lib/name (an Open over the raw connection), 0 if it fails. */
static uint64_t conv_id(kvc_conn *k, const char *name)
{
    Kvarc__V1__OpenRequest orq = KVARC__V1__OPEN_REQUEST__INIT;
    orq.ns = "lib";
    orq.name = (char *)name;
    ProtobufCMessage *rep = NULL;
    char msg[256];
    CHECK_RC(kvc_call(k, "Open", &orq.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg), 0);
    uint64_t id = rep ? ((Kvarc__V1__ConvReply *)rep)->info->id : 0;
    if (rep)
        protobuf_c_message_free_unpacked(rep, NULL);
    return id;
}

int main(void)
{
    eu_tmpdir(dir, sizeof dir, "libkvarc");
    tu_rng rng = { 99 };
    for (int l = 0; l < L; l++) {      /* f16-representable values: f16 records hold them exactly */
        for (int h = 0; h < H; h++)
            for (int t = 0; t < N; t++)
                for (int i = 0; i < D; i++) {
                    K[l][h][t][i] = kvarc_f16_to_f32(kvarc_f32_to_f16(tu_gauss(&rng) + (i == 3 ? 2.0f : 0.0f)));
                    V[l][h][t][i] = kvarc_f16_to_f32(kvarc_f32_to_f16(tu_gauss(&rng)));
                }
        for (int hq = 0; hq < QH; hq++)
            for (int t = 0; t < N; t++)
                for (int i = 0; i < D; i++)
                    Q[l][hq][t][i] = 0.5f * tu_gauss(&rng);
    }
    {   /* an archive written before kind-2 signatures: a true-position conversation with
         * position-mode byte 0, as an older kvarcd stored it (the engine still takes it) */
        kvd_options eo = { .dir = dir };
        kvd_engine *e;
        kvd_err ee = { 0 };
        kvd_shape s0;
        memset(&s0, 0, sizeof s0);
        s0.n_layers = L;
        s0.n_kv_heads = H;
        s0.n_q_heads = QH;
        s0.head_dim = D;
        s0.format = KVARC_FMT_Q3;
        s0.pos_mode = KVARC_POS_TRUE_FREE;
        s0.dtype = KVARC_DTYPE_F32;
        s0.rotary_dims = D;
        s0.rope_theta = 10000.0f;
        s0.seed = 7;
        snprintf(s0.fingerprint, sizeof s0.fingerprint, "toy-gqa");
        kvd_conv_info ci0;
        CHECK_RC(kvd_open(&eo, &e, &ee), 0);
        CHECK_RC(kvd_conv_create(e, "lib", "kind0", &s0, NULL, &ci0, &ee), 0);
        kvd_close(e);
    }
    pid_t pid = start_daemon();
    kvc_conn *probe;
    CHECK_RC(kvc_connect(dir, &probe), 0);
    CHECK(wait_ready(probe), "kvarcd ready");
    kvc_close(probe);
    kvarc_client *cl, *cl2;
    CHECK_RC(kvarc_client_open(dir, NULL, NULL, &cl), 0);
    CHECK_RC(kvarc_client_open(dir, NULL, NULL, &cl2), 0);
    if (tu_failures) {
        kill(pid, SIGKILL);
        return tu_finish("test_libkvarc");
    }
    kvarc_model m = { L, H, QH, D, KVARC_DTYPE_F32, 10000.0f, D, 0, "toy-gqa" };
    kvarc_options o;
    kvarc_options_default(&o);
    o.format = KVARC_FMT_F16;
    o.sinks = 4;
    o.hot_window = 64;
    o.batch = 16;
    o.top_k = 4096;            /* >= every cold token: retrieval is exhaustive */
    o.shortlist = 1;
    o.max_chunk = 128;
    kvarc_conv *cv;
    CHECK_RC(kvarc_conv_create(cl, "lib", "gate", &m, &o, NULL, &cv), 0);
    if (tu_failures) {
        kill(pid, SIGKILL);
        return tu_finish("test_libkvarc");
    }

    /* decode steps: the equivalence gate */
    float out[QH * D], ref[QH * D];
    static const int checks[] = { 0, 1, 3, 4, 40, 67, 68, 69, 150, 299 };
    size_t ci = 0;
    float worst = 0;
    kvarc_stats st0, st1;
    for (int t = 0; t < 300; t++) {
        CHECK_RC(append_tokens(cv, t, 1), 0);
        if (ci < sizeof checks / sizeof checks[0] && checks[ci] == t) {
            ci++;
            for (int l = 0; l < L; l++) {
                if (t == 299 && l == 0)
                    kvarc_conv_stats(cv, &st0);
                int rc = attend_step(cv, l, t, out);
                CHECK(rc == 0, "attend at %d layer %d: %s", t, l, kvarc_errmsg(cv));
                full_attention(l, t, ref);
                float e = max_rel(out, ref, QH * D);
                if (e > worst)
                    worst = e;
                CHECK(e < 2e-5f, "token %d layer %d: relative error %.3g vs full attention", t, l, e);
            }
        }
    }
    printf("  equivalence gate: worst relative error %.3g over %zu steps x %d layers\n", worst, ci, L);
    kvarc_conv_stats(cv, &st1);
    CHECK(st1.records_fetched > 0 && st1.archived == 300 * L - (300 % 16) * L,
          "archived %llu (batches of 16), fetched %llu", (unsigned long long)st1.archived,
          (unsigned long long)st1.records_fetched);
    /* the step after: mostly cache hits */
    CHECK_RC(append_tokens(cv, 300, 1), 0);
    kvarc_conv_stats(cv, &st0);
    CHECK_RC(attend_step(cv, 0, 300, out), 0);
    kvarc_conv_stats(cv, &st1);
    CHECK(st1.cache_hits - st0.cache_hits >= 2 * 200 && st1.records_fetched - st0.records_fetched <= 2 * 2,
          "a repeated step is served from the cache: %llu hits, %llu fetched",
          (unsigned long long)(st1.cache_hits - st0.cache_hits),
          (unsigned long long)(st1.records_fetched - st0.records_fetched));

    /* top_k 0: no retrieval at all, the sinks and the hot window only (the
     * ablation of the passkey test), nothing fetched */
    {
        kvarc_options o0 = o;
        o0.top_k = 0;
        kvarc_conv *cz;
        CHECK_RC(kvarc_conv_create(cl, "lib", "no-retrieval", &m, &o0, NULL, &cz), 0);
        CHECK_RC(append_tokens(cz, 0, 200), 0);
        kvarc_stats sz;
        for (int l = 0; l < L && !tu_failures; l++) {
            CHECK_RC(attend_step(cz, l, 199, out), 0);
            window_attention(l, 199, 4, 199 - 64, ref);
            CHECK(max_rel(out, ref, QH * D) < 2e-5f, "top_k 0 attends to the sinks and the hot window only "
                  "(layer %d, error %.3g)", l, max_rel(out, ref, QH * D));
        }
        kvarc_conv_stats(cz, &sz);
        uint64_t rp;
        CHECK(sz.records_fetched == 0 && kvarc_last_retrieved(cz, 0, &rp, 1) == 0, "top_k 0 fetches nothing");
        CHECK_RC(kvarc_conv_close(cz), 0);
    }

    /* a second worker attaches to a fork taken after a sync and continues
     * exactly where the first one is (one writer per conversation) */
    int rc = kvarc_fork(cv, "lib", "gate-b", 0);
    CHECK(rc == 0, "fork: %s", kvarc_errmsg(cv));
    kvarc_conv *cv2 = NULL;
    rc = kvarc_conv_attach(cl2, "lib", "gate-b", &m, &o, &cv2);
    CHECK(rc == 0, "attach: %s", kvarc_client_errmsg(cl2));
    kvarc_conv *w2 = NULL;      /* a second writer, attached at the same point */
    CHECK_RC(kvarc_conv_attach(cl2, "lib", "gate-b", &m, &o, &w2), 0);
    if (rc == 0) {
        CHECK(kvarc_length(cv2, 0) == 301 && kvarc_length(cv2, 1) == 301, "attached at 301 tokens");
        CHECK_RC(append_tokens(cv, 301, 1), 0);
        CHECK_RC(append_tokens(cv2, 301, 1), 0);
        float out2[QH * D];
        for (int l = 0; l < L; l++) {
            CHECK_RC(attend_step(cv, l, 301, out), 0);
            CHECK_RC(attend_step(cv2, l, 301, out2), 0);
            CHECK(max_rel(out2, out, QH * D) < 1e-6f, "the attached worker's step equals the writer's (layer %d)", l);
        }
        CHECK_RC(kvarc_conv_close(cv2), 0);
    }
    /* the second writer's appends are refused by kvarcd: position 301 is taken */
    {
        if (w2) {
            rc = append_tokens(w2, 301, 1);
            rc = rc ? rc : kvarc_conv_sync(w2);
            CHECK(rc != 0 && strstr(kvarc_errmsg(w2), "appends must continue at the end"),
                  "a stale writer is refused: %s", kvarc_errmsg(w2));
            kvarc_conv_close(w2);
        }
    }

    /* prefill: a chunk of 100 after 302 tokens; every query equals full attention */
    kvarc_conv *pf;
    CHECK_RC(kvarc_conv_create(cl, "lib", "prefill", &m, &o, NULL, &pf), 0);
    CHECK_RC(append_402(pf), 0);
    {
        static float qb[QH * 100 * D], ob[QH * 100 * D];
        for (int l = 0; l < L; l++) {
            for (int hq = 0; hq < QH; hq++)
                memcpy(qb + (size_t)hq * 100 * D, Q[l][hq][302], 100 * D * 4);
            rc = kvarc_attend(pf, (uint32_t)l, qb, 100, ob);
            CHECK(rc == 0, "prefill attend: %s", kvarc_errmsg(pf));
            float pw = 0;
            for (int i = 0; i < 100 && !rc; i += 9) {
                full_attention(l, 302 + i, ref);
                for (int hq = 0; hq < QH; hq++)
                    memcpy(out + hq * D, ob + ((size_t)hq * 100 + i) * D, D * 4);
                float e = max_rel(out, ref, QH * D);
                pw = e > pw ? e : pw;
            }
            CHECK(pw < 2e-5f, "prefill chunk layer %d: worst relative error %.3g", l, pw);
        }
    }
    {   /* the work space a conversation keeps across calls: after the chunk of
         * 100 (the largest geometry), a decode step gives the bits of a fresh
         * conversation's first call */
        kvarc_conv *fr;
        CHECK_RC(kvarc_conv_create(cl, "lib", "prefill-fresh", &m, &o, NULL, &fr), 0);
        CHECK_RC(append_402(fr), 0);
        CHECK_RC(append_tokens(fr, 402, 1), 0);
        CHECK_RC(append_tokens(pf, 402, 1), 0);
        float of[QH * D];
        int same = 1;
        for (int l = 0; l < L; l++) {
            CHECK_RC(attend_step(pf, l, 402, out), 0);
            CHECK_RC(attend_step(fr, l, 402, of), 0);
            same &= !memcmp(out, of, sizeof of);
        }
        CHECK(same, "a decode step after a prefill chunk gives the bits of a conversation's first call");
        CHECK_RC(kvarc_conv_close(fr), 0);
    }
    {   /* one query group per query (a record cache of 64) = one group for the chunk */
        kvarc_options og = o;
        og.format = KVARC_FMT_Q3;
        og.top_k = 16;
        og.shortlist = 8;
        kvarc_conv *one, *many;
        CHECK_RC(kvarc_conv_create(cl, "lib", "groups-1", &m, &og, NULL, &one), 0);
        og.cache_records = 64;
        CHECK_RC(kvarc_conv_create(cl, "lib", "groups-n", &m, &og, NULL, &many), 0);
        static float qb[QH * 100 * D], o1[QH * 100 * D], on[QH * 100 * D];
        int same = 1;
        for (int c = 0; c < 2; c++) {
            kvarc_conv *cv = c ? many : one;
            CHECK_RC(append_tokens(cv, 0, 100), 0);
            CHECK_RC(append_tokens(cv, 100, 100), 0);
            CHECK_RC(append_tokens(cv, 200, 100), 0);
            CHECK_RC(append_tokens(cv, 300, 100), 0);
        }
        for (int l = 0; l < L; l++) {
            for (int hq = 0; hq < QH; hq++)
                memcpy(qb + (size_t)hq * 100 * D, Q[l][hq][300], 100 * D * 4);
            CHECK(kvarc_attend(one, (uint32_t)l, qb, 100, o1) == 0, "one group: %s", kvarc_errmsg(one));
            CHECK(kvarc_attend(many, (uint32_t)l, qb, 100, on) == 0, "100 groups: %s", kvarc_errmsg(many));
            same &= !memcmp(o1, on, sizeof o1);
        }
        CHECK(same, "a chunk in 100 query groups gives the bits of one group");
        kvarc_conv_close(one);
        kvarc_conv_close(many);
    }
    CHECK(kvarc_attend(pf, 0, out, 0, out) == -EINVAL && strstr(kvarc_errmsg(pf), "max_chunk"), "0 queries refused: %s",
          kvarc_errmsg(pf));
    CHECK(kvarc_attend(pf, 9, out, 1, out) == -EINVAL, "a bad layer is refused");
    {   /* a NaN (or Inf) anywhere refuses the whole call: nothing of it is kept */
        static float kn[H * 2 * D], vn[H * 2 * D];
        kn[1 * 2 * D + D + 5] = NAN;       /* head 1, the second token */
        uint64_t before = kvarc_length(pf, 0);
        CHECK_RC(kvarc_append(pf, 0, KVARC_DTYPE_F32, kn, vn, 2), KVARC_ENONFINITE);
        CHECK(kvarc_length(pf, 0) == before && strstr(kvarc_errmsg(pf), "token 1 of 2") &&
              strstr(kvarc_errmsg(pf), "head 1") && strstr(kvarc_errmsg(pf), "nothing was appended"),
              "the call with a NaN appended nothing and said where it was: %s", kvarc_errmsg(pf));
        kn[1 * 2 * D + D + 5] = 0;
        vn[0 * 2 * D + D + 9] = -INFINITY;  /* head 0, the second token, in v */
        CHECK_RC(kvarc_append(pf, 0, KVARC_DTYPE_F32, kn, vn, 2), KVARC_ENONFINITE);
        CHECK(kvarc_length(pf, 0) == before && strstr(kvarc_errmsg(pf), "head 0"), "an Inf in v: %s",
              kvarc_errmsg(pf));
        uint16_t k16[H * 2 * D] = { 0 }, v16[H * 2 * D] = { 0 };
        k16[1 * 2 * D + 3] = 0x7e00;        /* an fp16 NaN, head 1, the first token */
        CHECK_RC(kvarc_append(pf, 0, KVARC_DTYPE_F16, k16, v16, 2), KVARC_ENONFINITE);
        CHECK(kvarc_length(pf, 0) == before && strstr(kvarc_errmsg(pf), "token 0 of 2"), "an fp16 NaN: %s",
              kvarc_errmsg(pf));
        CHECK_RC(append_tokens(pf, 404, 1), 0);       /* every layer goes on */
    }
    CHECK_RC(kvarc_conv_close(pf), 0);

    /* fork through the handle, attach to it */
    rc = kvarc_fork(cv, "lib", "gate-fork", 0);
    CHECK(rc == 0, "fork: %s", kvarc_errmsg(cv));
    kvarc_conv *fk;
    CHECK_RC(kvarc_conv_attach(cl2, "lib", "gate-fork", &m, &o, &fk), 0);
    if (fk) {
        CHECK(kvarc_length(fk, 1) == 302, "the fork holds 302 tokens: %llu", (unsigned long long)kvarc_length(fk, 1));
        kvarc_conv_close(fk);
    }
    {   /* the GPU handle (where there is a GPU: stage 1 bit for bit, attention to 1e-5) gives the CPU's step */
        kvarc_options oc = o, og = o;
        oc.use_gpu = 0;
        og.use_gpu = 1;
        og.top_k = oc.top_k = 16;                 /* a real shortlist: 4 x 16 of ~230 cold tokens */
        og.shortlist = oc.shortlist = 4;
        CHECK_RC(kvarc_fork(cv, "lib", "gate-c", 0), 0);
        CHECK_RC(kvarc_fork(cv, "lib", "gate-g", 0), 0);
        kvarc_conv *cc = NULL, *cg = NULL;
        CHECK_RC(kvarc_conv_attach(cl2, "lib", "gate-c", &m, &oc, &cc), 0);
        CHECK_RC(kvarc_conv_attach(cl2, "lib", "gate-g", &m, &og, &cg), 0);
        if (cc && cg) {
            float oc_out[QH * D], og_out[QH * D];
            CHECK_RC(append_tokens(cc, 302, 1), 0);
            CHECK_RC(append_tokens(cg, 302, 1), 0);
            for (int l = 0; l < L; l++) {
                CHECK_RC(attend_step(cc, l, 302, oc_out), 0);
                CHECK_RC(attend_step(cg, l, 302, og_out), 0);
                if (kvarc_uses_gpu(cg))
                    CHECK(max_rel(og_out, oc_out, QH * D) < 1e-5f, "layer %d: the GPU path's step equals the CPU's "
                          "to 1e-5 (%.3g)", l, max_rel(og_out, oc_out, QH * D));
                else
                    CHECK(!memcmp(oc_out, og_out, sizeof oc_out), "layer %d: the CPU path's step is the CPU's", l);
            }
#ifdef KVARC_HAVE_CUDA
            if (kvarc_uses_gpu(cg)) {     /* device pointers in and out: the same step as host pointers */
                float *d_k, *d_v, *d_q, *d_o, hk[H * D], hv[H * D], hq[QH * D], ho[QH * D];
                for (int h = 0; h < H; h++) {
                    memcpy(hk + h * D, K[0][h][303], D * 4);
                    memcpy(hv + h * D, V[0][h][303], D * 4);
                }
                for (int hq_ = 0; hq_ < QH; hq_++)
                    memcpy(hq + hq_ * D, Q[0][hq_][303], D * 4);
                CHECK(cudaMalloc((void **)&d_k, sizeof hk) == cudaSuccess && cudaMalloc((void **)&d_v, sizeof hv) ==
                      cudaSuccess && cudaMalloc((void **)&d_q, sizeof hq) == cudaSuccess &&
                      cudaMalloc((void **)&d_o, sizeof ho) == cudaSuccess, "cudaMalloc");
                cudaMemcpy(d_k, hk, sizeof hk, cudaMemcpyHostToDevice);
                cudaMemcpy(d_v, hv, sizeof hv, cudaMemcpyHostToDevice);
                cudaMemcpy(d_q, hq, sizeof hq, cudaMemcpyHostToDevice);
                for (int l = 0; l < L; l++) {
                    CHECK_RC(kvarc_append_device(cg, (uint32_t)l, KVARC_DTYPE_F32, d_k, d_v, 1), 0);
                    CHECK_RC(kvarc_append(cc, (uint32_t)l, KVARC_DTYPE_F32, hk, hv, 1), 0);
                }
                CHECK_RC(kvarc_attend_device(cg, 0, d_q, 1, d_o), 0);
                CHECK_RC(kvarc_attend(cc, 0, hq, 1, oc_out), 0);
                cudaMemcpy(ho, d_o, sizeof ho, cudaMemcpyDeviceToHost);
                CHECK(max_rel(ho, oc_out, QH * D) < 1e-5f, "attend_device equals attend (%.3g)",
                      max_rel(ho, oc_out, QH * D));
                cudaFree(d_k), cudaFree(d_v), cudaFree(d_q), cudaFree(d_o);
            }
#else
            CHECK_RC(kvarc_attend_device(cg, 0, Q[0][0][0], 1, og_out), -ENOTSUP);
            CHECK(strstr(kvarc_errmsg(cg), "without CUDA") != NULL, "the message says why: %s", kvarc_errmsg(cg));
#endif
            printf("  stage 1 on the %s for the use_gpu handle\n", kvarc_uses_gpu(cg) ? "GPU" : "CPU");
            CHECK(!kvarc_uses_gpu(cc), "use_gpu 0 keeps the CPU path");
        }
        kvarc_conv_close(cc);
        kvarc_conv_close(cg);
    }
    {   /* RerankLayer refuses bad items with their status; the conversation still serves after */
        kvc_conn *k;
        CHECK_RC(kvc_connect(dir, &k), 0);
        char msg[256];
        uint64_t id = conv_id(k, "gate");
        float qv[4 * D] = { 0 };
        uint64_t sl[3] = { 10, 20, 30 }, have_bad[2] = { 20, 10 };
        Kvarc__V1__RerankItem it = KVARC__V1__RERANK_ITEM__INIT, *ip[1] = { &it };
        it.n_queries = 4;
        it.n_query = 4 * D;
        it.query = qv;
        it.n_shortlist = 3;
        it.shortlist = sl;
        it.top_k = 2;
        Kvarc__V1__RerankLayerRequest rl = KVARC__V1__RERANK_LAYER_REQUEST__INIT;
        rl.conv = id;
        rl.n_items = 1;
        rl.items = ip;
        it.head = H;                                   /* no such kv head */
        CHECK_RC(kvc_call(k, "RerankLayer", &rl.base, &kvarc__v1__rerank_layer_reply__descriptor, NULL, 0, msg,
                          sizeof msg), GRPC_STATUS_INVALID_ARGUMENT);
        CHECK(strstr(msg, "head 2 of 2") != NULL, "bad head named: %s", msg);
        it.head = 0;
        it.n_have = 2;
        it.have = have_bad;                            /* not ascending */
        CHECK_RC(kvc_call(k, "RerankLayer", &rl.base, &kvarc__v1__rerank_layer_reply__descriptor, NULL, 0, msg,
                          sizeof msg), GRPC_STATUS_INVALID_ARGUMENT);
        it.n_have = 0;
        sl[2] = 1u << 30;                              /* past the end of the layer */
        CHECK(kvc_call(k, "RerankLayer", &rl.base, &kvarc__v1__rerank_layer_reply__descriptor, NULL, 0, msg,
                       sizeof msg) != GRPC_STATUS_OK, "a shortlist past the end is refused: %s", msg);
        rl.conv = 987654;                              /* unknown conversation */
        CHECK_RC(kvc_call(k, "RerankLayer", &rl.base, &kvarc__v1__rerank_layer_reply__descriptor, NULL, 0, msg,
                          sizeof msg), GRPC_STATUS_NOT_FOUND);
        kvc_close(k);
        float o1[QH * D];
        CHECK_RC(append_tokens(cv, 302, 1), 0);        /* and the conversation goes on */
        CHECK_RC(attend_step(cv, 0, 302, o1), 0);
        full_attention(0, 302, ref);
        CHECK(max_rel(o1, ref, QH * D) < 2e-5f, "after the refused calls the gate still holds");
    }
    {   /* append_together: the layers' batches go in one AppendMany when the last layer fills its
         * batch (and at sync): the same records stored and the same attention bits as an Append per
         * layer, token by token and in a chunk; AppendMany refuses a bad block alone */
        kvarc_options ot = o, obad = o, op = o, oap = o;
        ot.append_together = 1;
        oap.append_together = 0;                /* an Append per layer (o holds the default, 1) */
        op.append_together = 2;                 /* pipelined: one AppendMany in flight */
        obad.append_together = 3;
        kvarc_conv *ta = NULL, *tb = NULL, *tx = NULL, *tp = NULL;
        CHECK_RC(kvarc_conv_create(cl, "lib", "bad-together", &m, &obad, NULL, &tx), -EINVAL);
        CHECK(strstr(kvarc_client_errmsg(cl), "append_together") != NULL, "the refusal names append_together: %s",
              kvarc_client_errmsg(cl));
        CHECK_RC(kvarc_conv_create(cl, "lib", "together", &m, &ot, NULL, &ta), 0);
        CHECK_RC(kvarc_conv_create(cl, "lib", "apart", &m, &oap, NULL, &tb), 0);
        CHECK_RC(kvarc_conv_create(cl, "lib", "pipelined", &m, &op, NULL, &tp), 0);
        int same = ta && tb && tp, t = 0;
        float oa[QH * D], ob[QH * D], opp[QH * D];
        for (; same && t < 150; t++) {          /* decode-shaped: every layer, token by token */
            CHECK_RC(append_tokens(ta, t, 1), 0);
            CHECK_RC(append_tokens(tb, t, 1), 0);
            CHECK_RC(append_tokens(tp, t, 1), 0);
            if (t % 37 == 36)
                for (int l = 0; l < L; l++) {
                    CHECK_RC(attend_step(ta, l, t, oa), 0);
                    CHECK_RC(attend_step(tb, l, t, ob), 0);
                    CHECK_RC(attend_step(tp, l, t, opp), 0);
                    same &= !memcmp(oa, ob, sizeof oa) && !memcmp(opp, ob, sizeof opp);
                }
        }
        kvarc_stats sp;
        if (tp)
            kvarc_conv_stats(tp, &sp);
        CHECK(tp && sp.archived == (uint64_t)L * (150 / 16 * 16), "pipelined: every full batch counted as archived "
              "when sent (%llu)", tp ? (unsigned long long)sp.archived : 0ull);
        kvarc_stats sa;
        if (ta)
            kvarc_conv_stats(ta, &sa);
        CHECK(ta && sa.archived == (uint64_t)L * (150 / 16 * 16), "together: the full batches of every layer "
              "archived as the last layer filled them (%llu)", ta ? (unsigned long long)sa.archived : 0ull);
        if (same) {                              /* a chunk of 40 (prefill-shaped), then sync */
            CHECK_RC(append_tokens(ta, 150, 40), 0);
            CHECK_RC(append_tokens(tb, 150, 40), 0);
            CHECK_RC(append_tokens(tp, 150, 40), 0);
            for (int l = 0; l < L; l++) {
                CHECK_RC(attend_step(ta, l, 189, oa), 0);
                CHECK_RC(attend_step(tb, l, 189, ob), 0);
                CHECK_RC(attend_step(tp, l, 189, opp), 0);
                same &= !memcmp(oa, ob, sizeof oa) && !memcmp(opp, ob, sizeof opp);
            }
            CHECK_RC(kvarc_conv_sync(ta), 0);
            CHECK_RC(kvarc_conv_sync(tb), 0);
            CHECK_RC(kvarc_conv_sync(tp), 0);
        }
        CHECK(same, "together and pipelined: the attention bits of an Append per layer");
        kvc_conn *k;
        char msg[256];
        CHECK_RC(kvc_connect(dir, &k), 0);
        uint64_t ida = conv_id(k, "together"), idb = conv_id(k, "apart"), idp = conv_id(k, "pipelined");
        int stored_same = same_records(k, ida, idb, 190) && same_records(k, idp, idb, 190);
        CHECK(stored_same, "together and pipelined: kvarcd holds the same 190 records of every layer and head");
        /* pipelined, refused: a second handle on the same conversation appends first, so the pipelined
         * writer's AppendMany in flight is refused; the writer learns it at its next call that waits
         * (sync), and every later call says so, naming the cause */
        if (tp) {
            kvarc_conv *tq = NULL;
            CHECK_RC(kvarc_conv_attach(cl, "lib", "pipelined", &m, &oap, &tq), 0);
            if (tq) {
                CHECK_RC(append_tokens(tq, 190, 16), 0);      /* an Append per layer, stored at once */
                kvarc_conv_close(tq);
            }
            int rc1 = append_tokens(tp, 190, 16);             /* sent in flight: refused by kvarcd */
            int rc2 = rc1 ? rc1 : kvarc_conv_sync(tp);
            CHECK(rc2 != 0, "the pipelined writer's refused AppendMany fails its next waiting call");
            float ox[QH * D];
            int rc3 = attend_step(tp, 0, 205, ox);
            CHECK(rc3 != 0 && strstr(kvarc_errmsg(tp), "attach it again") != NULL, "and every later call: %d %s",
                  rc3, kvarc_errmsg(tp));
        }
        /* together, one block refused: a second handle appends layer 0 first, so the AppendMany of both
         * layers' batch is refused for layer 0 and stored for layer 1; the writer keeps what kvarcd
         * stored (layer 1 counts as archived) and reports layer 0's refusal */
        {
            kvarc_conv *tw = NULL, *tq = NULL;
            CHECK_RC(kvarc_conv_create(cl, "lib", "partial", &m, &ot, NULL, &tw), 0);
            CHECK_RC(kvarc_conv_attach(cl, "lib", "partial", &m, &oap, &tq), 0);
            if (tw && tq) {
                static float kb[H * 16 * D], vb[H * 16 * D];
                for (int h = 0; h < H; h++)
                    for (int i = 0; i < 16; i++) {
                        memcpy(kb + ((size_t)h * 16 + i) * D, K[0][h][i], D * 4);
                        memcpy(vb + ((size_t)h * 16 + i) * D, V[0][h][i], D * 4);
                    }
                CHECK_RC(kvarc_append(tq, 0, KVARC_DTYPE_F32, kb, vb, 16), 0);   /* layer 0's batch, stored */
                int rc1 = append_tokens(tw, 0, 16);
                CHECK(rc1 != 0 && strstr(kvarc_errmsg(tw), "layer 0") != NULL, "the refused block is the error, "
                      "naming its layer: %d %s", rc1, kvarc_errmsg(tw));
                CHECK(tw->layers[1].archived == 16 && tw->layers[0].archived == 0, "the block kvarcd stored is kept "
                      "(layer 1 archived %llu, layer 0 %llu)", (unsigned long long)tw->layers[1].archived,
                      (unsigned long long)tw->layers[0].archived);
            }
            if (tq)
                kvarc_conv_close(tq);
            if (tw)
                kvarc_conv_close(tw);
        }
        /* the grouping itself: 64 tokens of both layers, token by token, batches of 16: 8 blocks in 4
         * durable commits (kvarcd's counters; nothing else writes meanwhile); then the same with
         * AppendMany requests capped below one block's bytes (as a 12 MiB cap splits a large chunk
         * of many layers): 8 blocks in 8 requests and 8 commits, the records an Append per layer's */
        for (int split = 0; split < 2; split++) {
            kvarc_conv *tc = NULL;
            CHECK_RC(kvarc_conv_create(cl, "lib", split ? "together-split" : "together-2", &m, &ot, NULL, &tc), 0);
            if (tc && split)
                tc->append_many_max = 1;
            uint64_t ap[2] = { 0, 0 }, gc[2] = { 0, 0 };
            for (int phase = 0; phase < 2 && tc; phase++) {
                Kvarc__V1__Empty e0 = KVARC__V1__EMPTY__INIT;
                ProtobufCMessage *srep = NULL;
                CHECK_RC(kvc_call(k, "Stats", &e0.base, &kvarc__v1__stats_reply__descriptor, &srep, 0, msg,
                                  sizeof msg), 0);
                if (srep) {
                    ap[phase] = ((Kvarc__V1__StatsReply *)srep)->appends;
                    gc[phase] = ((Kvarc__V1__StatsReply *)srep)->group_commits;
                    protobuf_c_message_free_unpacked(srep, NULL);
                }
                for (int tt = 0; phase == 0 && tt < 64; tt++)
                    CHECK_RC(append_tokens(tc, tt, 1), 0);
            }
            CHECK(ap[1] - ap[0] == 8 && gc[1] - gc[0] == (split ? 8u : 4u), "together%s: 8 blocks in %llu appends "
                  "and %llu durable commits (want 8 and %d)", split ? ", split" : "", (unsigned long long)(ap[1] - ap[0]),
                  (unsigned long long)(gc[1] - gc[0]), split ? 8 : 4);
            if (tc && split) {
                int eq = same_records(k, conv_id(k, "together-split"), idb, 64);
                CHECK(eq, "together, split: the 64 tokens' records of every layer and head are an Append per layer's");
            }
            if (tc)
                kvarc_conv_close(tc);
        }
        /* AppendMany over the raw transport: a good block, one of the wrong size, one out of place */
        enum { NT = 4 };
        const size_t rbs = (size_t)kvarc_record_bytes(KVARC_FMT_F16, D);
        static uint8_t bits[H * NT * D / 8], recs[H * NT * 128 * 4];
        static uint16_t scs[H * NT];
        Kvarc__V1__AppendRequest b3[3], *bp[3] = { &b3[0], &b3[1], &b3[2] };
        for (int i = 0; i < 3; i++) {
            kvarc__v1__append_request__init(&b3[i]);
            b3[i].layer = (uint32_t)(i == 1);
            b3[i].first_pos = 190;
            b3[i].count = NT;
            b3[i].sig_bits.data = bits;
            b3[i].sig_bits.len = sizeof bits;
            b3[i].sig_scale.data = (uint8_t *)scs;
            b3[i].sig_scale.len = sizeof scs;
            b3[i].records.data = recs;
            b3[i].records.len = H * NT * rbs;
        }
        b3[1].records.len -= 1;                 /* layer 1: one byte short */
        b3[2].first_pos = 500;                  /* layer 0 again, not at its end */
        Kvarc__V1__AppendManyRequest am = KVARC__V1__APPEND_MANY_REQUEST__INIT;
        am.conv = ida;
        am.n_blocks = 3;
        am.blocks = bp;
        ProtobufCMessage *rep = NULL;
        int st = kvc_call(k, "AppendMany", &am.base, &kvarc__v1__append_many_reply__descriptor, &rep, 0, msg,
                          sizeof msg);
        Kvarc__V1__AppendManyReply *ar = (Kvarc__V1__AppendManyReply *)rep;
        CHECK(st == GRPC_STATUS_OK && ar && ar->n_results == 3, "AppendMany answers a result per block: %d %s", st,
              msg);
        if (!st && ar && ar->n_results == 3) {
            CHECK(ar->results[0]->status == 0 && ar->results[0]->length == 190 + NT, "the good block is stored "
                  "(layer 0 at %llu)", (unsigned long long)ar->results[0]->length);
            CHECK(ar->results[1]->status == GRPC_STATUS_INVALID_ARGUMENT && strstr(ar->results[1]->message, "record"),
                  "the short block is refused alone: %u %s", ar->results[1]->status, ar->results[1]->message);
            CHECK(ar->results[2]->status != 0 && ar->results[1]->length == 190 && strstr(ar->results[2]->message,
                  "at position 500"), "the misplaced block is refused with its own message, layer 1 unchanged: "
                  "%u %s", ar->results[2]->status, ar->results[2]->message);
        }
        if (rep)
            protobuf_c_message_free_unpacked(rep, NULL);
        am.conv = 987654;
        CHECK_RC(kvc_call(k, "AppendMany", &am.base, &kvarc__v1__append_many_reply__descriptor, NULL, 0, msg,
                          sizeof msg), GRPC_STATUS_NOT_FOUND);
        kvc_close(k);
        if (ta)
            kvarc_conv_close(ta);
        if (tb)
            kvarc_conv_close(tb);
        if (tp)
            kvarc_conv_close(tp);
    }
    {   /* a conversation archived before kind-2 signatures (true positions, position-free
         * signatures: kind 0, written above as an older kvarcd stored it) is refused by attach
         * and by stage 1 and 2, naming why; an older client's Create of kind 0 is refused */
        kvc_conn *k;
        CHECK_RC(kvc_connect(dir, &k), 0);
        char msg[512];
        uint64_t id = conv_id(k, "kind0");
        Kvarc__V1__Shape sh = KVARC__V1__SHAPE__INIT;
        sh.n_layers = m.n_layers;
        sh.n_kv_heads = m.n_kv_heads;
        sh.n_q_heads = m.n_q_heads;
        sh.head_dim = m.head_dim;
        sh.format = KVARC_FMT_Q3;
        sh.pos_mode = KVARC_POS_TRUE_FREE;
        sh.rotary_dims = m.rotary_dims;
        sh.rope_theta = m.rope_theta;
        sh.fingerprint = (char *)m.fingerprint;
        Kvarc__V1__CreateRequest cr = KVARC__V1__CREATE_REQUEST__INIT;
        cr.ns = "lib";
        cr.name = "kind0-new";
        cr.shape = &sh;
        CHECK_RC(kvc_call(k, "Create", &cr.base, &kvarc__v1__conv_reply__descriptor, NULL, 0, msg, sizeof msg),
                 GRPC_STATUS_INVALID_ARGUMENT);
        CHECK(strstr(msg, "no longer created") != NULL, "an old client's kind-0 Create is refused: %s", msg);
        kvarc_conv *old = NULL;
        CHECK_RC(kvarc_conv_attach(cl2, "lib", "kind0", &m, &o, &old), KVARC_EVERSION);
        CHECK(strstr(kvarc_client_errmsg(cl2), "position-free") && strstr(kvarc_client_errmsg(cl2), "lib/kind0"),
              "attach says why: %s", kvarc_client_errmsg(cl2));
        float qv[4 * D] = { 0 };
        uint64_t sl[1] = { 0 };
        Kvarc__V1__SearchRequest sr = KVARC__V1__SEARCH_REQUEST__INIT;
        sr.conv = id;
        sr.n_queries = 1;
        sr.n_query = D;
        sr.query = qv;
        sr.k = 4;
        CHECK_RC(kvc_call(k, "Search", &sr.base, &kvarc__v1__search_reply__descriptor, NULL, 0, msg, sizeof msg),
                 GRPC_STATUS_INVALID_ARGUMENT);
        CHECK(strstr(msg, "kind 0") != NULL, "Search says why: %s", msg);
        Kvarc__V1__RerankItem it = KVARC__V1__RERANK_ITEM__INIT, *ip[1] = { &it };
        it.n_queries = 1;
        it.n_query = D;
        it.query = qv;
        it.n_shortlist = 1;
        it.shortlist = sl;
        it.top_k = 1;
        Kvarc__V1__RerankLayerRequest rl = KVARC__V1__RERANK_LAYER_REQUEST__INIT;
        rl.conv = id;
        rl.n_items = 1;
        rl.items = ip;
        CHECK_RC(kvc_call(k, "RerankLayer", &rl.base, &kvarc__v1__rerank_layer_reply__descriptor, NULL, 0, msg,
                          sizeof msg), GRPC_STATUS_INVALID_ARGUMENT);
        CHECK(strstr(msg, "kind 0") != NULL, "RerankLayer says why: %s", msg);
        kvc_close(k);
    }
    kvarc_model wrong = m;
    wrong.head_dim = 128;
    kvarc_conv *bad = NULL;
    CHECK_RC(kvarc_conv_attach(cl2, "lib", "gate", &wrong, &o, &bad), KVARC_ESHAPE);
    CHECK(strstr(kvarc_client_errmsg(cl2), "head_dim 64") && strstr(kvarc_client_errmsg(cl2), "x 128"),
          "mismatch names both sides: %s", kvarc_client_errmsg(cl2));
    CHECK_RC(kvarc_conv_attach(cl2, "lib", "nobody", &m, &o, &bad), -ENOENT);
    CHECK_RC(kvarc_conv_create(cl2, "lib", "gate", &m, &o, NULL, &bad), -EEXIST);

    rc = kvarc_conv_close(cv);
    CHECK(rc == 0, "close: %s", kvarc_client_errmsg(cl));
    kvarc_client_close(cl);
    kvarc_client_close(cl2);
    kill(pid, SIGTERM);
    CHECK(wait_exit(pid, 10000) == 0, "kvarcd exits 0");
    if (!tu_failures) {
        char log[300];
        snprintf(log, sizeof log, "%s.log", dir);
        unlink(log);
        eu_rmrf(dir);
    }
    return tu_finish("test_libkvarc");
}
