/* topk.cu - GPU version of top-k selection (CPU reference: topk_ref.c).
 *
 * Version 1, all on the device, no host round trip until the end:
 *   1. four radix passes (most significant byte first): a histogram of the
 *      keys that share the threshold prefix so far, then a one-thread
 *      kernel that picks the byte holding the k-th key -> after four passes
 *      the threshold key T and the number of keys equal to T still needed;
 *   2. an ordered compaction of every key >= T: per-block counts, one
 *      exclusive scan, then each block writes its keys in index order
 *      (warp ballots), so ties stay sorted by index;
 *   3. one block keeps the keys > T and the first `need` keys == T and
 *      bitonic-sorts the k winners by (key desc, index asc).
 * Same set and order as the CPU reference (both equal a full sort's first
 * k). k is limited to KVG_CUDA_TOPK_MAX (shared memory of the last step). */
#include "cuda_common.cuh"

#define CBLOCK 1024

struct topk_state {
    unsigned prefix, mask, need;
    unsigned hist[256];
};

__device__ __forceinline__ unsigned dkey(float s)
{
    unsigned u = __float_as_uint(s);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ static void hist_kernel(const float *scores, size_t n, topk_state *st, int shift)
{
    __shared__ unsigned h[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        h[i] = 0;
    __syncthreads();
    unsigned prefix = st->prefix, mask = st->mask;
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < n;
         j += (size_t)gridDim.x * blockDim.x) {
        unsigned key = dkey(scores[j]);
        if ((key & mask) == prefix)
            atomicAdd(&h[(key >> shift) & 0xff], 1u);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        if (h[i])
            atomicAdd(&st->hist[i], h[i]);
}

__global__ static void pick_kernel(topk_state *st, int shift)
{
    unsigned need = st->need, b = 256;
    while (b-- > 0) {
        if (st->hist[b] >= need)
            break;
        need -= st->hist[b];
    }
    st->need = need;
    st->prefix |= b << shift;
    st->mask |= 0xffu << shift;
    for (int i = 0; i < 256; i++)
        st->hist[i] = 0;
}

/* Exclusive prefix, across the block, of one flag per thread; total out. */
__device__ static unsigned block_rank(int flag, unsigned *warp_tot, unsigned *total)
{
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned ballot = __ballot_sync(0xffffffffu, flag);
    unsigned rank = __popc(ballot & ((1u << lane) - 1));
    if (lane == 0)
        warp_tot[warp] = __popc(ballot);
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned s = 0;
        for (unsigned w = 0; w < blockDim.x / 32; w++) {
            unsigned c = warp_tot[w];
            warp_tot[w] = s;
            s += c;
        }
        *total = s;
    }
    __syncthreads();
    rank += warp_tot[warp];
    __syncthreads();
    return rank;
}

__global__ static void count_kernel(const float *scores, size_t n, const topk_state *st,
                                    unsigned *counts)
{
    size_t j = blockIdx.x * (size_t)CBLOCK + threadIdx.x;
    int flag = j < n && dkey(scores[j]) >= st->prefix;
    unsigned c = __syncthreads_count(flag);
    if (threadIdx.x == 0)
        counts[blockIdx.x] = c;
}

/* Exclusive scan of counts[0..nb) in place; counts[nb] = total. */
__global__ static void scan_kernel(unsigned *counts, unsigned nb)
{
    __shared__ unsigned part[CBLOCK];
    unsigned per = (nb + CBLOCK - 1) / CBLOCK, lo = threadIdx.x * per;
    unsigned s = 0;
    for (unsigned i = lo; i < lo + per && i < nb; i++)
        s += counts[i];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned acc = 0;
        for (int i = 0; i < CBLOCK; i++) {
            unsigned c = part[i];
            part[i] = acc;
            acc += c;
        }
        counts[nb] = acc;
    }
    __syncthreads();
    s = part[threadIdx.x];
    for (unsigned i = lo; i < lo + per && i < nb; i++) {
        unsigned c = counts[i];
        counts[i] = s;
        s += c;
    }
}

__global__ static void scatter_kernel(const float *scores, size_t n, const topk_state *st,
                                      const unsigned *offsets, uint2 *cand)
{
    __shared__ unsigned warp_tot[CBLOCK / 32], total;
    size_t j = blockIdx.x * (size_t)CBLOCK + threadIdx.x;
    unsigned key = j < n ? dkey(scores[j]) : 0;
    int flag = j < n && key >= st->prefix;
    unsigned r = block_rank(flag, warp_tot, &total);
    if (flag)
        cand[offsets[blockIdx.x] + r] = make_uint2(key, (unsigned)j);
}

__device__ __forceinline__ bool before(uint2 a, uint2 b)
{
    return a.x != b.x ? a.x > b.x : a.y < b.y;
}

