/* test_cuda_parity: every GPU kernel equals its CPU reference byte for
 * byte on the same inputs, at every head_dim, format and input dtype, and
 * for the launch shapes it may use (token counts that do not fill a grid,
 * GQA groups, top-k sizes up to the GPU limit); attention to a stated
 * tolerance (1e-5 relative). Exit 77 without a GPU. */
#include <cuda_runtime_api.h>
#include <errno.h>
#include <math.h>
#include <string.h>

#include "kvg_cuda.h"
#include "testutil.h"

static void *dev_copy(const void *h, size_t bytes)
{
    void *d = NULL;
    if (cudaMalloc(&d, bytes ? bytes : 1) != cudaSuccess)
        return NULL;
    if (h && bytes)
        cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
    return d;
}

static void *dev_back(const void *d, size_t bytes)
{
    void *h = malloc(bytes ? bytes : 1);
    cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost);
    return h;
}

static void codec_case(int fmt, int d, kvarc_dtype dt, size_t n, tu_rng *r)
{
    size_t ne = n * (size_t)d, es = kvarc_dtype_size(dt);
    float *kf = malloc(ne * 4), *vf = malloc(ne * 4);
    tu_keys_outliers(r, kf, n, d);
    tu_keys_outliers(r, vf, n, d);
    uint8_t *k = malloc(ne * es), *v = malloc(ne * es);
    for (size_t i = 0; i < ne; i++) {
        kvarc_store_f32(dt, k, i, kf[i]);
        kvarc_store_f32(dt, v, i, 0.5f * vf[i]);
    }
    float mu_k[KVARC_HEAD_DIM_MAX], mu_v[KVARC_HEAD_DIM_MAX];
    for (int i = 0; i < d; i++) {
        mu_k[i] = 0.3f * tu_gauss(r);
        mu_v[i] = 0.1f * tu_gauss(r);
    }
    /* token 1 equals the mean (zero vector after centering) */
    for (int i = 0; i < d; i++) {
        kvarc_store_f32(dt, k, (size_t)d + i, mu_k[i]);
        kvarc_store_f32(dt, v, (size_t)d + i, mu_v[i]);
        mu_k[i] = kvarc_load_f32(dt, k, (size_t)d + i);
        mu_v[i] = kvarc_load_f32(dt, v, (size_t)d + i);
    }
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, d, 0xabc + (uint64_t)fmt);
    int rb = kvarc_record_bytes(fmt, d);
    uint8_t *rec = malloc(n * rb), *bits = malloc(n * d / 8);
    uint16_t *ss = malloc(n * 2);
    float *kd = malloc(ne * 4), *vd = malloc(ne * 4);
    kvg_codec c = { fmt, &rot, mu_k, mu_v };
    CHECK_RC(kvg_encode_ref(&c, dt, k, v, n, rec, bits, ss, NULL), 0);
    CHECK_RC(kvg_decode_ref(&c, rec, n, kd, vd), 0);

    void *dk = dev_copy(k, ne * es), *dv = dev_copy(v, ne * es);
    float *dmk = dev_copy(mu_k, (size_t)d * 4), *dmv = dev_copy(mu_v, (size_t)d * 4);
    uint8_t *drec = dev_copy(NULL, n * rb), *dbits = dev_copy(NULL, n * d / 8);
    uint16_t *dss = dev_copy(NULL, n * 2);
    float *dkd = dev_copy(NULL, ne * 4), *dvd = dev_copy(NULL, ne * 4);
    kvg_codec cd = { fmt, &rot, dmk, dmv };
    CHECK_RC(kvg_encode_cuda(&cd, dt, dk, dv, n, drec, dbits, dss, NULL, NULL), 0);
    CHECK_RC(kvg_decode_cuda(&cd, drec, n, dkd, dvd, NULL), 0);
    uint8_t *grec = dev_back(drec, n * rb), *gbits = dev_back(dbits, n * d / 8);
    uint16_t *gss = dev_back(dss, n * 2);
    float *gkd = dev_back(dkd, ne * 4), *gvd = dev_back(dvd, ne * 4);
    const char *name = kvarc_format_get(fmt)->name;
    size_t diff = 0;
    for (size_t t = 0; t < n; t++)
        diff += memcmp(rec + t * rb, grec + t * rb, (size_t)rb) != 0;
    CHECK(diff == 0, "%s d%d %s: %zu of %zu records differ", name, d, kvarc_dtype_name(dt), diff, n);
    CHECK(!memcmp(bits, gbits, n * d / 8), "%s d%d %s: signature bits differ", name, d, kvarc_dtype_name(dt));
    CHECK(!memcmp(ss, gss, n * 2), "%s d%d %s: signature scales differ", name, d, kvarc_dtype_name(dt));
    CHECK(!memcmp(kd, gkd, ne * 4) && !memcmp(vd, gvd, ne * 4), "%s d%d %s: decoded K/V differ",
          name, d, kvarc_dtype_name(dt));

    /* NaN at tokens 7 and n-2: the first one is reported */
    if (n > 9) {
        kvarc_store_f32(dt, v, 7 * (size_t)d + 3, NAN);
        kvarc_store_f32(dt, k, (n - 2) * (size_t)d, INFINITY);
        cudaMemcpy(dk, k, ne * es, cudaMemcpyHostToDevice);
        cudaMemcpy(dv, v, ne * es, cudaMemcpyHostToDevice);
        size_t bad = 0;
        CHECK_RC(kvg_encode_cuda(&cd, dt, dk, dv, n, drec, dbits, dss, &bad, NULL), KVARC_ENONFINITE);
        CHECK(bad == 7, "%s d%d: GPU reports bad token %zu, want 7", name, d, bad);
    }
    cudaFree(dk); cudaFree(dv); cudaFree(dmk); cudaFree(dmv); cudaFree(drec); cudaFree(dbits);
    cudaFree(dss); cudaFree(dkd); cudaFree(dvd);
    free(kf); free(vf); free(k); free(v); free(rec); free(bits); free(ss); free(kd); free(vd);
    free(grec); free(gbits); free(gss); free(gkd); free(gvd);
}

