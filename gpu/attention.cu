/* attention.cu - GPU version of exact attention over partitions
 * (CPU reference: attention_ref.c, kvg_attend_ref).
 *
 * Version 1, flash-decoding split over the key axis: the keys of every
 * (partition, kv head) are cut into units of UNIT tokens. Kernel 1 runs
 * one block per (unit, query head): each thread scores one key (a dot
 * product over head_dim, the query in shared memory), the block takes the
 * max, the exponentials and their sum, then each thread owns output
 * dimensions and sums p_t * v_t over the unit's keys: a softmax state
 * (m, l, o) per unit, as kvg_attn_partial_ref computes it. Kernel 2 runs
 * one block per query head and merges its units in order with
 * kvg_attn_merge_ref's rule (empty states skipped), then divides by l.
 * fp32 throughout; the sums run in another order than the CPU's, so
 * parity is to a tolerance (test_cuda_parity: relative 1e-5), not bits.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"

#define UNIT 256                 /* keys per unit = threads of kernel 1 */

struct unit_desc {               /* one unit: its keys and values (device), count */
    const float *k, *v;
    int n;
};

__global__ static void partial_kernel(const float *q, float scale, int d, int group, const unit_desc *units,
                                      const int *unit_first, const int *unit_count, float *states)
{
    __shared__ float qs[KVARC_HEAD_DIM_MAX];
    __shared__ float p[UNIT];
    __shared__ float red[UNIT];
    int hq = blockIdx.y, hk = hq / group, u = blockIdx.x, t = threadIdx.x;
    int nu_max = gridDim.x;
    float *st = states + ((size_t)hq * nu_max + u) * (size_t)(d + 2);
    if (u >= unit_count[hk]) {                   /* this kv head has fewer units: an empty state */
        if (t == 0) {
            st[0] = -INFINITY;
            st[1] = 0.0f;
        }
        for (int i = t; i < d; i += blockDim.x)
            st[2 + i] = 0.0f;
        return;
    }
    const unit_desc ud = units[unit_first[hk] + u];
    for (int i = t; i < d; i += blockDim.x)
        qs[i] = q[(size_t)hq * d + i];
    __syncthreads();
    float logit = -INFINITY;
    if (t < ud.n) {
        const float *kt = ud.k + (size_t)t * d;
        float s = 0.0f;
        for (int i = 0; i < d; i++)
            s = __fadd_rn(s, __fmul_rn(qs[i], kt[i]));
        logit = __fmul_rn(scale, s);
    }
    red[t] = logit;
    __syncthreads();
    for (int h = UNIT / 2; h >= 1; h /= 2) {     /* max */
        if (t < h)
            red[t] = fmaxf(red[t], red[t + h]);
        __syncthreads();
    }
    float m = red[0];
    __syncthreads();
    p[t] = t < ud.n ? expf(logit - m) : 0.0f;
    red[t] = p[t];
    __syncthreads();
    for (int h = UNIT / 2; h >= 1; h /= 2) {     /* sum */
        if (t < h)
            red[t] = __fadd_rn(red[t], red[t + h]);
        __syncthreads();
    }
    if (t == 0) {
        st[0] = m;
        st[1] = red[0];
    }
    for (int i = t; i < d; i += blockDim.x) {
        float o = 0.0f;
        for (int j = 0; j < ud.n; j++)
            o = __fadd_rn(o, __fmul_rn(p[j], ud.v[(size_t)j * d + i]));
        st[2 + i] = o;
    }
}

__global__ static void merge_kernel(int d, int nu_max, const float *states, float *out, int *empty)
{
    int hq = blockIdx.x, i = threadIdx.x;
    float m = -INFINITY, l = 0.0f, o = 0.0f;
    for (int u = 0; u < nu_max; u++) {
        const float *st = states + ((size_t)hq * nu_max + u) * (size_t)(d + 2);
        float bm = st[0], bl = st[1], bo = i < d ? st[2 + i] : 0.0f;
        if (bl == 0.0f)
            continue;
        if (l == 0.0f) {
            m = bm;
            l = bl;
            o = bo;
            continue;
        }
        float mm = fmaxf(m, bm), ca = expf(m - mm), cb = expf(bm - mm);
        m = mm;
        l = __fadd_rn(__fmul_rn(l, ca), __fmul_rn(bl, cb));
        o = __fadd_rn(__fmul_rn(o, ca), __fmul_rn(bo, cb));
    }
    if (i < d)
        out[(size_t)hq * d + i] = l > 0.0f ? __fdiv_rn(o, l) : 0.0f;
    if (i == 0 && l == 0.0f)
        *empty = 1;
}