__global__ static void final_kernel(const float *scores, const uint2 *cand, const unsigned *total_p,
                                    const topk_state *st, unsigned k, unsigned *idx_out,
                                    float *val_out)
{
    __shared__ uint2 win[KVG_CUDA_TOPK_MAX];
    __shared__ unsigned warp_tot[CBLOCK / 32], chunk_ties, nwin, ties_before;
    unsigned m = *total_p, thr = st->prefix, need = st->need;
    if (threadIdx.x == 0) {
        nwin = 0;
        ties_before = 0;
    }
    __syncthreads();
    for (unsigned base = 0; base < m; base += CBLOCK) {
        unsigned c = base + threadIdx.x;
        uint2 e = c < m ? cand[c] : make_uint2(0, 0);
        int tie = c < m && e.x == thr;
        unsigned r = block_rank(tie, warp_tot, &chunk_ties);
        bool take = c < m && (e.x > thr || (tie && ties_before + r < need));
        if (take)
            win[atomicAdd(&nwin, 1u)] = e;
        __syncthreads();
        if (threadIdx.x == 0)
            ties_before += chunk_ties;
        __syncthreads();
    }
    unsigned p2 = 1;
    while (p2 < k)
        p2 <<= 1;
    for (unsigned i = nwin + threadIdx.x; i < p2; i += blockDim.x)
        win[i] = make_uint2(0, 0xffffffffu);              /* sorts last */
    __syncthreads();
    for (unsigned size = 2; size <= p2; size <<= 1)
        for (unsigned stride = size / 2; stride > 0; stride >>= 1) {
            for (unsigned t = threadIdx.x; t < p2 / 2; t += blockDim.x) {
                unsigned i = 2 * stride * (t / stride) + t % stride, j = i + stride;
                bool up = (i & size) == 0;
                if (before(win[j], win[i]) == up) {
                    uint2 x = win[i];
                    win[i] = win[j];
                    win[j] = x;
                }
            }
            __syncthreads();
        }
    for (unsigned i = threadIdx.x; i < k; i += blockDim.x) {
        idx_out[i] = win[i].y;
        if (val_out)
            val_out[i] = scores[win[i].y];
    }
}

static size_t nblocks(size_t n) { return (n + CBLOCK - 1) / CBLOCK; }

extern "C" size_t kvg_topk_cuda_scratch_bytes(size_t n)
{
    size_t a = (sizeof(topk_state) + 15) / 16 * 16;
    size_t b = ((nblocks(n) + 1) * sizeof(unsigned) + 15) / 16 * 16;
    return a + b + n * sizeof(uint2);
}

extern "C" long kvg_topk_cuda(const float *d_scores, size_t n, size_t k, uint32_t *d_idx_out,
                              float *d_val_out, void *d_scratch, void *stream)
{
    int rc = 0;
    if (k > n)
        k = n;
    if (k == 0)
        return 0;
    if (!d_scores || !d_idx_out || !d_scratch || n >= 0x7fffffffu || k > KVG_CUDA_TOPK_MAX)
        return -EINVAL;
    cudaStream_t s = kvg_stream(stream);
    char *scr = (char *)d_scratch;
    topk_state *st = (topk_state *)scr;
    unsigned *counts = (unsigned *)(scr + (sizeof(topk_state) + 15) / 16 * 16);
    size_t nb = nblocks(n);
    uint2 *cand = (uint2 *)((char *)counts + ((nb + 1) * sizeof(unsigned) + 15) / 16 * 16);
    topk_state init = {};
    init.need = (unsigned)k;
    unsigned hb = (unsigned)((n + 255) / 256);
    if (hb > 2048)
        hb = 2048;
    KVG_CUDA_TRY(cudaMemcpyAsync(st, &init, sizeof init, cudaMemcpyHostToDevice, s));
    for (int shift = 24; shift >= 0; shift -= 8) {
        hist_kernel<<<hb, 256, 0, s>>>(d_scores, n, st, shift);
        pick_kernel<<<1, 1, 0, s>>>(st, shift);
    }
    count_kernel<<<(unsigned)nb, CBLOCK, 0, s>>>(d_scores, n, st, counts);
    scan_kernel<<<1, CBLOCK, 0, s>>>(counts, (unsigned)nb);
    scatter_kernel<<<(unsigned)nb, CBLOCK, 0, s>>>(d_scores, n, st, counts, cand);
    final_kernel<<<1, CBLOCK, 0, s>>>(d_scores, cand, counts + nb, st, (unsigned)k, d_idx_out,
                                      d_val_out);
    KVG_CUDA_TRY(cudaGetLastError());
    KVG_CUDA_TRY(cudaStreamSynchronize(s));
    return (long)k;
fail:
    return rc;
}