static void score_case(int d, size_t n, int n_q, tu_rng *r)
{
    uint8_t *bits = malloc(n * d / 8);
    uint16_t *ss = malloc(n * 2);
    for (size_t i = 0; i < n * d / 8; i++)
        bits[i] = (uint8_t)kvarc_splitmix64(&r->s);
    for (size_t i = 0; i < n; i++)
        ss[i] = kvarc_f32_to_f16((float)tu_uniform(r) * 3.0f);
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, d, 5);
    kvg_query q[8];
    float mu[KVARC_HEAD_DIM_MAX], qv[KVARC_HEAD_DIM_MAX];
    for (int i = 0; i < d; i++)
        mu[i] = tu_gauss(r);
    for (int h = 0; h < n_q; h++) {
        for (int i = 0; i < d; i++)
            qv[i] = tu_gauss(r) * (h + 1);
        kvg_query_prep_ref(&rot, mu, KVARC_DTYPE_F32, qv, &q[h]);
    }
    float *cs = malloc(n * 4);
    uint8_t *db = dev_copy(bits, n * d / 8);
    uint16_t *dss = dev_copy(ss, n * 2);
    float *dsc = dev_copy(NULL, n * 4);
    for (int mode = 0; mode < 2; mode++)
        for (int comb = 0; comb < 2; comb++) {
            CHECK_RC(kvg_score_ref((kvg_score_mode)mode, (kvg_combine)comb, q, n_q, bits, ss, n, cs), 0);
            CHECK_RC(kvg_score_cuda((kvg_score_mode)mode, (kvg_combine)comb, q, n_q, db, dss, n, dsc, NULL), 0);
            float *gs = dev_back(dsc, n * 4);
            size_t diff = 0;
            for (size_t j = 0; j < n; j++)
                diff += memcmp(&cs[j], &gs[j], 4) != 0;
            CHECK(diff == 0, "score d%d n%zu q%d mode %d comb %d: %zu of %zu differ", d, n, n_q, mode,
                  comb, diff, n);
            free(gs);
        }
    /* kind-2 signatures: a bias per 64-position block, from a first
     * position off a block boundary */
    const uint64_t first = 1000003;
    size_t nblk = (size_t)kvg_blocks_of(first, n);
    float *bb = malloc((size_t)n_q * nblk * 4);
    for (size_t i = 0; i < (size_t)n_q * nblk; i++)
        bb[i] = tu_gauss(r) * 20.0f;
    float *dbb = dev_copy(bb, (size_t)n_q * nblk * 4);
    for (int comb = 0; comb < 2; comb++) {
        CHECK_RC(kvg_score_pos_ref(KVG_SCORE_ASYM, (kvg_combine)comb, q, n_q, bits, ss, n, first, bb, nblk, cs), 0);
        CHECK_RC(kvg_score_pos_cuda(KVG_SCORE_ASYM, (kvg_combine)comb, q, n_q, db, dss, n, first, dbb, nblk, dsc,
                                    NULL), 0);
        float *gs = dev_back(dsc, n * 4);
        size_t diff = 0;
        for (size_t j = 0; j < n; j++)
            diff += memcmp(&cs[j], &gs[j], 4) != 0;
        CHECK(diff == 0, "kind-2 score d%d n%zu q%d comb %d: %zu of %zu differ", d, n, n_q, comb, diff, n);
        free(gs);
    }
    cudaFree(dbb);
    free(bb);
    cudaFree(db); cudaFree(dss); cudaFree(dsc);
    free(bits); free(ss); free(cs);
}

