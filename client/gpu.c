/* gpu.c - libkvarc's stage 1 and attention on the GPU (built when CUDA is).
 *
 * Design notes
 * When a CUDA device is present (and kvarc_options.use_gpu allows it),
 * every archived signature is also copied to VRAM, into per (layer, head)
 * chunks of KL_GPU_CHUNK tokens: growth allocates a new chunk and never
 * copies the old ones. Stage 1 scores the cold range chunk by chunk into
 * one device score array (kvg_score_cuda, byte-equal to kvg_score_ref) and
 * selects the shortlist on the device (kvg_topk_cuda, equal to
 * kvg_topk_ref); only the shortlist's indices come back to the host. The
 * answer is therefore the CPU path's, bit for bit: the tests that hold the
 * CPU path hold this one.
 * Invariants: 1. a layer's chunks hold exactly positions [0, archived) of
 * each head; 2. the score and scratch buffers are scratch, regrown freely;
 * 3. any device failure frees all of this (cv->gpu = NULL) and the
 * conversation goes on on the CPU path, whose host mirror is always whole.
 *
 * The coarse tier. When a query takes coarse_blocks, stage 1 runs
 * kl_stage1_coarse's steps on the device (coarse()): each layer's block
 * summaries and sum_ok are mirrored into VRAM (doubling arrays, brought up
 * to y->sum_n before the scan: invariant 5, device entries [0, sum_synced)
 * equal the host's, which never change below sum_n once kvarc_attach has
 * returned); the items are scored with their block's bias, each block's
 * best item and the best blocks are picked there, and only the chosen
 * block indices come back. The host makes the runs (kl_coarse_runs, the
 * CPU path's own code), cut into pieces of the VRAM chunks, and the
 * pieces' tokens are scored and the shortlist taken on the device. Where
 * the plan says the tier does not pay, the full scan runs as before.
 *
 * Attention. Each layer's hot window has a VRAM mirror of the host ring
 * (turned K and V, [H][ring][d], token p at slot p % ring), brought up to
 * date once per kvarc_attend by copying only the tokens appended since
 * (kl_gpu_ring_sync; a decode step copies one token per head) from the
 * host ring, which is page-locked (cudaHostRegister) so that the copies
 * are asynchronous on the conversation's stream. Per query, the small
 * parts the host prepares (the turned query, sinks and decoded retrieved
 * records) go through one pinned staging buffer in one copy, and
 * kvg_attend_cuda runs over [sinks][retrieved][hot, in up to two runs
 * where the ring wraps]; the output comes back through the staging
 * buffer (the one synchronisation of the query). Parity with the CPU
 * path is to kvg_attend_cuda's tolerance (relative 1e-5), not bits.
 * Invariant 4: ring_synced[l] <= len, and device slots of positions
 * [max(0, ring_synced - ring), ring_synced) equal the host's.
 * Not yet here (the GPU issue): the record cache in VRAM, records decoded
 * on the device, K/V handed over as device pointers without a host copy;
 * the host mirror of the signatures is still kept (the CPU fallback uses
 * it). None of this has run on a GPU yet: no device was lent to the
 * sessions that wrote it.
 */
#include <cuda_runtime_api.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "gpu.h"
#include "kvg_cuda.h"

#define KL_GPU_CHUNK 65536

