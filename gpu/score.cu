/* score.cu - GPU version of the stage-1 scan (CPU reference: score_ref.c).
 *
 * Version 1: one thread per token. The integer dot product of the int8
 * query with the +-1 signs is computed from bit planes: with q8 in two's
 * complement, sum_{bit set} q8_i = sum_b w_b * popc(plane_b & kbits),
 * w_b = 2^b (b < 7), -128 (b = 7); dot = 2 * that - sum_i q8_i. It is
 * an exact integer, so the final ((float)dot * qscale) * scale + bias
 * (three _rn operations) equals the CPU's bit for bit. */
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

__global__ static void score_kernel(int mode, int comb, const qdev *qs_g, int n_q, int d,
                                    const unsigned char *sig_bits,
                                    const unsigned short *sig_scale, size_t n, float *scores)
{
    extern __shared__ qdev qs[];
    for (int i = threadIdx.x; i < n_q * (int)(sizeof(qdev) / 4); i += blockDim.x)
        ((unsigned *)qs)[i] = ((const unsigned *)qs_g)[i];
    __syncthreads();
    int nw = d / 32;
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < n;
         j += (size_t)gridDim.x * blockDim.x) {
        unsigned kw[WORDS];
        const unsigned *src = (const unsigned *)(sig_bits + j * (size_t)(d / 8));
        for (int w = 0; w < nw; w++)
            kw[w] = src[w];
        float w16 = mode == KVG_SCORE_ASYM ? __half2float(__ushort_as_half(sig_scale[j])) : 0.0f;
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
                v = __fadd_rn(__fmul_rn(__fmul_rn((float)dot, q.qscale), w16), q.bias);
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
        scores[j] = acc;
    }
}

extern "C" int kvg_score_cuda(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                              const uint8_t *d_sig_bits, const uint16_t *d_sig_scale, size_t n,
                              float *d_scores, void *stream)
{
    int rc = 0;
    qdev *hq = NULL, *dq = NULL;
    rc = kvg_score_check(mode, comb, qs, n_q);
    if (rc)
        return rc;
    int d = qs[0].head_dim;
    if (n == 0)
        return 0;
    if (!d_sig_bits || !d_scores || (mode == KVG_SCORE_ASYM && !d_sig_scale))
        return -EINVAL;
    hq = (qdev *)calloc((size_t)n_q, sizeof *hq);
    if (!hq)
        return -ENOMEM;
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
    {
        size_t bytes = (size_t)n_q * sizeof *hq;
        unsigned threads = 256, blocks = (unsigned)((n + threads - 1) / threads);
        if (blocks > 8192)
            blocks = 8192;
        KVG_CUDA_TRY(cudaMallocAsync((void **)&dq, bytes, kvg_stream(stream)));
        KVG_CUDA_TRY(cudaMemcpyAsync(dq, hq, bytes, cudaMemcpyHostToDevice, kvg_stream(stream)));
        if (bytes > 48 * 1024)
            KVG_CUDA_TRY(cudaFuncSetAttribute(score_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              (int)bytes));
        score_kernel<<<blocks, threads, bytes, kvg_stream(stream)>>>(mode, comb, dq, n_q, d, d_sig_bits,
                                                                     d_sig_scale, n, d_scores);
        KVG_CUDA_TRY(cudaGetLastError());
        KVG_CUDA_TRY(cudaStreamSynchronize(kvg_stream(stream)));
    }
fail:
    if (dq)
        cudaFreeAsync(dq, kvg_stream(stream));
    free(hq);
    return rc;
}