/* The coarse tier (SCHEMA.md 6.3): summaries made on the device equal
 * kvg_summary_ref's bytes (blocks of 64 tokens and a short one, keys with
 * outlier channels and a planted needle); summary items scored with one
 * bias per block equal kvg_score_items_ref with the biases spelled out;
 * block best equals kvg_block_best_ref; and stage 1b's scattered pieces
 * equal kvg_score_runs of the same runs. */
static void coarse_case(int d, size_t nb, size_t n, int n_q, tu_rng *r)
{
    const size_t sb = (size_t)d / 8, S = KVG_SUM_ITEMS, nt = nb * n;
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, d, 77);
    float *x = malloc(nt * d * 4);
    tu_keys_outliers(r, x, nt, d);
    for (size_t b = 0; b < nb; b += 3)                 /* a needle in every third block */
        for (int i = 0; i < d; i++)
            x[(b * n + (b * 7) % n) * d + i] += 4.0f * tu_gauss(r);
    uint8_t *bits = malloc(nt * sb), *cb = malloc(nb * S * sb);
    uint16_t *ss = malloc(nt * 2), *cs = malloc(nb * S * 2);
    for (size_t t = 0; t < nt; t++)
        CHECK_RC(kvg_signature_ref(&rot, x + t * d, bits + t * sb, &ss[t]), 0);
    for (size_t b = 0; b < nb; b++)
        CHECK_RC(kvg_summary_ref(&rot, x + b * n * d, bits + b * n * sb, ss + b * n, n, cb + b * S * sb, cs + b * S),
                 0);
    float *dx = dev_copy(x, nt * d * 4);
    uint8_t *dbits = dev_copy(bits, nt * sb), *dcb = dev_copy(NULL, nb * S * sb);
    uint16_t *dss = dev_copy(ss, nt * 2), *dcs = dev_copy(NULL, nb * S * 2);
    CHECK_RC(kvg_summary_cuda(&rot, dx, dbits, dss, nb, n, dcb, dcs, NULL), 0);
    uint8_t *gb = dev_back(dcb, nb * S * sb);
    uint16_t *gs = dev_back(dcs, nb * S * 2);
    CHECK(!memcmp(gb, cb, nb * S * sb) && !memcmp(gs, cs, nb * S * 2), "summaries d%d nb%zu n%zu differ", d, nb, n);
    free(gb);
    free(gs);
    /* a non-finite key: refused as the reference refuses it */
    {
        uint8_t tb[KVG_SUM_ITEMS * KVARC_HEAD_DIM_MAX / 8], *dtb = dev_copy(NULL, nb * S * sb);
        uint16_t ts[KVG_SUM_ITEMS], *dts = dev_copy(NULL, nb * S * 2);
        float keep = x[(n - 1) * d + 1];
        x[(n - 1) * d + 1] = NAN;
        float *dbad = dev_copy(x, nt * d * 4);
        CHECK_RC(kvg_summary_ref(&rot, x, bits, ss, n, tb, ts), KVARC_ENONFINITE);
        CHECK_RC(kvg_summary_cuda(&rot, dbad, dbits, dss, nb, n, dtb, dts, NULL), KVARC_ENONFINITE);
        x[(n - 1) * d + 1] = keep;
        cudaFree(dbad); cudaFree(dtb); cudaFree(dts);
    }

    /* the items, one bias per block (and the reference's layout) */
    kvg_query q[8];
    float mu[KVARC_HEAD_DIM_MAX], qv[KVARC_HEAD_DIM_MAX];
    for (int i = 0; i < d; i++)
        mu[i] = 0.1f * tu_gauss(r);
    for (int h = 0; h < n_q; h++) {
        for (int i = 0; i < d; i++)
            qv[i] = tu_gauss(r);
        kvg_query_prep_ref(&rot, mu, KVARC_DTYPE_F32, qv, &q[h]);
    }
    const size_t ni = nb * S, stride = nb + 5;
    float *bb = malloc((size_t)n_q * stride * 4), *ib = malloc((size_t)n_q * ni * 4);
    for (size_t i = 0; i < (size_t)n_q * stride; i++)
        bb[i] = 10.0f * tu_gauss(r);
    for (int h = 0; h < n_q; h++)
        for (size_t j = 0; j < ni; j++)
            ib[h * ni + j] = bb[h * stride + j / S];
    float *dbb = dev_copy(bb, (size_t)n_q * stride * 4), *dib = dev_copy(ib, (size_t)n_q * ni * 4);
    float *cis = malloc(ni * 4), *dis = dev_copy(NULL, ni * 4);
    for (int mode = 0; mode < 2; mode++)
        for (int comb = 0; comb < 2; comb++)
            for (int lay = 0; lay < 3; lay++) {    /* per item, one per block, none (the queries' biases) */
                CHECK_RC(kvg_score_items_ref((kvg_score_mode)mode, (kvg_combine)comb, q, n_q, cb, cs, ni,
                                             lay == 2 ? NULL : ib, cis), 0);
                CHECK_RC(kvg_score_items_cuda((kvg_score_mode)mode, (kvg_combine)comb, q, n_q, dcb, dcs, ni,
                                              lay == 0 ? dib : lay == 1 ? dbb : NULL, lay == 1 ? S : 1,
                                              lay == 1 ? stride : ni, dis, NULL), 0);
                float *g = dev_back(dis, ni * 4);
                CHECK(!memcmp(g, cis, ni * 4), "summary items d%d q%d mode %d comb %d layout %d differ", d, n_q, mode,
                      comb, lay);
                free(g);
            }
    CHECK_RC(kvg_score_items_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, q, n_q, cb, cs, ni, ib, cis), 0);
    /* block best, with blocks that have no summaries */
    uint8_t *ok = malloc(nb);
    for (size_t b = 0; b < nb; b++)
        ok[b] = b % 5 != 2;
    cis[0] = NAN;                                      /* a NaN first item ranks as the reference ranks it */
    cudaMemcpy(dis, cis, ni * 4, cudaMemcpyHostToDevice);
    uint8_t *dok = dev_copy(ok, nb);
    float *cbs = malloc(nb * 4), *dbs = dev_copy(NULL, nb * 4);
    for (int withok = 0; withok < 2; withok++) {
        kvg_block_best_ref(cis, nb, (int)S, withok ? ok : NULL, cbs);
        CHECK_RC(kvg_block_best_cuda(dis, nb, (int)S, withok ? dok : NULL, dbs, NULL), 0);
        float *g = dev_back(dbs, nb * 4);
        CHECK(!memcmp(g, cbs, nb * 4), "block best nb%zu ok %d differs", nb, withok);
        free(g);
    }

    /* stage 1b's pieces: runs over the token signatures from a first
     * position off a block boundary, split where a run would cross a
     * (simulated) chunk, against kvg_score_runs */
    const uint64_t first = 1000003, chunk = 1000;
    uint64_t runs[16];
    size_t nr = 0, tot = 0;
    for (uint64_t at = 5; at + 1 < nt && nr < 8; at += 130 + 37 * nr) {
        uint64_t len = 1 + (at * 13) % 120;
        if (at + len > nt)
            len = nt - at;
        runs[2 * nr] = at;
        runs[2 * nr + 1] = len;
        tot += len;
        nr++;
    }
    size_t nblk = (size_t)kvg_blocks_of(first, nt);
    float *rb = malloc((size_t)n_q * nblk * 4);
    for (size_t i = 0; i < (size_t)n_q * nblk; i++)
        rb[i] = 10.0f * tu_gauss(r);
    float *drb = dev_copy(rb, (size_t)n_q * nblk * 4);
    float *crs = malloc((tot ? tot : 1) * 4), *drs = dev_copy(NULL, (tot ? tot : 1) * 4);
    kvg_cuda_piece pc[64];
    size_t np = 0, out = 0;
    for (size_t i = 0; i < nr; i++)
        for (uint64_t p = runs[2 * i]; p < runs[2 * i] + runs[2 * i + 1];) {
            uint64_t pos = first + p, lim = (pos / chunk + 1) * chunk - first, e = runs[2 * i] + runs[2 * i + 1];
            uint64_t cnt = (e < lim ? e : lim) - p;
            pc[np++] = (kvg_cuda_piece){ dbits + p * sb, dss + p, pos, cnt, out };
            out += cnt;
            p += cnt;
        }
    for (int mode = 0; mode < 2; mode++)
        for (int comb = 0; comb < 2; comb++)
            for (int wb = 0; wb < 2; wb++) {
                CHECK_RC(kvg_score_runs((kvg_score_mode)mode, (kvg_combine)comb, q, n_q, bits, ss, first, runs, nr,
                                        wb ? rb : NULL, nblk, crs), 0);
                CHECK_RC(kvg_score_pieces_cuda((kvg_score_mode)mode, (kvg_combine)comb, q, n_q, pc, np,
                                               first / KVG_SIG_BLOCK, wb ? drb : NULL, nblk, drs, NULL), 0);
                float *g = dev_back(drs, tot * 4);
                CHECK(!memcmp(g, crs, tot * 4), "pieces d%d q%d mode %d comb %d bias %d (%zu pieces) differ", d, n_q,
                      mode, comb, wb, np);
                free(g);
            }
    if (np) {                                           /* a piece outside the biases is refused, either side */
        kvg_cuda_piece far = pc[0];
        far.pos = (first / KVG_SIG_BLOCK + nblk) * KVG_SIG_BLOCK;
        CHECK_RC(kvg_score_pieces_cuda(KVG_SCORE_ASYM, KVG_COMBINE_MAX, q, n_q, &far, 1, first / KVG_SIG_BLOCK, drb,
                                       nblk, drs, NULL), -EINVAL);
        far.pos = first / KVG_SIG_BLOCK * KVG_SIG_BLOCK - 1;
        CHECK_RC(kvg_score_pieces_cuda(KVG_SCORE_ASYM, KVG_COMBINE_MAX, q, n_q, &far, 1, first / KVG_SIG_BLOCK, drb,
                                       nblk, drs, NULL), -EINVAL);
    }
    cudaFree(dx); cudaFree(dbits); cudaFree(dcb); cudaFree(dss); cudaFree(dcs); cudaFree(dbb); cudaFree(dib);
    cudaFree(dis); cudaFree(dok); cudaFree(dbs); cudaFree(drb); cudaFree(drs);
    free(x); free(bits); free(cb); free(ss); free(cs); free(bb); free(ib); free(cis); free(ok); free(cbs);
    free(rb); free(crs);
}

