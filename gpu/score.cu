/* score.cu - GPU versions of query preparation and the stage-1 scan (CPU
 * reference: score_ref.c).
 *
 * Query preparation: one block per query, one thread per dimension; the
 * same operations as kvg_query_prep_ref in the same order (the tree sum of
 * q * mu for the bias, the signs, the Walsh-Hadamard butterflies, the
 * scale by 1/sqrt(d), max |y| / 127, rintf(y / qscale)), all correctly
 * rounded: the kvg_query structs are equal byte for byte.
 *
 * Version 1: one thread per token. The integer dot product of the int8
 * query with the +-1 signs is computed from bit planes: with q8 in two's
 * complement, sum_{bit set} q8_i = sum_b w_b * popc(plane_b & kbits),
 * w_b = 2^b (b < 7), -128 (b = 7); dot = 2 * that - sum_i q8_i. It is
 * an exact integer, so the final ((float)dot * qscale) * scale + bias
 * (three _rn operations) equals the CPU's bit for bit. Kind-2 signatures
 * (kvg_score_pos_cuda) take the bias of the token's block from a table the
 * host computed (kvg_block_bias_ref), so it is the CPU's float. */
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"

#define WORDS (KVARC_HEAD_DIM_MAX / 32)

struct qdev {                       /* one prepared query, bit-plane form */
    unsigned plane[8][WORDS];       /* bit b of q8_i at word i/32, bit i%32 */
    unsigned bits[WORDS];           /* sign bits of R q */
    int qsum;                       /* sum_i q8_i */
    float qscale, bias;
};

/* Query h's score of one signature (kw its words, w16 its scale, bias the
 * bias it takes), combined over the group as kvg_score_ref combines. */
__device__ static float score_one(int mode, int comb, const qdev *qs, int n_q, int d, const unsigned *kw,
                                  float w16, const float *bias, size_t bias_stride)
{
    int nw = d / 32;
    float acc = 0.0f;
    for (int h = 0; h < n_q; h++) {
        const qdev &q = qs[h];
        float v;
        if (mode == KVG_SCORE_ASYM) {
            int s = 0;
            for (int b = 0; b < 8; b++) {
                int c = 0;
                for (int w = 0; w < nw; w++)
                    c += __popc(q.plane[b][w] & kw[w]);
                s += b == 7 ? -128 * c : c << b;
            }
            int dot = 2 * s - q.qsum;
            float bi = bias ? bias[(size_t)h * bias_stride] : q.bias;
            v = __fadd_rn(__fmul_rn(__fmul_rn((float)dot, q.qscale), w16), bi);
        } else {
            int pop = 0;
            for (int w = 0; w < nw; w++)
                pop += __popc(q.bits[w] ^ kw[w]);
            v = (float)(d - 2 * pop);
        }
        if (h == 0)
            acc = v;
        else if (comb == KVG_COMBINE_MAX)
            acc = v > acc ? v : acc;
        else
            acc = __fadd_rn(acc, v);
    }
    if (comb == KVG_COMBINE_MEAN && n_q > 1)
        acc = __fdiv_rn(acc, (float)n_q);
    return acc;
}

/* The prepared queries into shared memory (all threads of the block). */
__device__ static void load_queries(qdev *qs, const qdev *qs_g, int n_q)
{
    for (int i = threadIdx.x; i < n_q * (int)(sizeof(qdev) / 4); i += blockDim.x)
        ((unsigned *)qs)[i] = ((const unsigned *)qs_g)[i];
    __syncthreads();
}

/* Signature j's words and scale. */
__device__ static float load_sig(int mode, int d, const unsigned char *sig_bits, const unsigned short *sig_scale,
                                 size_t j, unsigned *kw)
{
    const unsigned *src = (const unsigned *)(sig_bits + j * (size_t)(d / 8));
    for (int w = 0; w < d / 32; w++)
        kw[w] = src[w];
    return mode == KVG_SCORE_ASYM ? __half2float(__ushort_as_half(sig_scale[j])) : 0.0f;
}

/* Token / item j takes bias bb[h * nblk + (first_off + j) / bdiv]: the
 * block biases of kind-2 tokens (bdiv 64), or one bias per bdiv summary
 * items. */
