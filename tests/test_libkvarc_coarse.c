/* test_libkvarc_coarse: the coarse tier end to end, libkvarc against a real
 * kvarcd on a unix socket (1 layer, 2 KV heads x 4 query heads, head_dim
 * 128, RoPE on every dimension, true positions, q3):
 *  - the writer makes the block summaries (true positions and remapped,
 *    checked against the kernels' definitions) and sends them with its Appends;
 *    a worker attaching loads them (LoadSummaries): every complete block
 *    has them, and its coarse stage 1 retrieves exactly what the writer's
 *    does (the outputs differ only by the reader's hot window, decoded
 *    from q3 records);
 *  - one-token needles (a key of 16 x a unit direction among Gaussian keys
 *    with loud channels; the query aimed at it at its true distance) are
 *    retrieved with the coarse tier on, scanning 4 of 128 blocks, as with
 *    the full scan;
 *  - a fork taken in the middle of a block and continued: the fork's own
 *    appends complete that block with a summary of its own, and a worker
 *    attaching to the fork finds every block summarized;
 *  - blocks without summaries (archived by a writer that did not send
 *    them) are always scanned, and the needles are still found;
 *  - stage 1 on 1 and on 2 threads (40K tokens): the same retrieval and
 *    output bits, coarse tier on and off;
 *  - prefill_coarse_blocks (prefill_shortlist): a 3-query chunk's first
 *    two queries give the bits of a reader with the coarse tier (with a
 *    shortlist of 1 x top_k), its last those of the full scan (shortlist);
 *  - the fast tier (block summaries only in the client, stage 1b in
 *    kvarcd over the runs of chosen blocks): the retrieval and output bits
 *    of a client scanning its own signatures, true positions and remapped,
 *    coarse tier on and off (one run of the whole cold range), decode steps
 *    and a prefill chunk; the client keeps one block's signatures; bad
 *    runs (overlapping, odd, past the end, with a shortlist, wrong bias
 *    count or none, unknown mode) are refused and the good request served;
 *  - stage 1 through the coarse tier on the GPU (use_gpu, where a device
 *    is there): the CPU path's retrieval bits, outputs to 1e-5;
 *  - coarse_blocks and prefill_coarse_blocks below shortlist x top_k / 64,
 *    and threads past 256, are refused, naming them; so are an Append with summaries of the wrong
 *    size or of no block, and LoadSummaries past the last complete block
 *    or of a head that is not there (nothing stored). */
#include <math.h>

#include "kvarcd_util.h"
#include "kvarc.h"
#include "../client/kvarc_internal.h"
#include "kvg.h"

#define H 2
#define QH 4
#define D 128
#define N 8192
#define THETA 10000.0f

static float K[H][N][D], V[H][N][D];
static const uint64_t needles[3] = { 1234, 4100, 6999 };
static float ndir[3][H][D];

static int append_range(kvarc_conv *cv, int t0, int n)
{
    static float kb[H * N * D], vb[H * N * D];
    for (int h = 0; h < H; h++)
        for (int i = 0; i < n; i++) {
            memcpy(kb + ((size_t)h * n + i) * D, K[h][t0 + i], D * 4);
            memcpy(vb + ((size_t)h * n + i) * D, V[h][t0 + i], D * 4);
        }
    return kvarc_append(cv, 0, KVARC_DTYPE_F32, kb, vb, (uint32_t)n);
}

/* The pre-RoPE query of every query head at position m aimed at needle j:
 * its direction turned back by the distance, so that at true positions it
 * meets the needle's key; plus a little noise. */
static void needle_query(tu_rng *g, int j, uint64_t m, float *q)
{
    for (int hq = 0; hq < QH; hq++) {
        float *qh = q + (size_t)hq * D;
        for (int i = 0; i < D; i++)
            qh[i] = 10.0f * ndir[j][hq / (QH / H)][i] + 0.3f * tu_gauss(g);
        kvg_rope_ref(qh, D, D, 0, THETA, (double)needles[j] - (double)m);
    }
}

/* max |a - b| / max |b|: the GPU's attention against the CPU's */
static float max_rel(const float *a, const float *b, size_t n)
{
    float num = 0.0f, den = 1e-30f;
    for (size_t i = 0; i < n; i++) {
        num = fmaxf(num, fabsf(a[i] - b[i]));
        den = fmaxf(den, fabsf(b[i]));
    }
    return num / den;
}

static int has(const uint64_t *v, size_t n, uint64_t p)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] == p)
            return 1;
    return 0;
}

/* Every complete archived block of the layer has its summaries. */
static int all_summarized(const kvarc_conv *cv)
{
    if (!cv)
        return 0;
    const kl_layer *y = &cv->layers[0];
    if (y->sum_n != y->archived / KVG_SIG_BLOCK)
        return 0;
    for (uint64_t b = 0; b < y->sum_n; b++)
        if (!y->sum_ok[b])
            return 0;
    return 1;
}

/* Fast tier (stage 1b in kvarcd) against the client's own scan: two forks
 * of src, read by a worker holding every signature and by a fast-tier one
 * (block summaries only), given the same tokens and queries: the same
 * retrieval and output bits for decode steps (before and after a block
 * completes, which moves the fast tier's small signature window) and for
 * a 3-query prefill chunk whose first two queries take prefill_coarse and
 * a shortlist of 1 x top_k. o: coarse_blocks on (runs) or 0 (one run of
 * the whole cold range). Both on the CPU path (use_gpu 0).
 * gpu: the same steps, the second worker the full tier with use_gpu (its
 * stage 1, through the coarse tier, on the device where there is one):
 * the same retrieval bits, and outputs equal to 1e-5 (the GPU's attention
 * sums in another order; bit for bit without a device). */