struct kl_gpu {
    size_t     nl, nh, sb;             /* layers, kv heads, signature bytes */
    size_t     nchunks;                /* per (layer, head): chunks allocated */
    uint8_t ***bits;                   /* [L * H][chunk] device */
    uint16_t ***scales;                /* [L * H][chunk] device */
    size_t    *cap;                    /* [L * H] chunks allocated */
    float     *d_scores;
    uint32_t  *d_idx;
    void      *d_scratch;
    float     *d_bias;          /* kind-2 block biases of one stage-1 call */
    size_t     score_cap, scratch_cap, idx_cap, bias_cap;
    /* the coarse tier */
    uint8_t  **d_sum_bits;             /* [L * H] -> [sum_cap][KVG_SUM_ITEMS][sb] device */
    uint16_t **d_sum_scale;            /* [L * H] -> [sum_cap][KVG_SUM_ITEMS] */
    uint8_t  **d_sum_ok;               /* [L] -> [sum_cap] */
    uint64_t  *sum_cap, *sum_synced;   /* [L] blocks with room; mirrored (invariant 5) */
    float     *d_bs;                   /* block scores of one head */
    size_t     bs_cap;
    kvg_cuda_piece *pieces;            /* host: stage 1b's pieces of one head */
    size_t     piece_cap;
    /* attention */
    cudaStream_t stream;
    int        has_stream;
    float    **d_ring_kr, **d_ring_v;  /* [L] -> [H][ring][d] device, allocated at first use */
    uint64_t  *ring_synced;            /* [L] positions mirrored (invariant 4) */
    int       *host_registered;        /* [L] the host ring is page-locked */
    float     *h_stage, *d_stage;      /* pinned / device staging */
    size_t     stage_cap;              /* floats */
};

int kl_gpu_init(kvarc_conv *cv)
{
    cv->gpu = NULL;
    if (!cv->o.use_gpu || !kvg_cuda_available())
        return 0;
    kl_gpu *g = calloc(1, sizeof *g);
    if (!g)
        return kl_fail(cv, -ENOMEM, "out of memory");
    g->nl = cv->m.n_layers;
    g->nh = cv->m.n_kv_heads;
    g->sb = cv->m.head_dim / 8;
    g->bits = calloc(g->nl * g->nh, sizeof *g->bits);
    g->scales = calloc(g->nl * g->nh, sizeof *g->scales);
    g->cap = calloc(g->nl * g->nh, sizeof *g->cap);
    g->d_ring_kr = calloc(g->nl, sizeof *g->d_ring_kr);
    g->d_ring_v = calloc(g->nl, sizeof *g->d_ring_v);
    g->ring_synced = calloc(g->nl, sizeof *g->ring_synced);
    g->host_registered = calloc(g->nl, sizeof *g->host_registered);
    g->d_sum_bits = calloc(g->nl * g->nh, sizeof *g->d_sum_bits);
    g->d_sum_scale = calloc(g->nl * g->nh, sizeof *g->d_sum_scale);
    g->d_sum_ok = calloc(g->nl, sizeof *g->d_sum_ok);
    g->sum_cap = calloc(g->nl, sizeof *g->sum_cap);
    g->sum_synced = calloc(g->nl, sizeof *g->sum_synced);
    cv->gpu = g;
    if (!g->bits || !g->scales || !g->cap || !g->d_ring_kr || !g->d_ring_v || !g->ring_synced ||
        !g->host_registered || !g->d_sum_bits || !g->d_sum_scale || !g->d_sum_ok || !g->sum_cap || !g->sum_synced ||
        cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking) != cudaSuccess) {
        kl_gpu_free(cv);                   /* frees what a partial kl_gpu holds */
        return kl_fail(cv, -ENOMEM, "out of memory (or no CUDA stream)");
    }
    g->has_stream = 1;
    return 0;
}