static void topk_case(const char *what, const float *s, size_t n, size_t k)
{
    uint32_t *ci = malloc((k ? k : 1) * 4), *gi;
    float *cv = malloc((k ? k : 1) * 4), *gv;
    long want = kvg_topk_ref(s, n, k, ci, cv, NULL);
    float *ds = dev_copy(s, n * 4), *dv = dev_copy(NULL, k * 4);
    uint32_t *di = dev_copy(NULL, k * 4);
    void *scr = dev_copy(NULL, kvg_topk_cuda_scratch_bytes(n));
    long got = kvg_topk_cuda(ds, n, k, di, dv, scr, NULL);
    CHECK(got == want, "topk %s n%zu k%zu: GPU returned %ld, CPU %ld", what, n, k, got, want);
    gi = dev_back(di, k * 4);
    gv = dev_back(dv, k * 4);
    if (got == want && want > 0)
        CHECK(!memcmp(ci, gi, (size_t)want * 4) && !memcmp(cv, gv, (size_t)want * 4),
              "topk %s n%zu k%zu: selection differs", what, n, k);
    cudaFree(ds); cudaFree(dv); cudaFree(di); cudaFree(scr);
    free(ci); free(cv); free(gi); free(gv);
}

/* Query preparation: every kvg_query struct equal byte for byte, with
 * and without centering means, each input dtype; a NaN is refused. */