__global__ static void score_kernel(int mode, int comb, const qdev *qs_g, int n_q, int d,
                                    const unsigned char *sig_bits,
                                    const unsigned short *sig_scale, size_t n, unsigned first_off,
                                    size_t bdiv, const float *bb, size_t nblk, float *scores)
{
    extern __shared__ qdev qs[];
    load_queries(qs, qs_g, n_q);
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < n;
         j += (size_t)gridDim.x * blockDim.x) {
        unsigned kw[WORDS];
        float w16 = load_sig(mode, d, sig_bits, sig_scale, j, kw);
        scores[j] = score_one(mode, comb, qs, n_q, d, kw, w16, bb ? bb + (first_off + j) / bdiv : NULL, nblk);
    }
}

/* Pieces: CUDA block p (grid-stride) scores piece p's tokens. */
__global__ static void pieces_kernel(int mode, int comb, const qdev *qs_g, int n_q, int d,
                                     const kvg_cuda_piece *pc, size_t np, uint64_t bias_b0, const float *bb,
                                     size_t nblk, float *scores)
{
    extern __shared__ qdev qs[];
    load_queries(qs, qs_g, n_q);
    for (size_t p = blockIdx.x; p < np; p += gridDim.x) {
        kvg_cuda_piece c = pc[p];
        for (size_t j = threadIdx.x; j < c.n; j += blockDim.x) {
            unsigned kw[WORDS];
            float w16 = load_sig(mode, d, c.d_bits, c.d_scale, j, kw);
            const float *bi = bb ? bb + ((c.pos + j) / KVG_SIG_BLOCK - bias_b0) : NULL;
            scores[c.out + j] = score_one(mode, comb, qs, n_q, d, kw, w16, bi, nblk);
        }
    }
}

/* The queries in bit-plane form (host memory; free it), or NULL. */
static qdev *make_qdev(const kvg_query *qs, int n_q)
{
    qdev *hq = (qdev *)calloc((size_t)n_q, sizeof *hq);
    if (!hq)
        return NULL;
    int d = qs[0].head_dim;
    for (int h = 0; h < n_q; h++) {
        for (int i = 0; i < d; i++) {
            unsigned u = (unsigned char)qs[h].q8[i];
            for (int b = 0; b < 8; b++)
                hq[h].plane[b][i / 32] |= ((u >> b) & 1u) << (i % 32);
            hq[h].qsum += qs[h].q8[i];
        }
        memcpy(hq[h].bits, qs[h].bits, (size_t)d / 8);
        hq[h].qscale = qs[h].qscale;
        hq[h].bias = qs[h].bias;
    }
    return hq;
}

