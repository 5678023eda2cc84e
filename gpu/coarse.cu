/* coarse.cu - GPU versions of the coarse tier's kernels (CPU reference:
 * coarse_ref.c; SCHEMA.md section 6.3).
 *
 * Summaries: one thread block per summarized block, one thread per
 * coordinate. Each thread sums its coordinate over the block's tokens in
 * token order (the reference's loop), so the mean and the variances are
 * the reference's floats; the mean's signature is kvg_signature_ref's
 * (the rotation's butterflies and tree sums of codec.cu's encode); each
 * token's whitened distance is a tree sum in SCHEMA order; thread 0 picks
 * the outliers as the reference does. Every operation is an explicit _rn
 * intrinsic (and the file builds with --fmad=false): byte-equal output.
 *
 * Block best: one thread per block, the reference's comparisons in its
 * order (so a NaN item ranks as the reference ranks it). */
#include "cuda_common.cuh"

__global__ static void summary_kernel(kvarc_rotation rot, const float *x, const unsigned char *bits,
                                      const unsigned short *scales, size_t nb, int n,
                                      unsigned char *sum_bits, unsigned short *sum_scales, int *bad)
{
    __shared__ float y[KVARC_HEAD_DIM_MAX], red[KVARC_HEAD_DIM_MAX], r[KVG_SIG_BLOCK];
    const int d = rot.head_dim, i = threadIdx.x, sb = d / 8;
    for (size_t blk = blockIdx.x; blk < nb; blk += gridDim.x) {
        const float *xb = x + blk * (size_t)n * d;
        float s = 0.0f;
        for (int j = 0; j < n; j++)
            s = __fadd_rn(s, xb[(size_t)j * d + i]);
        const float m = __fdiv_rn(s, (float)n);
        int nonfinite = __syncthreads_or(!isfinite(m));
        /* item 0: the mean's signature (kvg_signature_ref) */
        y[i] = __fmul_rn(m, rot.signs[i]);
        kvg_fwht(y, d);
        float yi = __fmul_rn(y[i], rot.inv_sqrt_d);
        red[i] = __fmul_rn(yi, yi);
        float ss = kvg_tree_sum(red, d);
        red[i] = fabsf(yi);
        float l1 = kvg_tree_sum(red, d);
        unsigned char *ob = sum_bits + blk * KVG_SUM_ITEMS * (size_t)sb;
        unsigned short *os = sum_scales + blk * KVG_SUM_ITEMS;
        y[i] = yi;
        __syncthreads();
        if (i < sb) {
            unsigned b = 0;
            for (int j = 0; j < 8; j++)
                b |= (unsigned)!(y[8 * i + j] < 0.0f) << j;
            ob[i] = (unsigned char)b;
        }
        if (i == 0) {
            float w = l1 > 0.0f ? __fdiv_rn(ss, l1) : 0.0f;
            os[0] = __half_as_ushort(__float2half_rn(fminf(w, 65504.0f)));
        }
        nonfinite |= !isfinite(ss);
        /* the variances, then each token's whitened distance */
        s = 0.0f;
        for (int j = 0; j < n; j++) {
            float e = __fsub_rn(xb[(size_t)j * d + i], m);
            s = __fadd_rn(s, __fmul_rn(e, e));
        }
        const float v = __fdiv_rn(s, (float)n);
        for (int j = 0; j < n; j++) {
            float e = __fsub_rn(xb[(size_t)j * d + i], m);
            red[i] = v > 0.0f ? __fdiv_rn(__fmul_rn(e, e), v) : 0.0f;
            float rj = kvg_tree_sum(red, d);
            if (i == 0)
                r[j] = rj;
            nonfinite |= !isfinite(rj);
        }
        __syncthreads();
        if (i == 0) {
            if (nonfinite)
                bad[blk] = 1;
            unsigned long long taken = 0;
            for (int it = 1; it < KVG_SUM_ITEMS; it++) {
                int best = n;
                for (int j = 0; j < n; j++)
                    if (!(taken >> j & 1) && (best == n || r[j] > r[best]))
                        best = j;
                if (best == n) {             /* fewer tokens than items: the mean again */
                    for (int k = 0; k < sb; k++)
                        ob[it * sb + k] = ob[k];
                    os[it] = os[0];
                    continue;
                }
                taken |= 1ull << best;
                const unsigned char *src = bits + (blk * (size_t)n + best) * sb;
                for (int k = 0; k < sb; k++)
                    ob[it * sb + k] = src[k];
                os[it] = scales[blk * (size_t)n + best];
            }
        }
        __syncthreads();
    }
}

extern "C" int kvg_summary_cuda(const kvarc_rotation *rot, const float *d_x, const uint8_t *d_bits,
                                const uint16_t *d_scales, size_t nb, size_t n, uint8_t *d_sum_bits,
                                uint16_t *d_sum_scales, void *stream)
{
    if (!rot || kvarc_head_dim_check(rot->head_dim) || !d_x || !d_bits || !d_scales || !d_sum_bits ||
        !d_sum_scales || n < 1 || n > KVG_SIG_BLOCK)
        return -EINVAL;
    if (nb == 0)
        return 0;
    int rc = 0, *d_bad = NULL, *bad = (int *)malloc(nb * sizeof(int));
    cudaStream_t s = kvg_stream(stream);
    unsigned grid = nb < 65535 ? (unsigned)nb : 65535;
    if (!bad)
        return -ENOMEM;
    KVG_CUDA_TRY(cudaMallocAsync((void **)&d_bad, nb * sizeof(int), s));
    KVG_CUDA_TRY(cudaMemsetAsync(d_bad, 0, nb * sizeof(int), s));
    summary_kernel<<<grid, (unsigned)rot->head_dim, 0, s>>>(*rot, d_x, d_bits, d_scales, nb, (int)n, d_sum_bits,
                                                            d_sum_scales, d_bad);
    KVG_CUDA_TRY(cudaGetLastError());
    rc = kvg_flags_back(d_bad, bad, nb, s);
fail:
    if (d_bad)
        cudaFreeAsync(d_bad, s);
    free(bad);
    return rc;
}

__global__ static void block_best_kernel(const float *item_scores, size_t nb, int S, const unsigned char *ok,
                                         float *out)
{
    for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < nb; b += (size_t)gridDim.x * blockDim.x) {
        float best = item_scores[b * S];
        for (int s = 1; s < S; s++)
            best = item_scores[b * S + s] > best ? item_scores[b * S + s] : best;
        out[b] = ok && !ok[b] ? -INFINITY : best;
    }
}

extern "C" int kvg_block_best_cuda(const float *d_item_scores, size_t nb, int items, const uint8_t *d_ok,
                                   float *d_out, void *stream)
{
    if (!d_item_scores || !d_out || items < 1)
        return -EINVAL;
    if (nb == 0)
        return 0;
    int rc = 0;
    cudaStream_t s = kvg_stream(stream);
    unsigned threads = 256, grid = (unsigned)((nb + threads - 1) / threads);
    if (grid > 8192)
        grid = 8192;
    block_best_kernel<<<grid, threads, 0, s>>>(d_item_scores, nb, items, d_ok, d_out);
    KVG_CUDA_TRY(cudaGetLastError());
    KVG_CUDA_TRY(cudaStreamSynchronize(s));
fail:
    return rc;
}