static void query_case(int d, kvarc_dtype dt, size_t n, tu_rng *r)
{
    size_t es = kvarc_dtype_size(dt);
    uint8_t *q = malloc(n * (size_t)d * es);
    for (size_t i = 0; i < n * (size_t)d; i++)
        kvarc_store_f32(dt, q, i, tu_gauss(r) * (i % 17 == 3 ? 8.0f : 1.0f));
    float mu[KVARC_HEAD_DIM_MAX];
    for (int i = 0; i < d; i++)
        mu[i] = tu_gauss(r);
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, d, 77 + (uint64_t)d);
    kvg_query *cq = calloc(n, sizeof *cq);
    void *dq = dev_copy(q, n * (size_t)d * es);
    float *dmu = dev_copy(mu, (size_t)d * 4);
    kvg_query *dout = dev_copy(NULL, n * sizeof *cq);
    for (int with_mu = 0; with_mu < 2; with_mu++) {
        for (size_t j = 0; j < n; j++)
            CHECK_RC(kvg_query_prep_ref(&rot, with_mu ? mu : NULL, dt, q + j * (size_t)d * es, &cq[j]), 0);
        CHECK_RC(kvg_query_prep_cuda(&rot, with_mu ? dmu : NULL, dt, dq, n, dout, NULL), 0);
        kvg_query *gq = dev_back(dout, n * sizeof *cq);
        size_t diff = 0;
        for (size_t j = 0; j < n; j++)
            diff += memcmp(&cq[j], &gq[j], sizeof *cq) != 0;
        CHECK(diff == 0, "query prep d%d %s mu %d: %zu of %zu structs differ", d, kvarc_dtype_name(dt), with_mu,
              diff, n);
        free(gq);
    }
    kvarc_store_f32(dt, q, 5, NAN);
    cudaMemcpy(dq, q, n * (size_t)d * es, cudaMemcpyHostToDevice);
    CHECK_RC(kvg_query_prep_cuda(&rot, dmu, dt, dq, n, dout, NULL), KVARC_ENONFINITE);
    cudaFree(dq); cudaFree(dmu); cudaFree(dout);
    free(q); free(cq);
}