void kl_gpu_free(kvarc_conv *cv)
{
    kl_gpu *g = cv->gpu;
    if (!g)
        return;
    for (size_t i = 0; g->bits && g->scales && g->cap && i < g->nl * g->nh; i++) {
        for (size_t c = 0; c < g->cap[i]; c++) {
            cudaFree(g->bits[i][c]);
            cudaFree(g->scales[i][c]);
        }
        free(g->bits[i]);
        free(g->scales[i]);
    }
    free(g->bits);
    free(g->scales);
    free(g->cap);
    cudaFree(g->d_scores);
    cudaFree(g->d_idx);
    cudaFree(g->d_scratch);
    cudaFree(g->d_bias);
    for (size_t i = 0; g->d_sum_bits && g->d_sum_scale && i < g->nl * g->nh; i++) {
        cudaFree(g->d_sum_bits[i]);
        cudaFree(g->d_sum_scale[i]);
    }
    for (size_t l = 0; g->d_sum_ok && l < g->nl; l++)
        cudaFree(g->d_sum_ok[l]);
    free(g->d_sum_bits);
    free(g->d_sum_scale);
    free(g->d_sum_ok);
    free(g->sum_cap);
    free(g->sum_synced);
    cudaFree(g->d_bs);
    free(g->pieces);
    if (g->has_stream)
        cudaStreamSynchronize(g->stream);
    for (size_t l = 0; g->d_ring_kr && g->d_ring_v && g->host_registered && l < g->nl; l++) {
        cudaFree(g->d_ring_kr[l]);
        cudaFree(g->d_ring_v[l]);
        if (g->host_registered[l]) {
            cudaHostUnregister(cv->layers[l].ring_kr);
            cudaHostUnregister(cv->layers[l].ring_v);
        }
    }
    cudaFreeHost(g->h_stage);
    cudaFree(g->d_stage);
    if (g->has_stream)
        cudaStreamDestroy(g->stream);
    free(g->d_ring_kr);
    free(g->d_ring_v);
    free(g->ring_synced);
    free(g->host_registered);
    free(g);
    cv->gpu = NULL;
}

/* Make chunks for positions [0, n) of slot i exist. */
static int reserve(kvarc_conv *cv, kl_gpu *g, size_t i, uint64_t n)
{
    size_t need = (size_t)((n + KL_GPU_CHUNK - 1) / KL_GPU_CHUNK);
    if (need <= g->cap[i])
        return 0;
    uint8_t **b = realloc(g->bits[i], need * sizeof *b);
    if (b)
        g->bits[i] = b;
    uint16_t **s = realloc(g->scales[i], need * sizeof *s);
    if (s)
        g->scales[i] = s;
    if (!b || !s)
        return kl_fail(cv, -ENOMEM, "out of memory");
    for (size_t c = g->cap[i]; c < need; c++) {
        if (cudaMalloc((void **)&g->bits[i][c], KL_GPU_CHUNK * g->sb) != cudaSuccess)
            return kl_fail(cv, -ENOMEM, "out of GPU memory for signatures (%zu chunks of %d tokens)", need,
                           KL_GPU_CHUNK);
        if (cudaMalloc((void **)&g->scales[i][c], KL_GPU_CHUNK * 2) != cudaSuccess) {
            cudaFree(g->bits[i][c]);
            return kl_fail(cv, -ENOMEM, "out of GPU memory for signatures");
        }
        g->cap[i] = c + 1;
    }
    return 0;
}

int kl_gpu_put_sigs(kvarc_conv *cv, uint32_t layer, uint32_t head, uint64_t first, const uint8_t *bits,
                    const uint16_t *scales, uint64_t n)
{
    kl_gpu *g = cv->gpu;
    size_t i = (size_t)layer * g->nh + head;
    int rc = reserve(cv, g, i, first + n);
    for (uint64_t p = first; !rc && p < first + n;) {
        size_t c = (size_t)(p / KL_GPU_CHUNK), off = (size_t)(p % KL_GPU_CHUNK);
        size_t cnt = KL_GPU_CHUNK - off < first + n - p ? KL_GPU_CHUNK - off : (size_t)(first + n - p);
        if (cudaMemcpy(g->bits[i][c] + off * g->sb, bits + (p - first) * g->sb, cnt * g->sb,
                       cudaMemcpyHostToDevice) != cudaSuccess ||
            cudaMemcpy(g->scales[i][c] + off, scales + (p - first), cnt * 2, cudaMemcpyHostToDevice) != cudaSuccess)
            rc = kl_fail(cv, -EIO, "copying signatures of layer %u head %u to the GPU failed", layer, head);
        p += cnt;
    }
    return rc;
}

