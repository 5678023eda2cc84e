/* gpu.c - libkvarc's stage 1 on the GPU (built when CUDA is).
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
 * Not yet here (the GPU issue): the hot window and record cache in VRAM,
 * attention on the device, pinned buffers and streams; the host mirror of
 * the signatures is still kept (the CPU fallback uses it).
 */
#include <cuda_runtime_api.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kvarc_internal.h"
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
    size_t     score_cap, scratch_cap, idx_cap;
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
    if (!g->bits || !g->scales || !g->cap) {
        free(g->bits);
        free(g->scales);
        free(g->cap);
        free(g);
        return kl_fail(cv, -ENOMEM, "out of memory");
    }
    cv->gpu = g;
    return 0;
}

void kl_gpu_free(kvarc_conv *cv)
{
    kl_gpu *g = cv->gpu;
    if (!g)
        return;
    for (size_t i = 0; i < g->nl * g->nh; i++) {
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

long kl_gpu_stage1(kvarc_conv *cv, uint32_t layer, uint32_t head, const kvg_query *qs, int n_q, uint64_t first,
                   uint64_t n, size_t r, uint32_t *idx_out)
{
    kl_gpu *g = cv->gpu;
    size_t i = (size_t)layer * g->nh + head;
    if (r > KVG_CUDA_TOPK_MAX || n >= (1ull << 31))
        return -ENOTSUP;                   /* the caller runs the CPU path instead */
    if (grow((void **)&g->d_scores, &g->score_cap, (size_t)n * 4) ||
        grow(&g->d_scratch, &g->scratch_cap, kvg_topk_cuda_scratch_bytes((size_t)n)) ||
        grow((void **)&g->d_idx, &g->idx_cap, (r + 1) * 4))
        return kl_fail(cv, -ENOMEM, "out of GPU memory for stage 1 over %llu tokens", (unsigned long long)n);
    for (uint64_t p = first; p < first + n;) {
        size_t c = (size_t)(p / KL_GPU_CHUNK), off = (size_t)(p % KL_GPU_CHUNK);
        size_t cnt = KL_GPU_CHUNK - off < first + n - p ? KL_GPU_CHUNK - off : (size_t)(first + n - p);
        int rc = kvg_score_cuda((kvg_score_mode)cv->o.score_mode, (kvg_combine)cv->o.combine, qs, n_q,
                                g->bits[i][c] + off * g->sb, g->scales[i][c] + off, cnt,
                                g->d_scores + (p - first), NULL);
        if (rc)
            return kl_fail(cv, rc, "stage 1 on the GPU (layer %u head %u): %s", layer, head, kvarc_strerror(rc));
        p += cnt;
    }
    long got = kvg_topk_cuda(g->d_scores, (size_t)n, r, g->d_idx, NULL, g->d_scratch, NULL);
    if (got < 0)
        return kl_fail(cv, (int)got, "top-k on the GPU: %s", kvarc_strerror((int)got));
    if (got && cudaMemcpy(idx_out, g->d_idx, (size_t)got * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
        return kl_fail(cv, -EIO, "copying the shortlist from the GPU failed");
    return got;
}