/* Attention over three partitions (sinks, retrieved with per-head counts,
 * a hot window longer than one GPU unit) against kvg_attend_ref: relative
 * error of each head's output below 1e-5 (fp32 sums in another order). */
static void attention_case(int d, int n_q_heads, int n_kv_heads, size_t hot, tu_rng *r)
{
    size_t sinks = 4, ret = 64, nk[3] = { sinks, ret, hot }, tot = 0;
    float *k[3], *v[3], *dk[3], *dv[3];
    size_t per_head[KVARC_HEAD_DIM_MAX];
    for (int h = 0; h < n_kv_heads; h++)
        per_head[h] = h % 3 == 2 ? 0 : ret - (size_t)h;           /* uneven, one head with none */
    for (int p = 0; p < 3; p++) {
        size_t ne = (size_t)n_kv_heads * nk[p] * (size_t)d;
        k[p] = malloc(ne * 4);
        v[p] = malloc(ne * 4);
        for (size_t i = 0; i < ne; i++) {
            k[p][i] = tu_gauss(r);
            v[p][i] = tu_gauss(r);
        }
        dk[p] = dev_copy(k[p], ne * 4);
        dv[p] = dev_copy(v[p], ne * 4);
        tot += ne;
    }
    kvg_attn_part hp[3], gp[3];
    for (int p = 0; p < 3; p++) {
        hp[p] = (kvg_attn_part){ k[p], v[p], nk[p], nk[p], p == 1 ? per_head : NULL };
        gp[p] = (kvg_attn_part){ dk[p], dv[p], nk[p], nk[p], p == 1 ? per_head : NULL };
    }
    size_t nq = (size_t)n_q_heads * (size_t)d;
    float *q = malloc(nq * 4), *co = malloc(nq * 4);
    for (size_t i = 0; i < nq; i++)
        q[i] = tu_gauss(r);
    float *dq = dev_copy(q, nq * 4), *dout = dev_copy(NULL, nq * 4);
    float scale = 1.0f / sqrtf((float)d);
    CHECK_RC(kvg_attend_ref(q, n_q_heads, n_kv_heads, d, scale, hp, 3, co), 0);
    CHECK_RC(kvg_attend_cuda(dq, n_q_heads, n_kv_heads, d, scale, gp, 3, dout, NULL), 0);
    float *go = dev_back(dout, nq * 4);
    double worst = 0;
    for (int hq = 0; hq < n_q_heads; hq++) {
        double num = 0, den = 0;
        for (int i = 0; i < d; i++) {
            double e = (double)go[hq * d + i] - co[hq * d + i];
            num += e * e;
            den += (double)co[hq * d + i] * co[hq * d + i];
        }
        worst = fmax(worst, sqrt(num / (den + 1e-30)));
    }
    CHECK(worst < 1e-5, "attention d%d q%d kv%d hot %zu: relative error %.3g", d, n_q_heads, n_kv_heads, hot, worst);
    /* a head with no key at all: -ENODATA from both */
    kvg_attn_part none = { dk[1], dv[1], ret, 0, NULL };
    CHECK_RC(kvg_attend_cuda(dq, n_q_heads, n_kv_heads, d, scale, &none, 1, dout, NULL), -ENODATA);
    for (int p = 0; p < 3; p++) {
        free(k[p]); free(v[p]); cudaFree(dk[p]); cudaFree(dv[p]);
    }
    cudaFree(dq); cudaFree(dout);
    free(q); free(co); free(go);
    (void)tot;
}