static void fast_vs_full(kvarc_client *cl, const kvarc_model *m, const kvarc_options *o, const char *src,
                         const char *tag, int gpu, tu_rng *g)
{
    char na[64], nb[64];
    snprintf(na, sizeof na, "%s-full", tag);
    snprintf(nb, sizeof nb, "%s-%s", tag, gpu ? "gpu" : "fast");
    kvarc_options of = *o, oq = *o;
    of.prefill_coarse_blocks = oq.prefill_coarse_blocks = 4;
    of.prefill_shortlist = oq.prefill_shortlist = 1;
    of.use_gpu = 0;
    oq.use_gpu = gpu;
    oq.fast_tier = !gpu;
    kvarc_conv *sc = NULL, *a = NULL, *b = NULL;
    CHECK_RC(kvarc_conv_attach(cl, "lib", src, m, o, &sc), 0);
    if (!sc)
        return;
    CHECK_RC(kvarc_fork(sc, "lib", na, 0), 0);
    CHECK_RC(kvarc_fork(sc, "lib", nb, 0), 0);
    kvarc_conv_close(sc);
    CHECK_RC(kvarc_conv_attach(cl, "lib", na, m, &of, &a), 0);
    CHECK_RC(kvarc_conv_attach(cl, "lib", nb, m, &oq, &b), 0);
    if (!a || !b) {
        kvarc_conv_close(a);
        kvarc_conv_close(b);
        return;
    }
    const int dev = gpu && kvarc_uses_gpu(b);
    if (gpu)
        printf("  %s: the second worker's stage 1 on the %s\n", tag, dev ? "GPU" : "CPU (no device)");
    CHECK(gpu || (b->layers[0].sig[0].cap <= 1024 && b->layers[0].sig_base + KVG_SIG_BLOCK > b->layers[0].archived &&
          a->layers[0].sig[0].cap >= kvarc_length(a, 0)), "%s: the fast tier holds the unfinished block's "
          "signatures (from %llu, room for %llu), the full one the layer's (%llu)", tag,
          (unsigned long long)b->layers[0].sig_base, (unsigned long long)b->layers[0].sig[0].cap,
          (unsigned long long)a->layers[0].sig[0].cap);
    uint64_t len = kvarc_length(a, 0);
    int same = 1, same_ret = 1, steps = 0;
    float q[QH * D], oa[QH * D], ob[QH * D];
    for (int j = 0; j < 6 && !tu_failures; j++) {        /* steps, 100 tokens in between after the third */
        if (j == 3) {
            CHECK_RC(append_range(a, (int)(len % (N - 200)), 100), 0);
            CHECK_RC(append_range(b, (int)(len % (N - 200)), 100), 0);
            len += 100;
        }
        CHECK_RC(append_range(a, (int)(len % (N - 200)), 1), 0);
        CHECK_RC(append_range(b, (int)(len % (N - 200)), 1), 0);
        needle_query(g, j % 3, len, q);
        len++;
        CHECK_RC(kvarc_attend(a, 0, q, 1, oa), 0);
        CHECK_RC(kvarc_attend(b, 0, q, 1, ob), 0);
        same &= dev ? max_rel(oa, ob, QH * D) < 1e-5f : !memcmp(oa, ob, sizeof oa);
        for (uint32_t h = 0; h < H; h++) {
            uint64_t pa[64], pb[64];
            size_t n1 = kvarc_last_retrieved(a, h, pa, 64), n2 = kvarc_last_retrieved(b, h, pb, 64);
            same_ret &= n1 == n2 && n1 > 0 && !memcmp(pa, pb, n1 * 8);
        }
        steps++;
    }
    CHECK(same && same_ret && steps == 6, "%s: 6 decode steps, the second worker's retrieval and output bits are "
          "the first's", tag);
    CHECK(gpu || (b->layers[0].sig[0].cap <= 1024 && b->layers[0].sig_base + KVG_SIG_BLOCK > b->layers[0].archived),
          "%s: after a block completed the fast tier still holds the unfinished block's signatures only (base "
          "%llu, archived %llu)", tag, (unsigned long long)b->layers[0].sig_base,
          (unsigned long long)b->layers[0].archived);
    static float qc[QH * 3 * D], pa[QH * 3 * D], pb[QH * 3 * D];
    for (int j = 0; j < 3; j++) {
        float one_q[QH * D];
        needle_query(g, j, len + (uint64_t)j, one_q);
        for (int hq = 0; hq < QH; hq++)
            memcpy(qc + ((size_t)hq * 3 + (size_t)j) * D, one_q + (size_t)hq * D, D * 4);
    }
    CHECK_RC(append_range(a, (int)(len % (N - 200)), 3), 0);
    CHECK_RC(append_range(b, (int)(len % (N - 200)), 3), 0);
    CHECK_RC(kvarc_attend(a, 0, qc, 3, pa), 0);
    CHECK_RC(kvarc_attend(b, 0, qc, 3, pb), 0);
    CHECK(dev ? max_rel(pa, pb, QH * 3 * D) < 1e-5f : !memcmp(pa, pb, sizeof pa), "%s: a prefill chunk of 3, the "
          "second worker's outputs are the first's", tag);
    if (!gpu && !o->pos_mode && o->coarse_blocks) {   /* stage 1b's bad input, over the raw transport */
        kvc_conn *k;
        char msg[512];
        CHECK_RC(kvc_connect(dir, &k), 0);
        float qq[(QH / H) * D];
        for (int i = 0; i < (QH / H) * D; i++)
            qq[i] = tu_gauss(g);
        uint64_t runs[6] = { 4, 100, 200, 64, 500, 40 }, len0 = kvarc_length(b, 0);
        float bias[(QH / H) * 6];                  /* the runs span 2 + 2 + 2 blocks */
        memset(bias, 0, sizeof bias);
        static const char *what[] = { "descending", "odd", "bias count", "mode", "shortlist too", "past the end",
                                      "no bias" };
        for (int c = 0; c < 8; c++) {             /* each case one change from the last, which is accepted */
            Kvarc__V1__RerankItem it = KVARC__V1__RERANK_ITEM__INIT, *ip = &it;
            it.head = 1;
            it.n_queries = QH / H;
            it.n_query = (QH / H) * D;
            it.query = qq;
            it.top_k = 4;
            it.shortlist_len = 16;
            it.runs = runs;
            it.n_runs = 6;
            it.run_bias = bias;
            it.n_run_bias = (QH / H) * 6;
            uint64_t bad[6], sl[1] = { 7 };
            memcpy(bad, runs, sizeof bad);
            Kvarc__V1__RerankLayerRequest rq = KVARC__V1__RERANK_LAYER_REQUEST__INIT;
            rq.conv = b->id;
            rq.layer = 0;
            rq.n_items = 1;
            rq.items = &ip;
            if (c == 0) {
                bad[2] = 50;                       /* overlaps the first run */
                it.runs = bad;
            } else if (c == 1) {
                it.n_runs = 5;
            } else if (c == 2) {
                it.n_run_bias = 3;
            } else if (c == 3) {
                rq.stage1_mode = 2;
            } else if (c == 4) {
                it.shortlist = sl;
                it.n_shortlist = 1;
            } else if (c == 5) {
                bad[4] = len0 + 100;
                it.runs = bad;
            } else if (c == 6) {
                it.run_bias = NULL;
                it.n_run_bias = 0;
            }
            ProtobufCMessage *rep = NULL;
            int st = kvc_call(k, "RerankLayer", &rq.base, &kvarc__v1__rerank_layer_reply__descriptor, &rep, 0, msg,
                              sizeof msg);
            if (c < 7) {
                CHECK(st == GRPC_STATUS_INVALID_ARGUMENT || (c == 5 && st == GRPC_STATUS_OUT_OF_RANGE),
                      "stage 1b with %s runs is refused: status %d, '%s'", what[c], st, msg);
            } else {
                Kvarc__V1__RerankLayerReply *rl = (Kvarc__V1__RerankLayerReply *)rep;
                CHECK(st == GRPC_STATUS_OK && rl && rl->n_results == 1 && rl->results[0]->n_positions == 4,
                      "the same request with good runs is answered: status %d, '%s'", st, msg);
            }
            if (rep)
                protobuf_c_message_free_unpacked(rep, NULL);
        }
        kvc_close(k);
    }
    kvarc_stats sa, sb;
    kvarc_conv_stats(a, &sa);
    kvarc_conv_stats(b, &sb);
    CHECK(gpu || len < 8192 || sb.bytes_received * 4 < sa.bytes_received, "%s: the fast tier received %llu bytes against "
          "the full tier's %llu", tag, (unsigned long long)sb.bytes_received, (unsigned long long)sa.bytes_received);
    kvarc_conv_close(a);
    kvarc_conv_close(b);
}