/* Grow a device scratch buffer to at least bytes. */
static int grow(void **p, size_t *cap, size_t bytes)
{
    if (bytes <= *cap)
        return 0;
    cudaFree(*p);
    *p = NULL;
    *cap = 0;
    if (cudaMalloc(p, bytes) != cudaSuccess)
        return -ENOMEM;
    *cap = bytes;
    return 0;
}

/* The layer's summaries of blocks [sum_synced, sum_n) into VRAM
 * (invariant 5: device entries [0, sum_synced) equal the host's, which
 * never change once below sum_n). */
static int sum_sync(kvarc_conv *cv, kl_gpu *g, uint32_t layer)
{
    const kl_layer *y = &cv->layers[layer];
    const size_t S = KVG_SUM_ITEMS, sb = g->sb;
    const uint64_t lo = g->sum_synced[layer], hi = y->sum_n;
    if (hi <= lo)
        return 0;
    if (hi > g->sum_cap[layer]) {         /* regrow: new arrays, the mirrored part copied over */
        uint64_t cap = g->sum_cap[layer] ? 2 * g->sum_cap[layer] : 1024;
        while (cap < hi)
            cap *= 2;
        uint8_t *ok = NULL;
        if (cudaMalloc((void **)&ok, cap) != cudaSuccess ||
            (lo && cudaMemcpy(ok, g->d_sum_ok[layer], lo, cudaMemcpyDeviceToDevice) != cudaSuccess)) {
            cudaFree(ok);
            return kl_fail(cv, -ENOMEM, "out of GPU memory for %llu block summaries", (unsigned long long)cap);
        }
        cudaFree(g->d_sum_ok[layer]);
        g->d_sum_ok[layer] = ok;
        for (size_t h = 0; h < g->nh; h++) {
            size_t i = (size_t)layer * g->nh + h;
            uint8_t *b = NULL;
            uint16_t *sc = NULL;
            if (cudaMalloc((void **)&b, cap * S * sb) != cudaSuccess ||
                cudaMalloc((void **)&sc, cap * S * 2) != cudaSuccess ||
                (lo && (cudaMemcpy(b, g->d_sum_bits[i], lo * S * sb, cudaMemcpyDeviceToDevice) != cudaSuccess ||
                        cudaMemcpy(sc, g->d_sum_scale[i], lo * S * 2, cudaMemcpyDeviceToDevice) != cudaSuccess))) {
                cudaFree(b);
                cudaFree(sc);
                return kl_fail(cv, -ENOMEM, "out of GPU memory for %llu block summaries", (unsigned long long)cap);
            }
            cudaFree(g->d_sum_bits[i]);
            cudaFree(g->d_sum_scale[i]);
            g->d_sum_bits[i] = b;
            g->d_sum_scale[i] = sc;
        }
        g->sum_cap[layer] = cap;
    }
    if (cudaMemcpy(g->d_sum_ok[layer] + lo, y->sum_ok + lo, hi - lo, cudaMemcpyHostToDevice) != cudaSuccess)
        return kl_fail(cv, -EIO, "copying block summaries of layer %u to the GPU failed", layer);
    for (size_t h = 0; h < g->nh; h++) {
        size_t i = (size_t)layer * g->nh + h;
        if (cudaMemcpy(g->d_sum_bits[i] + lo * S * sb, y->sum_bits[h] + lo * S * sb, (hi - lo) * S * sb,
                       cudaMemcpyHostToDevice) != cudaSuccess ||
            cudaMemcpy(g->d_sum_scale[i] + lo * S, y->sum_scale[h] + lo * S, (hi - lo) * S * 2,
                       cudaMemcpyHostToDevice) != cudaSuccess)
            return kl_fail(cv, -EIO, "copying block summaries of layer %u to the GPU failed", layer);
    }
    g->sum_synced[layer] = hi;
    return 0;
}