int main(void)
{
    if (!kvg_cuda_available()) {
        printf("test_cuda_parity: no CUDA device, skipped\n");
        return 77;
    }
    char name[256];
    kvg_cuda_device_name(name, sizeof name);
    printf("test_cuda_parity on %s\n", name);
    tu_rng r = { 31337 };
    static const int dims[] = { 64, 128, 256 };
    static const kvarc_dtype dts[] = { KVARC_DTYPE_F32, KVARC_DTYPE_F16, KVARC_DTYPE_BF16 };
    for (int f = KVARC_FMT_Q3; f <= KVARC_FMT_BF16; f++)
        for (int di = 0; di < 3; di++)
            for (int t = 0; t < 3; t++)
                codec_case(f, dims[di], dts[t], (size_t)(t == 0 ? 3000 : 257), &r);
    codec_case(KVARC_FMT_Q3, 128, KVARC_DTYPE_F32, 70000, &r);   /* more tokens than the grid */
    for (int di = 0; di < 3; di++) {
        score_case(dims[di], 100003, 1, &r);
        score_case(dims[di], 4097, 4, &r);
    }
    score_case(128, 1 << 20, 8, &r);
    for (int di = 0; di < 3; di++) {
        coarse_case(dims[di], 300, KVG_SIG_BLOCK, 4, &r);
        coarse_case(dims[di], 7, 17, 1, &r);           /* short blocks */
    }
    coarse_case(64, 70000, 2, 2, &r);                  /* more blocks than the summary kernel's grid */
    for (int di = 0; di < 3; di++)
        for (int t = 0; t < 3; t++)
            query_case(dims[di], dts[t], 33, &r);
    for (int di = 0; di < 3; di++)
        attention_case(dims[di], 8, 2, 300, &r);
    attention_case(128, 32, 8, 1000, &r);
    attention_case(128, 4, 4, 100000, &r);      /* a long partition: many units per head */

    size_t n = (1 << 20) + 17;
    float *s = malloc(n * 4);
    for (size_t j = 0; j < n; j++)
        s[j] = tu_gauss(&r);
    static const size_t ks[] = { 1, 64, 512, 1000, 4096 };
    for (int i = 0; i < 5; i++) {
        topk_case("gauss", s, n, ks[i]);
        topk_case("gauss-small", s, 3000, ks[i]);
    }
    topk_case("gauss", s, 5, 64);
    for (size_t j = 0; j < n; j++)
        s[j] = (float)(kvarc_splitmix64(&r.s) % 5);
    topk_case("ties", s, n, 512);
    topk_case("ties", s, n, 4096);
    for (size_t j = 0; j < n; j++)
        s[j] = (j % 7 == 0) ? NAN : (j % 11 == 0) ? -INFINITY : tu_gauss(&r);
    topk_case("nan", s, n, 777);
    float *ds = dev_copy(s, n * 4);
    CHECK(kvg_topk_cuda(ds, n, KVG_CUDA_TOPK_MAX + 1, (uint32_t *)ds, NULL, ds, NULL) == -EINVAL,
          "k above KVG_CUDA_TOPK_MAX must be refused");
    cudaFree(ds);
    free(s);
    return tu_finish("test_cuda_parity");
}