int main(void)
{
    eu_tmpdir(dir, sizeof dir, "coarse");
    tu_rng g = { 5 };
    for (int j = 0; j < 3; j++)
        for (int h = 0; h < H; h++) {
            double n2 = 0;
            for (int i = 0; i < D; i++) {
                ndir[j][h][i] = tu_gauss(&g);
                n2 += (double)ndir[j][h][i] * ndir[j][h][i];
            }
            for (int i = 0; i < D; i++)
                ndir[j][h][i] = (float)(ndir[j][h][i] / sqrt(n2));
        }
    for (int h = 0; h < H; h++)
        for (int t = 0; t < N; t++) {
            for (int i = 0; i < D; i++) {     /* Gaussian keys, a few loud channels, as real keys have */
                K[h][t][i] = tu_gauss(&g) * (i % 37 == 5 ? 5.0f : 1.0f);
                V[h][t][i] = tu_gauss(&g);
            }
            for (int j = 0; j < 3; j++)
                if ((uint64_t)t == needles[j])
                    for (int i = 0; i < D; i++)
                        K[h][t][i] += 16.0f * ndir[j][h][i];
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
        return tu_finish("test_libkvarc_coarse");
    }
    kvarc_model m = { 1, H, QH, D, KVARC_DTYPE_F32, THETA, D, 0, "coarse-toy" };
    kvarc_options o;
    kvarc_options_default(&o);
    o.top_k = 8;
    o.shortlist = 4;                       /* 32 shortlisted */
    o.coarse_blocks = 4;                   /* of 128 blocks */
    o.hot_window = 64;
    o.batch = 64;
    o.max_chunk = 16;

    {   /* bad option: fewer scanned tokens than the shortlist */
        kvarc_options bad = o;
        bad.top_k = 64;
        bad.shortlist = 8;
        bad.coarse_blocks = 4;
        kvarc_conv *x = NULL;
        CHECK_RC(kvarc_conv_create(cl, "lib", "bad", &m, &bad, NULL, &x), -EINVAL);
        CHECK(strstr(kvarc_client_errmsg(cl), "coarse_blocks") != NULL, "the refusal names coarse_blocks: %s",
              kvarc_client_errmsg(cl));
    }

    kvarc_conv *w = NULL, *r = NULL, *f = NULL, *fk = NULL, *fr = NULL;
    static float means[H * 2 * D];         /* K and V means: keys are centered (kind 2: per block) */
    for (int i = 0; i < H * 2 * D; i++)
        means[i] = 0.7f * tu_gauss(&g);
    CHECK_RC(kvarc_conv_create(cl, "lib", "c", &m, &o, means, &w), 0);
    /* appends of 100 tokens: blocks complete inside appends, not at their edges */
    const int t_end = 7800;                /* then 6 needle steps, and a fork's 150 tokens: < N */
    for (int t = 0; t < t_end && !tu_failures; t += 100)
        CHECK_RC(append_range(w, t, 100), 0);
    CHECK_RC(kvarc_conv_sync(w), 0);
    CHECK(all_summarized(w), "the writer holds a summary for each of its %llu complete blocks",
          (unsigned long long)w->layers[0].archived / KVG_SIG_BLOCK);

    {   /* the writer's kind-2 signatures and summaries are kvg_sig_pos_ref's and kvg_summary_ref's bits,
         * computed here from the keys alone */
        static uint8_t bits[N * D / 8];
        static uint16_t sc[N];
        static float x[KVG_SIG_BLOCK * D];
        int sig_same = 1, sum_same = 1;
        for (uint32_t h = 0; h < H; h++) {
            kvg_codec codec = kl_codec(w, 0, h);
            CHECK_RC(kvg_sig_pos_ref(&w->rope, &w->rot, codec.mu_k, K[h][0], 0, (size_t)t_end, bits, sc, NULL), 0);
            static uint8_t held[N * D / 8];
            static uint16_t hsc[N];
            CHECK_RC(kvg_plane_get(&w->layers[0].sig[h], 0, (size_t)t_end, held, hsc), 0);
            sig_same &= !memcmp(bits, held, (size_t)t_end * D / 8) && !memcmp(sc, hsc, (size_t)t_end * 2);
            for (uint64_t b = 0; b < (uint64_t)t_end / KVG_SIG_BLOCK; b++) {
                uint8_t sb[KVG_SUM_ITEMS * D / 8];
                uint16_t ss[KVG_SUM_ITEMS];
                CHECK_RC(kvg_sig_pos_keys(&w->rope, codec.mu_k, K[h][b * KVG_SIG_BLOCK], b * KVG_SIG_BLOCK,
                                          KVG_SIG_BLOCK, x), 0);
                CHECK_RC(kvg_summary_ref(&w->rot, x, bits + b * KVG_SIG_BLOCK * D / 8, sc + b * KVG_SIG_BLOCK,
                                         KVG_SIG_BLOCK, sb, ss), 0);
                sum_same &= !memcmp(sb, w->layers[0].sum_bits[h] + b * sizeof sb, sizeof sb) &&
                            !memcmp(ss, w->layers[0].sum_scale[h] + b * KVG_SUM_ITEMS, sizeof ss);
            }
        }
        CHECK(sig_same, "the writer's signatures are kvg_sig_pos_ref's bits");
        CHECK(sum_same, "the writer's block summaries are kvg_summary_ref's bits");
    }
    {   /* remapped mode (kind-1 signatures, the encoder's): the summaries are made from k - mu_k */
        kvarc_options om = o;
        om.pos_mode = 1;
        kvarc_conv *wm = NULL;
        CHECK_RC(kvarc_conv_create(cl, "lib", "remapped", &m, &om, means, &wm), 0);
        enum { NM = 1000 };
        for (int t0 = 0; wm && t0 < NM && !tu_failures; t0 += 100)
            CHECK_RC(append_range(wm, t0, 100), 0);
        CHECK_RC(kvarc_conv_sync(wm), 0);
        int same = wm && wm->layers[0].sum_n == NM / KVG_SIG_BLOCK;
        for (uint32_t h = 0; same && h < H; h++) {
            kvg_codec codec = kl_codec(wm, 0, h);
            static uint8_t recs[NM * 128], bits[NM * D / 8];
            static uint16_t sc[NM];
            static float x[KVG_SIG_BLOCK * D];
            CHECK_RC(kvg_encode_ref(&codec, KVARC_DTYPE_F32, K[h][0], V[h][0], NM, recs, bits, sc, NULL), 0);
            for (uint64_t b = 0; b < NM / KVG_SIG_BLOCK; b++) {
                uint8_t sb[KVG_SUM_ITEMS * D / 8];
                uint16_t ss[KVG_SUM_ITEMS];
                for (int t = 0; t < KVG_SIG_BLOCK; t++)
                    for (int i = 0; i < D; i++)
                        x[t * D + i] = K[h][b * KVG_SIG_BLOCK + (uint64_t)t][i] - codec.mu_k[i];
                CHECK_RC(kvg_summary_ref(&wm->rot, x, bits + b * KVG_SIG_BLOCK * D / 8, sc + b * KVG_SIG_BLOCK,
                                         KVG_SIG_BLOCK, sb, ss), 0);
                same &= !memcmp(sb, wm->layers[0].sum_bits[h] + b * sizeof sb, sizeof sb) &&
                        !memcmp(ss, wm->layers[0].sum_scale[h] + b * KVG_SUM_ITEMS, sizeof ss);
            }
        }
        CHECK(same, "remapped: the writer's block summaries are kvg_summary_ref's bits of k - mu_k");
        kvarc_conv_close(wm);
    }

    {   /* bad summaries in an Append, and LoadSummaries past the end or of a head that is not there: refused
         * with INVALID_ARGUMENT naming what is wrong, and nothing stored */
        kvc_conn *k;
        char msg[512];
        CHECK_RC(kvc_connect(dir, &k), 0);
        uint64_t len0 = kvarc_length(w, 0), nb0 = len0 / KVG_SIG_BLOCK;
        uint64_t first = len0, count = KVG_SIG_BLOCK;           /* completes exactly one block */
        static uint8_t bits[H * KVG_SIG_BLOCK * D / 8], recs[H * KVG_SIG_BLOCK * 128];
        static uint16_t sc[H * KVG_SIG_BLOCK];
        uint8_t sbits[H * KVG_SUM_ITEMS * D / 8 + 1];
        uint16_t sscale[H * KVG_SUM_ITEMS];
        memset(sbits, 0, sizeof sbits);
        memset(sscale, 0, sizeof sscale);
        Kvarc__V1__AppendRequest ar = KVARC__V1__APPEND_REQUEST__INIT;
        ar.conv = w->id;
        ar.layer = 0;
        ar.first_pos = first;
        ar.count = (uint32_t)count;
        ar.sig_bits.data = bits;
        ar.sig_bits.len = sizeof bits;
        ar.sig_scale.data = (uint8_t *)sc;
        ar.sig_scale.len = sizeof sc;
        ar.records.data = recs;
        ar.records.len = H * count * w->rb;
        ar.sum_bits.data = sbits;
        ar.sum_bits.len = sizeof sbits;               /* one byte too many */
        ar.sum_scale.data = (uint8_t *)sscale;
        ar.sum_scale.len = sizeof sscale;
        int st = kvc_call(k, "Append", &ar.base, &kvarc__v1__append_reply__descriptor, NULL, 0, msg, sizeof msg);
        CHECK(st == GRPC_STATUS_INVALID_ARGUMENT && strstr(msg, "summaries"), "Append with summaries of the wrong "
              "size: status %d, '%s'", st, msg);
        uint64_t short_n = KVG_SIG_BLOCK - 1 - first % KVG_SIG_BLOCK;   /* tokens that complete no block */
        ar.sum_bits.len = sizeof sbits - 1;           /* one block's summaries, but the tokens complete none */
        ar.count = (uint32_t)short_n;
        ar.sig_bits.len = H * short_n * D / 8;
        ar.sig_scale.len = H * short_n * 2;
        ar.records.len = H * short_n * w->rb;
        CHECK(short_n > 0, "position %llu leaves room for a short append", (unsigned long long)first);
        st = kvc_call(k, "Append", &ar.base, &kvarc__v1__append_reply__descriptor, NULL, 0, msg, sizeof msg);
        CHECK(st == GRPC_STATUS_INVALID_ARGUMENT && strstr(msg, "completes 0 blocks"), "Append with summaries of "
              "no block: status %d, '%s'", st, msg);
        Kvarc__V1__LoadSummariesRequest lr = KVARC__V1__LOAD_SUMMARIES_REQUEST__INIT;
        lr.conv = w->id;
        lr.layer = 0;
        lr.head = 0;
        lr.first_block = nb0;
        lr.count = 1;                                 /* a block not yet complete */
        st = kvc_call(k, "LoadSummaries", &lr.base, &kvarc__v1__load_summaries_reply__descriptor, NULL, 0, msg,
                      sizeof msg);
        CHECK(st == GRPC_STATUS_INVALID_ARGUMENT && strstr(msg, "complete"), "LoadSummaries past the end: status %d, "
              "'%s'", st, msg);
        lr.first_block = 0;
        lr.head = H;
        st = kvc_call(k, "LoadSummaries", &lr.base, &kvarc__v1__load_summaries_reply__descriptor, NULL, 0, msg,
                      sizeof msg);
        CHECK(st == GRPC_STATUS_INVALID_ARGUMENT && strstr(msg, "head"), "LoadSummaries of head %d: status %d, '%s'",
              H, st, msg);
        lr.head = 0;
        lr.count = 0;                                 /* every complete block: still nb0 of them */
        ProtobufCMessage *rep = NULL;
        st = kvc_call(k, "LoadSummaries", &lr.base, &kvarc__v1__load_summaries_reply__descriptor, &rep, 0, msg,
                      sizeof msg);
        CHECK(st == GRPC_STATUS_OK && rep && ((Kvarc__V1__LoadSummariesReply *)rep)->count == nb0,
              "after the refusals the layer still has %llu complete blocks: status %d", (unsigned long long)nb0, st);
        if (rep)
            protobuf_c_message_free_unpacked(rep, NULL);
        Kvarc__V1__OpenRequest orq = KVARC__V1__OPEN_REQUEST__INIT;    /* and its length is what it was */
        orq.ns = "lib";
        orq.name = "c";
        rep = NULL;
        st = kvc_call(k, "Open", &orq.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg);
        const Kvarc__V1__ConvInfo *ci = st == GRPC_STATUS_OK && rep ? ((Kvarc__V1__ConvReply *)rep)->info : NULL;
        CHECK(ci && ci->n_layer_lengths == 1 && ci->layer_lengths[0] == len0, "after the refusals layer 0 still "
              "holds %llu tokens (%llu)", (unsigned long long)len0,
              ci && ci->n_layer_lengths ? (unsigned long long)ci->layer_lengths[0] : 0ull);
        if (rep)
            protobuf_c_message_free_unpacked(rep, NULL);
        kvc_close(k);
    }

    CHECK_RC(kvarc_conv_attach(cl2, "lib", "c", &m, &o, &r), 0);
    CHECK(all_summarized(r), "an attaching worker loads a summary for every complete block (%llu)",
          (unsigned long long)r->layers[0].sum_n);
    if (!w || !r) {                        /* nothing below can run */
        kill(pid, SIGKILL);
        return tu_finish("test_libkvarc_coarse");
    }
    CHECK(r->layers[0].sum_n == w->layers[0].sum_n &&
          !memcmp(r->layers[0].sum_bits[1], w->layers[0].sum_bits[1], r->layers[0].sum_n * KVG_SUM_ITEMS * D / 8) &&
          !memcmp(r->layers[0].sum_scale[0], w->layers[0].sum_scale[0], r->layers[0].sum_n * KVG_SUM_ITEMS * 2),
          "the loaded summaries are the writer's bytes");

    /* needle queries: found with the coarse tier, by writer and reader alike, bit for bit */
    float q[QH * D], ow[QH * D], orr[QH * D];
    static float one_k[H * D], one_v[H * D];
    int t = t_end;
    for (int j = 0; j < 3 && !tu_failures; j++, t++) {
        for (int h = 0; h < H; h++) {
            memcpy(one_k + h * D, K[h][t], D * 4);
            memcpy(one_v + h * D, V[h][t], D * 4);
        }
        CHECK_RC(kvarc_append(w, 0, KVARC_DTYPE_F32, one_k, one_v, 1), 0);
        CHECK_RC(kvarc_append(r, 0, KVARC_DTYPE_F32, one_k, one_v, 1), 0);
        needle_query(&g, j, (uint64_t)t, q);
        CHECK_RC(kvarc_attend(w, 0, q, 1, ow), 0);
        CHECK_RC(kvarc_attend(r, 0, q, 1, orr), 0);
        for (uint32_t h = 0; h < H; h++) {
            uint64_t pw[64], pr[64];
            size_t nw = kvarc_last_retrieved(w, h, pw, 64), nr = kvarc_last_retrieved(r, h, pr, 64);
            CHECK(nw == o.top_k && nr == nw && !memcmp(pw, pr, nw * 8), "needle %d head %u: same retrieval", j, h);
            CHECK(has(pw, nw, needles[j]), "needle %d (position %llu) head %u retrieved with 4 of 128 blocks "
                  "scanned", j, (unsigned long long)needles[j], h);
        }
    }
    /* blocks without summaries (an archive a writer made without them: here every other block of the
     * reader's copy marked so) are always scanned, beside the 4 chosen: the needles are still found.
     * Every fourth block (31): still well under the whole range, so the coarse path runs */
    for (uint64_t b = 0; b < r->layers[0].sum_n; b += 4)
        r->layers[0].sum_ok[b] = 0;
    for (int j = 0; j < 3 && !tu_failures; j++) {
        needle_query(&g, j, (uint64_t)(t - 1), q);
        CHECK_RC(kvarc_attend(r, 0, q, 1, orr), 0);       /* the last token again, aimed at needle j */
        uint64_t pr[64];
        size_t nr = kvarc_last_retrieved(r, 1, pr, 64);
        CHECK(has(pr, nr, needles[j]), "needle %d found with every fourth block unsummarized", j);
    }
    for (uint64_t b = 0; b < r->layers[0].sum_n; b++)     /* all of them: the full scan */
        r->layers[0].sum_ok[b] = 0;
    needle_query(&g, 0, (uint64_t)(t - 1), q);
    CHECK_RC(kvarc_attend(r, 0, q, 1, orr), 0);
    {
        uint64_t pr[64];
        size_t nr = kvarc_last_retrieved(r, 0, pr, 64);
        CHECK(has(pr, nr, needles[0]), "needle 0 found with no block summarized");
    }

    /* stage 1 over 1 thread and over 2 (one kv head each; threads start from 32K cold tokens): a
     * 40960-token conversation (the keys again and again), read back by two workers: the same
     * retrieval, the same output bits, for the coarse tier and for the full scan */
    {
        kvarc_conv *tw = NULL;
        CHECK_RC(kvarc_conv_create(cl, "lib", "threads", &m, &o, means, &tw), 0);
        static float kb[H * 512 * D], vb[H * 512 * D];
        for (int t0 = 0; t0 < 40960 && tw && !tu_failures; t0 += 512) {
            for (int h = 0; h < H; h++)
                for (int i = 0; i < 512; i++) {
                    memcpy(kb + ((size_t)h * 512 + i) * D, K[h][(t0 + i) % N], D * 4);
                    memcpy(vb + ((size_t)h * 512 + i) * D, V[h][(t0 + i) % N], D * 4);
                }
            CHECK_RC(kvarc_append(tw, 0, KVARC_DTYPE_F32, kb, vb, 512), 0);
        }
        CHECK_RC(kvarc_conv_close(tw), 0);
        for (int coarse = 0; coarse < 2 && !tu_failures; coarse++) {
            kvarc_options o1 = o, o2 = o;
            o1.threads = 1;
            o2.threads = 2;
            o1.coarse_blocks = o2.coarse_blocks = coarse ? o.coarse_blocks : 0;
            kvarc_conv *a1 = NULL, *a2 = NULL;
            CHECK_RC(kvarc_conv_attach(cl, "lib", "threads", &m, &o1, &a1), 0);
            CHECK_RC(kvarc_conv_attach(cl2, "lib", "threads", &m, &o2, &a2), 0);
            for (int j = 0; j < 3 && a1 && a2 && !tu_failures; j++) {
                float o_1[QH * D], o_2[QH * D];
                needle_query(&g, j, kvarc_length(a1, 0) - 1, q);
                CHECK_RC(kvarc_attend(a1, 0, q, 1, o_1), 0);
                CHECK_RC(kvarc_attend(a2, 0, q, 1, o_2), 0);
                CHECK(!memcmp(o_1, o_2, sizeof o_1), "coarse %d query %d: 1 and 2 stage-1 threads give the same "
                      "output bits", coarse, j);
                for (uint32_t h = 0; h < H; h++) {
                    uint64_t p1[64], p2[64];
                    size_t n1 = kvarc_last_retrieved(a1, h, p1, 64), n2 = kvarc_last_retrieved(a2, h, p2, 64);
                    CHECK(n1 == n2 && n1 > 0 && !memcmp(p1, p2, n1 * 8), "coarse %d query %d head %u: the same "
                          "retrieval on 1 and 2 threads", coarse, j, h);
                }
            }
            kvarc_conv_close(a1);
            kvarc_conv_close(a2);
        }
        kvarc_options bad = o;
        bad.threads = 100000;
        kvarc_conv *x = NULL;
        CHECK_RC(kvarc_conv_attach(cl, "lib", "threads", &m, &bad, &x), -EINVAL);
        CHECK(strstr(kvarc_client_errmsg(cl), "threads") != NULL, "the refusal names threads: %s",
              kvarc_client_errmsg(cl));
        bad = o;
        bad.prefill_coarse_blocks = 3;          /* 192 tokens scanned, fewer than the 8 x 64 shortlisted */
        bad.shortlist = 8;
        bad.top_k = 64;
        bad.coarse_blocks = 0;
        CHECK_RC(kvarc_conv_attach(cl, "lib", "threads", &m, &bad, &x), -EINVAL);
        CHECK(strstr(kvarc_client_errmsg(cl), "prefill_coarse_blocks") != NULL,
              "the refusal names prefill_coarse_blocks: %s", kvarc_client_errmsg(cl));
        bad = o;
        bad.prefill_shortlist = o.shortlist + 1;
        CHECK_RC(kvarc_conv_attach(cl, "lib", "threads", &m, &bad, &x), -EINVAL);
        CHECK(strstr(kvarc_client_errmsg(cl), "prefill_shortlist") != NULL, "the refusal names prefill_shortlist: %s",
              kvarc_client_errmsg(cl));
    }

    /* the fast tier: stage 1b in kvarcd gives the client's own scan's bits, true positions and
     * remapped, through the coarse tier's runs and through one run of the whole cold range */
    {
        kvarc_options o0 = o, om = o, om0 = o;
        o0.coarse_blocks = om0.coarse_blocks = 0;
        om.pos_mode = om0.pos_mode = 1;
        fast_vs_full(cl, &m, &o, "threads", "fast-true", 0, &g);
        fast_vs_full(cl2, &m, &o0, "threads", "fast-true-all", 0, &g);
        fast_vs_full(cl, &m, &om, "remapped", "fast-rm", 0, &g);
        fast_vs_full(cl2, &m, &om0, "remapped", "fast-rm-all", 0, &g);
        /* stage 1 through the coarse tier on the GPU (where there is one): the CPU's retrieval */
        fast_vs_full(cl, &m, &o, "threads", "gpu-true", 1, &g);
        fast_vs_full(cl2, &m, &om, "remapped", "gpu-rm", 1, &g);
    }

    /* prefill_coarse_blocks: in a chunk of 3 queries, the first two go through the coarse tier (the
     * bits of a reader with coarse_blocks set), the last scans every cold token (the bits of a reader
     * without): three forks of the 40960-token conversation, each given the same 3 tokens */
    {
        kvarc_options oa = o, ob = o, oc = o, od = o, oe = o;
        oa.coarse_blocks = 0;                   /* full scan */
        ob.coarse_blocks = o.coarse_blocks;     /* coarse everywhere */
        oc.coarse_blocks = 0;                   /* coarse in the chunk but its last query */
        oc.prefill_coarse_blocks = o.coarse_blocks;
        od.coarse_blocks = oe.coarse_blocks = 0;  /* prefill_shortlist 1 against shortlist 1 everywhere */
        od.prefill_shortlist = 1;
        oe.shortlist = 1;
        kvarc_conv *src = NULL, *ca = NULL, *cb = NULL, *cc = NULL, *cd = NULL, *ce = NULL;
        CHECK_RC(kvarc_conv_attach(cl, "lib", "threads", &m, &oa, &src), 0);
        if (src) {
            CHECK_RC(kvarc_fork(src, "lib", "pc-a", 0), 0);
            CHECK_RC(kvarc_fork(src, "lib", "pc-b", 0), 0);
            CHECK_RC(kvarc_fork(src, "lib", "pc-c", 0), 0);
            CHECK_RC(kvarc_fork(src, "lib", "pc-d", 0), 0);
            CHECK_RC(kvarc_fork(src, "lib", "pc-e", 0), 0);
            kvarc_conv_close(src);
        }
        CHECK_RC(kvarc_conv_attach(cl, "lib", "pc-a", &m, &oa, &ca), 0);
        CHECK_RC(kvarc_conv_attach(cl, "lib", "pc-b", &m, &ob, &cb), 0);
        CHECK_RC(kvarc_conv_attach(cl2, "lib", "pc-c", &m, &oc, &cc), 0);
        CHECK_RC(kvarc_conv_attach(cl2, "lib", "pc-d", &m, &od, &cd), 0);
        CHECK_RC(kvarc_conv_attach(cl2, "lib", "pc-e", &m, &oe, &ce), 0);
        static float qc[QH * 3 * D], outs[5][QH * 3 * D];
        kvarc_conv *cs[5] = { ca, cb, cc, cd, ce };
        uint64_t len = ca ? kvarc_length(ca, 0) : 0;
        for (int j = 0; j < 3; j++) {           /* query j of the chunk aims at needle j */
            float one_q[QH * D];
            needle_query(&g, j, len + (uint64_t)j, one_q);
            for (int hq = 0; hq < QH; hq++)
                memcpy(qc + ((size_t)hq * 3 + (size_t)j) * D, one_q + (size_t)hq * D, D * 4);
        }
        for (int c = 0; c < 5 && !tu_failures; c++) {
            if (!cs[c])
                continue;
            CHECK_RC(append_range(cs[c], (int)(len % (N - 3)), 3), 0);
            CHECK_RC(kvarc_attend(cs[c], 0, qc, 3, outs[c]), 0);
        }
        int first_coarse = 1, last_full = 1, differs = 0, first_short = 1, last_long = 1, differs_s = 0;
        for (int hq = 0; hq < QH; hq++)
            for (int j = 0; j < 3; j++) {
                size_t o3 = ((size_t)hq * 3 + (size_t)j) * D;
                if (j < 2) {
                    first_coarse &= !memcmp(outs[2] + o3, outs[1] + o3, D * 4);
                    first_short &= !memcmp(outs[3] + o3, outs[4] + o3, D * 4);
                } else {
                    last_full &= !memcmp(outs[2] + o3, outs[0] + o3, D * 4);
                    last_long &= !memcmp(outs[3] + o3, outs[0] + o3, D * 4);
                }
                differs |= j < 2 && memcmp(outs[0] + o3, outs[1] + o3, D * 4) != 0;
                differs_s |= memcmp(outs[0] + o3, outs[4] + o3, D * 4) != 0;
            }
        CHECK(first_short, "prefill_shortlist: the chunk's first queries give the bits of a shortlist of 1");
        CHECK(last_long, "prefill_shortlist: the chunk's last query gives the full shortlist's bits");
        CHECK(differs_s, "the case tells the shortlists apart");
        CHECK(first_coarse, "prefill_coarse_blocks: the chunk's first queries give the coarse reader's bits");
        CHECK(last_full, "prefill_coarse_blocks: the chunk's last query gives the full scan's bits");
        CHECK(differs, "the case tells the two apart (the coarse tier changed some output of the first queries)");
        kvarc_conv_close(ca);
        kvarc_conv_close(cb);
        kvarc_conv_close(cc);
        kvarc_conv_close(cd);
        kvarc_conv_close(ce);
    }

    /* the same needles through the full scan (coarse off), as a check of the setup */
    kvarc_options full = o;
    full.coarse_blocks = 0;
    CHECK_RC(kvarc_fork(w, "lib", "c-full", 0), 0);
    CHECK_RC(kvarc_conv_attach(cl2, "lib", "c-full", &m, &full, &f), 0);
    for (int j = 0; j < 3 && !tu_failures; j++, t++) {
        for (int h = 0; h < H; h++) {
            memcpy(one_k + h * D, K[h][t], D * 4);
            memcpy(one_v + h * D, V[h][t], D * 4);
        }
        CHECK_RC(kvarc_append(f, 0, KVARC_DTYPE_F32, one_k, one_v, 1), 0);
        needle_query(&g, j, (uint64_t)t, q);
        CHECK_RC(kvarc_attend(f, 0, q, 1, ow), 0);
        uint64_t pw[64];
        size_t nw = kvarc_last_retrieved(f, 0, pw, 64);
        CHECK(has(pw, nw, needles[j]), "needle %d retrieved by the full scan too", j);
    }
    kvarc_conv_close(f);
    kvarc_conv_close(r);

    /* a fork in the middle of a block, continued: the fork completes that block with its own summary */
    CHECK_RC(kvarc_conv_sync(w), 0);
    uint64_t wl = kvarc_length(w, 0);
    CHECK(wl % KVG_SIG_BLOCK != 0, "the fork point %llu is inside a block", (unsigned long long)wl);
    CHECK_RC(kvarc_fork(w, "lib", "c-fork", 0), 0);
    CHECK_RC(kvarc_conv_attach(cl, "lib", "c-fork", &m, &o, &fk), 0);
    if (fk) {
        CHECK_RC(append_range(fk, (int)wl, 150), 0);
        CHECK_RC(kvarc_conv_sync(fk), 0);
        CHECK_RC(kvarc_conv_attach(cl2, "lib", "c-fork", &m, &o, &fr), 0);
    }
    CHECK(fr && fr->layers[0].archived == wl + 150 && all_summarized(fr),
          "the fork's attached reader has every block summarized (%llu blocks, %llu tokens)",
          fr ? (unsigned long long)fr->layers[0].sum_n : 0ull, fr ? (unsigned long long)fr->layers[0].archived : 0ull);
    kvarc_conv_close(fr);
    kvarc_conv_close(fk);
    kvarc_conv_close(w);
    kvarc_client_close(cl);
    kvarc_client_close(cl2);
    kill(pid, SIGTERM);
    CHECK(wait_exit(pid, 60000) == 0, "kvarcd exits 0");   /* 60 s: the sanitizer build under a loaded machine exits slowly */
    if (!tu_failures) {
        char log[300];
        snprintf(log, sizeof log, "%s.log", dir);
        unlink(log);
        eu_rmrf(dir);
    }
    return tu_finish("test_libkvarc_coarse");
}