/* Longest piece of stage 1b's scan (a CUDA block scores one). */
#define KL_GPU_PIECE 4096

/* Stage 1 of (layer, head) through the coarse tier, on the device:
 * kl_stage1_coarse's steps with the summaries' and the chosen tokens'
 * scores and both top-ks in VRAM (the block biases are in g->d_bias);
 * the same shortlist. -ENOTSUP: the full scan instead; -E2BIG: more
 * blocks than the device's top-k takes (the CPU path must serve). */
static long coarse(kvarc_conv *cv, kl_gpu *g, uint32_t layer, uint32_t head, const kvg_query *qs, int n_q,
                   uint64_t ns, uint64_t hot_lo, int biased, size_t nblk, size_t r, uint32_t blocks,
                   kl_coarse_scratch *x, uint32_t *idx_out)
{
    const kl_layer *y = &cv->layers[layer];
    const size_t i = (size_t)layer * g->nh + head, S = KVG_SUM_ITEMS, sb = g->sb;
    const kvg_score_mode mode = (kvg_score_mode)cv->o.score_mode;
    const kvg_combine comb = (kvg_combine)cv->o.combine;
    kl_coarse_plan pl;
    long rc = kl_coarse_plan_of(y, ns, hot_lo, r, blocks, &pl);
    if (rc)
        return -ENOTSUP;                   /* the plan declines: the full scan */
    if (blocks > KVG_CUDA_TOPK_MAX)
        return -E2BIG;                     /* the device cannot pick that many: the CPU path */
    const size_t ni = (size_t)pl.nsum * S, most = ni > pl.ntok_max ? ni : pl.ntok_max;
    if (kl_coarse_reserve(x, &pl) || grow((void **)&g->d_scores, &g->score_cap, most * 4) ||
        grow((void **)&g->d_bs, &g->bs_cap, (size_t)pl.nsum * 4) ||
        grow(&g->d_scratch, &g->scratch_cap, kvg_topk_cuda_scratch_bytes(most)) ||
        grow((void **)&g->d_idx, &g->idx_cap, ((r > blocks ? r : blocks) + 1) * 4))
        return kl_fail(cv, -ENOMEM, "out of memory for stage 1 through the coarse tier");
    if ((rc = sum_sync(cv, g, layer)))
        return rc;
    /* 1. the summaries (one bias per block), each block's best, the best blocks */
    if ((rc = kvg_score_items_cuda(mode, comb, qs, n_q, g->d_sum_bits[i] + pl.fb * S * sb,
                                   g->d_sum_scale[i] + pl.fb * S, ni, biased ? g->d_bias : NULL, S, nblk,
                                   g->d_scores, NULL)) ||
        (rc = kvg_block_best_cuda(g->d_scores, (size_t)pl.nsum, (int)S, g->d_sum_ok[layer] + pl.fb, g->d_bs, NULL)))
        return kl_fail(cv, (int)rc, "scoring block summaries on the GPU (layer %u head %u): %s", layer, head,
                       kvarc_strerror((int)rc));
    long nc = kvg_topk_cuda(g->d_bs, (size_t)pl.nsum, blocks, g->d_idx, NULL, g->d_scratch, NULL);
    if (nc < 0)
        return kl_fail(cv, (int)nc, "top-k of blocks on the GPU: %s", kvarc_strerror((int)nc));
    if (nc && cudaMemcpy(x->bidx, g->d_idx, (size_t)nc * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
        return kl_fail(cv, -EIO, "copying the chosen blocks from the GPU failed");
    /* 2. the chosen blocks' tokens, as pieces of the VRAM chunks */
    long nr = kl_coarse_runs(y, &pl, r, nc, x);
    if (nr < 0)
        return nr;
    size_t np = 0;
    uint64_t out = 0;
    for (long k = 0; k < nr; k++) {
        const uint64_t a = ns + x->runs[2 * k], e = a + x->runs[2 * k + 1];
        for (uint64_t p = a; p < e;) {
            uint64_t c = p / KL_GPU_CHUNK, off = p % KL_GPU_CHUNK, cnt = KL_GPU_CHUNK - off;
            cnt = cnt < e - p ? cnt : e - p;
            cnt = cnt < KL_GPU_PIECE ? cnt : KL_GPU_PIECE;
            if (np == g->piece_cap) {
                size_t cap = g->piece_cap ? 2 * g->piece_cap : 256;
                kvg_cuda_piece *v = realloc(g->pieces, cap * sizeof *v);
                if (!v)
                    return kl_fail(cv, -ENOMEM, "out of memory");
                g->pieces = v;
                g->piece_cap = cap;
            }
            g->pieces[np++] = (kvg_cuda_piece){ g->bits[i][c] + off * sb, g->scales[i][c] + off, p, cnt, out };
            out += cnt;
            p += cnt;
        }
    }
    if ((rc = kvg_score_pieces_cuda(mode, comb, qs, n_q, g->pieces, np, pl.fb, biased ? g->d_bias : NULL, nblk,
                                    g->d_scores, NULL)))
        return kl_fail(cv, (int)rc, "scoring the chosen blocks on the GPU (layer %u head %u): %s", layer, head,
                       kvarc_strerror((int)rc));
    long got = kvg_topk_cuda(g->d_scores, x->nt, r, g->d_idx, NULL, g->d_scratch, NULL);
    if (got < 0)
        return kl_fail(cv, (int)got, "top-k on the GPU: %s", kvarc_strerror((int)got));
    if (got && cudaMemcpy(x->tidx, g->d_idx, (size_t)got * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
        return kl_fail(cv, -EIO, "copying the shortlist from the GPU failed");
    for (long j = 0; j < got; j++)
        idx_out[j] = x->rel[x->tidx[j]];
    return got;
}

long kl_gpu_stage1(kvarc_conv *cv, uint32_t layer, uint32_t head, const kvg_query *qs, int n_q, uint64_t first,
                   uint64_t n, const float *blk_bias, size_t nblk, size_t r, uint32_t blocks, kl_coarse_scratch *x,
                   uint32_t *idx_out)
{
    kl_gpu *g = cv->gpu;
    size_t i = (size_t)layer * g->nh + head;
    if (r > KVG_CUDA_TOPK_MAX || n >= (1ull << 31))
        return -ENOTSUP;                   /* the caller runs the CPU path instead */
    if (blk_bias && grow((void **)&g->d_bias, &g->bias_cap, (size_t)n_q * nblk * 4))
        return kl_fail(cv, -ENOMEM, "out of GPU memory for stage 1's block biases");
    if (blk_bias && cudaMemcpy(g->d_bias, blk_bias, (size_t)n_q * nblk * 4, cudaMemcpyHostToDevice) != cudaSuccess)
        return kl_fail(cv, -EIO, "copying stage 1's block biases to the GPU failed");
    long got = coarse(cv, g, layer, head, qs, n_q, first, first + n, blk_bias != NULL, nblk, r, blocks, x, idx_out);
    if (got == -E2BIG)
        return -ENOTSUP;
    if (got != -ENOTSUP)
        return got;
    if (grow((void **)&g->d_scores, &g->score_cap, (size_t)n * 4) ||
        grow(&g->d_scratch, &g->scratch_cap, kvg_topk_cuda_scratch_bytes((size_t)n)) ||
        grow((void **)&g->d_idx, &g->idx_cap, (r + 1) * 4))
        return kl_fail(cv, -ENOMEM, "out of GPU memory for stage 1 over %llu tokens", (unsigned long long)n);
    for (uint64_t p = first; p < first + n;) {
        size_t c = (size_t)(p / KL_GPU_CHUNK), off = (size_t)(p % KL_GPU_CHUNK);
        size_t cnt = KL_GPU_CHUNK - off < first + n - p ? KL_GPU_CHUNK - off : (size_t)(first + n - p);
        int rc = kvg_score_pos_cuda((kvg_score_mode)cv->o.score_mode, (kvg_combine)cv->o.combine, qs, n_q,
                                    g->bits[i][c] + off * g->sb, g->scales[i][c] + off, cnt, p,
                                    blk_bias ? g->d_bias + (p / KVG_SIG_BLOCK - first / KVG_SIG_BLOCK) : NULL,
                                    nblk, g->d_scores + (p - first), NULL);
        if (rc)
            return kl_fail(cv, rc, "stage 1 on the GPU (layer %u head %u): %s", layer, head, kvarc_strerror(rc));
        p += cnt;
    }
    got = kvg_topk_cuda(g->d_scores, (size_t)n, r, g->d_idx, NULL, g->d_scratch, NULL);
    if (got < 0)
        return kl_fail(cv, (int)got, "top-k on the GPU: %s", kvarc_strerror((int)got));
    if (got && cudaMemcpy(idx_out, g->d_idx, (size_t)got * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
        return kl_fail(cv, -EIO, "copying the shortlist from the GPU failed");
    return got;
}

int kl_gpu_ring_sync(kvarc_conv *cv, uint32_t layer)
{
    kl_gpu *g = cv->gpu;
    kl_layer *y = &cv->layers[layer];
    const size_t H = g->nh, d = cv->m.head_dim, ring = cv->ring, bytes = H * ring * d * 4;
    if (!g->d_ring_kr[layer]) {
        if (cudaMalloc((void **)&g->d_ring_kr[layer], bytes) != cudaSuccess ||
            cudaMalloc((void **)&g->d_ring_v[layer], bytes) != cudaSuccess)
            return kl_fail(cv, -ENOMEM, "out of GPU memory for the hot window of layer %u", layer);
        /* page-locked host ring: asynchronous copies (a failure only makes them staged) */
        if (cudaHostRegister(y->ring_kr, bytes, cudaHostRegisterDefault) == cudaSuccess) {
            if (cudaHostRegister(y->ring_v, bytes, cudaHostRegisterDefault) == cudaSuccess)
                g->host_registered[layer] = 1;
            else
                cudaHostUnregister(y->ring_kr);
        }
        cudaGetLastError();
    }
    uint64_t lo = g->ring_synced[layer], len = y->len;
    if (len > ring && lo < len - ring)
        lo = len - ring;
    while (lo < len) {                    /* runs of slots up to the ring's end */
        size_t s0 = (size_t)(lo % ring), cnt = ring - s0 < len - lo ? ring - s0 : (size_t)(len - lo);
        for (size_t h = 0; h < H; h++) {
            size_t off = (h * ring + s0) * d;
            if (cudaMemcpyAsync(g->d_ring_kr[layer] + off, y->ring_kr + off, cnt * d * 4, cudaMemcpyHostToDevice,
                                g->stream) != cudaSuccess ||
                cudaMemcpyAsync(g->d_ring_v[layer] + off, y->ring_v + off, cnt * d * 4, cudaMemcpyHostToDevice,
                                g->stream) != cudaSuccess)
                return kl_fail(cv, -EIO, "copying the hot window of layer %u to the GPU failed", layer);
        }
        lo += cnt;
    }
    g->ring_synced[layer] = len;
    return 0;
}

int kl_gpu_attend(kvarc_conv *cv, uint32_t layer, const float *qi, const float *sink_k, const float *sink_v,
                  size_t ns, const float *rk, const float *rv, size_t kstride, size_t kn, uint64_t hot_lo,
                  size_t n_hot, float scale, float *out)
{
    kl_gpu *g = cv->gpu;
    const size_t H = g->nh, QH = cv->m.n_q_heads, d = cv->m.head_dim, ring = cv->ring;
    const size_t nq = QH * d, nsk = H * ns * d, nr = H * kstride * d;
    const size_t need = nq + 2 * nsk + 2 * nr + nq;
    if (n_hot > ring)
        return kl_fail(cv, -EINVAL, "hot window of %zu tokens larger than the ring (%zu)", n_hot, ring);
    if (need > g->stage_cap) {
        cudaFreeHost(g->h_stage);
        cudaFree(g->d_stage);
        g->h_stage = NULL, g->d_stage = NULL, g->stage_cap = 0;
        if (cudaMallocHost((void **)&g->h_stage, need * 4) != cudaSuccess ||
            cudaMalloc((void **)&g->d_stage, need * 4) != cudaSuccess)
            return kl_fail(cv, -ENOMEM, "out of pinned or GPU memory for attention staging (%zu floats)", need);
        g->stage_cap = need;
    }
    float *h = g->h_stage, *dq = g->d_stage;
    memcpy(h, qi, nq * 4);
    memcpy(h + nq, sink_k, nsk * 4);
    memcpy(h + nq + nsk, sink_v, nsk * 4);
    memcpy(h + nq + 2 * nsk, rk, nr * 4);
    memcpy(h + nq + 2 * nsk + nr, rv, nr * 4);
    float *d_out = dq + nq + 2 * nsk + 2 * nr;
    if (cudaMemcpyAsync(dq, h, (need - nq) * 4, cudaMemcpyHostToDevice, g->stream) != cudaSuccess)
        return kl_fail(cv, -EIO, "copying a query's parts to the GPU failed");
    size_t s0 = (size_t)(hot_lo % ring), n_a = ring - s0 < n_hot ? ring - s0 : n_hot;
    kvg_attn_part parts[4] = {
        { dq + nq, dq + nq + nsk, ns, ns, NULL },
        { dq + nq + 2 * nsk, dq + nq + 2 * nsk + nr, kstride, kn, NULL },
        { g->d_ring_kr[layer] + s0 * d, g->d_ring_v[layer] + s0 * d, ring, n_a, NULL },
        { g->d_ring_kr[layer], g->d_ring_v[layer], ring, n_hot - n_a, NULL },
    };
    int rc = kvg_attend_cuda(dq, (int)QH, (int)H, (int)d, scale, parts, 4, d_out, g->stream);
    if (rc)
        return kl_fail(cv, rc, "attention on the GPU (layer %u): %s", layer, kvarc_strerror(rc));
    if (cudaMemcpyAsync(h + nq + 2 * nsk + 2 * nr, d_out, nq * 4, cudaMemcpyDeviceToHost, g->stream) != cudaSuccess ||
        cudaStreamSynchronize(g->stream) != cudaSuccess)
        return kl_fail(cv, -EIO, "copying attention output from the GPU failed");
    memcpy(out, h + nq + 2 * nsk + 2 * nr, nq * 4);
    return 0;
}

int kl_gpu_to_host(void *dst, const void *d_src, size_t bytes)
{
    int ok = cudaMemcpy(dst, d_src, bytes, cudaMemcpyDeviceToHost) == cudaSuccess;
    cudaGetLastError();
    return ok ? 0 : -EINVAL;
}

int kl_gpu_to_device(void *d_dst, const void *src, size_t bytes)
{
    /* from pageable memory cudaMemcpy may return before the data has landed: wait for it, so that the
     * caller's next work on any stream (a non-blocking one too) reads the output */
    int ok = cudaMemcpy(d_dst, src, bytes, cudaMemcpyHostToDevice) == cudaSuccess &&
             cudaStreamSynchronize(0) == cudaSuccess;
    cudaGetLastError();
    return ok ? 0 : -EINVAL;
}