/* Launch score_kernel (pc NULL) or pieces_kernel over the prepared queries. */
static int launch(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const uint8_t *d_sig_bits,
                  const uint16_t *d_sig_scale, size_t n, unsigned first_off, size_t bdiv,
                  const kvg_cuda_piece *pc, size_t np, uint64_t bias_b0, const float *d_bias, size_t nblk,
                  float *d_scores, void *stream)
{
    int rc = 0;
    kvg_cuda_piece *dp = NULL;
    qdev *dq = NULL, *hq = make_qdev(qs, n_q);
    cudaStream_t s = kvg_stream(stream);
    size_t bytes = (size_t)n_q * sizeof *hq;
    if (!hq)
        return -ENOMEM;
    KVG_CUDA_TRY(cudaMallocAsync((void **)&dq, bytes, s));
    KVG_CUDA_TRY(cudaMemcpyAsync(dq, hq, bytes, cudaMemcpyHostToDevice, s));
    if (pc) {
        KVG_CUDA_TRY(cudaMallocAsync((void **)&dp, np * sizeof *dp, s));
        KVG_CUDA_TRY(cudaMemcpyAsync(dp, pc, np * sizeof *dp, cudaMemcpyHostToDevice, s));
    }
    if (bytes > 48 * 1024) {
        KVG_CUDA_TRY(cudaFuncSetAttribute(score_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
        KVG_CUDA_TRY(cudaFuncSetAttribute(pieces_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    }
    if (pc) {
        unsigned blocks = np < 8192 ? (unsigned)np : 8192;
        pieces_kernel<<<blocks, 64, bytes, s>>>(mode, comb, dq, n_q, qs[0].head_dim, dp, np, bias_b0, d_bias, nblk,
                                                d_scores);
    } else {
        unsigned threads = 256, blocks = (unsigned)((n + threads - 1) / threads);
        if (blocks > 8192)
            blocks = 8192;
        score_kernel<<<blocks, threads, bytes, s>>>(mode, comb, dq, n_q, qs[0].head_dim, d_sig_bits, d_sig_scale,
                                                    n, first_off, bdiv, d_bias, nblk, d_scores);
    }
    KVG_CUDA_TRY(cudaGetLastError());
    KVG_CUDA_TRY(cudaStreamSynchronize(s));
fail:
    if (dq)
        cudaFreeAsync(dq, s);
    if (dp)
        cudaFreeAsync(dp, s);
    free(hq);
    return rc;
}

/* The checks kvg_score_pos_cuda and kvg_score_items_cuda share: a
 * negative code, 1 (nothing to score) or 0. */
static int score_args(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q, const uint8_t *d_bits,
                      const uint16_t *d_scale, size_t n, const float *d_scores)
{
    int rc = kvg_score_check(mode, comb, qs, n_q);
    if (rc)
        return rc;
    if (n == 0)
        return 1;
    return !d_bits || !d_scores || (mode == KVG_SCORE_ASYM && !d_scale) ? -EINVAL : 0;
}

extern "C" int kvg_score_cuda(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                              const uint8_t *d_sig_bits, const uint16_t *d_sig_scale, size_t n,
                              float *d_scores, void *stream)
{
    return kvg_score_pos_cuda(mode, comb, qs, n_q, d_sig_bits, d_sig_scale, n, 0, NULL, 0, d_scores, stream);
}

extern "C" int kvg_score_pos_cuda(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                                  const uint8_t *d_sig_bits, const uint16_t *d_sig_scale, size_t n,
                                  uint64_t first_pos, const float *d_blk_bias, size_t nblk, float *d_scores,
                                  void *stream)
{
    int rc = score_args(mode, comb, qs, n_q, d_sig_bits, d_sig_scale, n, d_scores);
    if (rc)
        return rc > 0 ? 0 : rc;
    if (d_blk_bias && nblk < kvg_blocks_of(first_pos, n))
        return -EINVAL;
    return launch(mode, comb, qs, n_q, d_sig_bits, d_sig_scale, n, (unsigned)(first_pos % KVG_SIG_BLOCK),
                  KVG_SIG_BLOCK, NULL, 0, 0, d_blk_bias, nblk, d_scores, stream);
}

extern "C" int kvg_score_items_cuda(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                                    const uint8_t *d_sig_bits, const uint16_t *d_sig_scale, size_t n,
                                    const float *d_item_bias, size_t per_bias, size_t bias_stride,
                                    float *d_scores, void *stream)
{
    int rc = score_args(mode, comb, qs, n_q, d_sig_bits, d_sig_scale, n, d_scores);
    if (rc)
        return rc > 0 ? 0 : rc;
    if (d_item_bias && (per_bias < 1 || bias_stride < (n + per_bias - 1) / per_bias))
        return -EINVAL;
    return launch(mode, comb, qs, n_q, d_sig_bits, d_sig_scale, n, 0, d_item_bias ? per_bias : 1, NULL, 0, 0,
                  d_item_bias, bias_stride, d_scores, stream);
}

extern "C" int kvg_score_pieces_cuda(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                                     const kvg_cuda_piece *pieces, size_t np, uint64_t bias_b0,
                                     const float *d_blk_bias, size_t nblk, float *d_scores, void *stream)
{
    int rc = kvg_score_check(mode, comb, qs, n_q);
    if (rc)
        return rc;
    if (np == 0)
        return 0;
    if (!pieces || !d_scores)
        return -EINVAL;
    for (size_t p = 0; p < np; p++) {
        const kvg_cuda_piece *c = &pieces[p];
        if (!c->n || !c->d_bits || (mode == KVG_SCORE_ASYM && !c->d_scale))
            return -EINVAL;
        if (d_blk_bias && (c->pos / KVG_SIG_BLOCK < bias_b0 ||
                           (c->pos + c->n - 1) / KVG_SIG_BLOCK - bias_b0 >= nblk))
            return -EINVAL;
    }
    return launch(mode, comb, qs, n_q, NULL, NULL, 0, 0, 1, pieces, np, bias_b0, d_blk_bias, nblk, d_scores,
                  stream);
}

/* kvg_query_prep_ref for query blockIdx.x; bad[blockIdx.x] = 1 on a
 * non-finite input, bias or scale. */
__global__ static void query_prep_kernel(kvarc_rotation rot, const float *mu, int dt, const void *q,
                                         kvg_query *out, int *bad)
{
    __shared__ float y[KVARC_HEAD_DIM_MAX], red[KVARC_HEAD_DIM_MAX];
    __shared__ unsigned words[KVARC_HEAD_DIM_MAX / 32];
    __shared__ int nonfinite;
    int i = threadIdx.x, d = rot.head_dim, j = blockIdx.x;
    if (i == 0)
        nonfinite = 0;
    if (i < d / 32)
        words[i] = 0;
    __syncthreads();
    float x = kvg_load(dt, q, (size_t)j * d + i);
    if (!isfinite(x))
        nonfinite = 1;
    red[i] = mu ? __fmul_rn(x, mu[i]) : 0.0f;
    float bias = kvg_tree_sum(red, d);
    y[i] = __fmul_rn(x, rot.signs[i]);
    kvg_fwht(y, d);
    float yi = __fmul_rn(y[i], rot.inv_sqrt_d);
    red[i] = fabsf(yi);
    for (int h = d / 2; h >= 1; h /= 2) {      /* max |y|: exact in any order */
        __syncthreads();
        if (i < h)
            red[i] = fmaxf(red[i], red[i + h]);
    }
    __syncthreads();
    float m = red[0];
    if (!(yi < 0.0f))
        atomicOr(&words[i / 32], 1u << (i % 32));
    float qscale = __fdiv_rn(m, 127.0f);
    kvg_query *o = out + j;
    o->q8[i] = qscale > 0.0f ? (int8_t)fminf(fmaxf(rintf(__fdiv_rn(yi, qscale)), -127.0f), 127.0f) : 0;   /* as score_ref.c */
    __syncthreads();
    if (i < d / 32)
        memcpy(o->bits + 4 * i, &words[i], 4);
    if (i == 0) {
        o->head_dim = d;
        o->qscale = qscale;
        o->bias = bias;
        bad[j] = nonfinite || !isfinite(bias) || !isfinite(m);
    }
}

extern "C" int kvg_query_prep_cuda(const kvarc_rotation *rot, const float *d_mu_k, kvarc_dtype dt,
                                   const void *d_q, size_t n, kvg_query *d_out, void *stream)
{
    if (!rot || !d_q || !d_out)
        return -EINVAL;
    if (!kvarc_dtype_size(dt))
        return KVARC_EDTYPE;
    if (kvarc_head_dim_check(rot->head_dim))
        return KVARC_EHEADDIM;
    if (n == 0)
        return 0;
    int rc = 0, *d_bad = NULL, *bad = (int *)malloc(n * sizeof(int));
    cudaStream_t s = kvg_stream(stream);
    if (!bad)
        return -ENOMEM;
    KVG_CUDA_TRY(cudaMallocAsync((void **)&d_bad, n * sizeof(int), s));
    KVG_CUDA_TRY(cudaMemsetAsync(d_out, 0, n * sizeof(kvg_query), s));
    query_prep_kernel<<<(unsigned)n, (unsigned)rot->head_dim, 0, s>>>(*rot, d_mu_k, (int)dt, d_q, d_out, d_bad);
    KVG_CUDA_TRY(cudaGetLastError());
    rc = kvg_flags_back(d_bad, bad, n, s);
fail:
    if (d_bad)
        cudaFreeAsync(d_bad, s);
    free(bad);
    return rc;
}