extern "C" int kvg_attend_cuda(const float *d_q, int n_q_heads, int n_kv_heads, int d, float scale,
                               const kvg_attn_part *parts, int n_parts, float *d_out, void *stream)
{
    if (!d_q || !d_out || n_q_heads < 1 || n_kv_heads < 1 || n_q_heads % n_kv_heads || n_parts < 0 ||
        (n_parts && !parts) || !isfinite(scale))
        return -EINVAL;
    if (kvarc_head_dim_check(d))
        return KVARC_EHEADDIM;
    int rc = 0, nu_max = 0, total = 0, empty = 0;
    float *hq = (float *)malloc((size_t)n_q_heads * d * sizeof(float));
    int *first = (int *)calloc((size_t)n_kv_heads, sizeof(int)), *count = (int *)calloc((size_t)n_kv_heads, sizeof(int));
    unit_desc *units = NULL;
    unit_desc *d_units = NULL;
    int *d_first = NULL, *d_count = NULL, *d_empty = NULL;
    float *d_states = NULL;
    cudaStream_t s = kvg_stream(stream);
    if (!hq || !first || !count) {
        rc = -ENOMEM;
        goto fail;
    }
    /* the reference refuses a non-finite query: check it the same way */
    KVG_CUDA_TRY(cudaMemcpyAsync(hq, d_q, (size_t)n_q_heads * d * sizeof(float), cudaMemcpyDeviceToHost, s));
    KVG_CUDA_TRY(cudaStreamSynchronize(s));
    for (size_t i = 0; i < (size_t)n_q_heads * (size_t)d; i++)
        if (!isfinite(hq[i])) {
            rc = KVARC_ENONFINITE;
            goto fail;
        }
    for (int h = 0; h < n_kv_heads; h++)
        for (int p = 0; p < n_parts; p++) {
            size_t cnt = parts[p].n_per_head ? parts[p].n_per_head[h] : parts[p].n;
            if (cnt && (!parts[p].k || !parts[p].v || cnt > parts[p].stride)) {
                rc = -EINVAL;
                goto fail;
            }
            total += (int)((cnt + UNIT - 1) / UNIT);
        }
    units = (unit_desc *)malloc(((size_t)total + 1) * sizeof *units);
    if (!units) {
        rc = -ENOMEM;
        goto fail;
    }
    total = 0;
    for (int h = 0; h < n_kv_heads; h++) {      /* units of kv head h, partitions in order */
        first[h] = total;
        for (int p = 0; p < n_parts; p++) {
            size_t cnt = parts[p].n_per_head ? parts[p].n_per_head[h] : parts[p].n;
            size_t off = (size_t)h * parts[p].stride * (size_t)d;
            for (size_t t0 = 0; t0 < cnt; t0 += UNIT) {
                units[total].k = parts[p].k + off + t0 * (size_t)d;
                units[total].v = parts[p].v + off + t0 * (size_t)d;
                units[total].n = (int)(cnt - t0 < UNIT ? cnt - t0 : UNIT);
                total++;
            }
        }
        count[h] = total - first[h];
        nu_max = count[h] > nu_max ? count[h] : nu_max;
    }
    if (nu_max == 0) {
        rc = -ENODATA;
        goto fail;
    }
    KVG_CUDA_TRY(cudaMallocAsync((void **)&d_units, (size_t)total * sizeof *units, s));
    KVG_CUDA_TRY(cudaMallocAsync((void **)&d_first, (size_t)n_kv_heads * sizeof(int), s));
    KVG_CUDA_TRY(cudaMallocAsync((void **)&d_count, (size_t)n_kv_heads * sizeof(int), s));
    KVG_CUDA_TRY(cudaMallocAsync((void **)&d_empty, sizeof(int), s));
    KVG_CUDA_TRY(cudaMallocAsync((void **)&d_states, (size_t)n_q_heads * nu_max * (size_t)(d + 2) * sizeof(float), s));
    KVG_CUDA_TRY(cudaMemcpyAsync(d_units, units, (size_t)total * sizeof *units, cudaMemcpyHostToDevice, s));
    KVG_CUDA_TRY(cudaMemcpyAsync(d_first, first, (size_t)n_kv_heads * sizeof(int), cudaMemcpyHostToDevice, s));
    KVG_CUDA_TRY(cudaMemcpyAsync(d_count, count, (size_t)n_kv_heads * sizeof(int), cudaMemcpyHostToDevice, s));
    KVG_CUDA_TRY(cudaMemsetAsync(d_empty, 0, sizeof(int), s));
    {
        dim3 grid((unsigned)nu_max, (unsigned)n_q_heads);
        partial_kernel<<<grid, UNIT, 0, s>>>(d_q, scale, d, n_q_heads / n_kv_heads, d_units, d_first, d_count,
                                             d_states);
        KVG_CUDA_TRY(cudaGetLastError());
        merge_kernel<<<(unsigned)n_q_heads, (unsigned)d, 0, s>>>(d, nu_max, d_states, d_out, d_empty);
        KVG_CUDA_TRY(cudaGetLastError());
        KVG_CUDA_TRY(cudaMemcpyAsync(&empty, d_empty, sizeof(int), cudaMemcpyDeviceToHost, s));
        KVG_CUDA_TRY(cudaStreamSynchronize(s));
        if (empty)
            rc = -ENODATA;
    }
fail:
    if (d_units)
        cudaFreeAsync(d_units, s);
    if (d_first)
        cudaFreeAsync(d_first, s);
    if (d_count)
        cudaFreeAsync(d_count, s);
    if (d_empty)
        cudaFreeAsync(d_empty, s);
    if (d_states)
        cudaFreeAsync(d_states, s);
    free(units);
    free(hq);
    free(first);
    free(count);
    return rc;
}
