/* cuda_common.cuh - helpers shared by the .cu kernel families. */
#ifndef KVG_CUDA_COMMON_CUH
#define KVG_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>

#include "kvg_cuda.h"

/* Evaluate a CUDA runtime call; on failure say what and where, then
 * `goto fail` with rc = -EIO. */
#define KVG_CUDA_TRY(call)                                                         \
    do {                                                                           \
        cudaError_t e_ = (call);                                                   \
        if (e_ != cudaSuccess) {                                                   \
            fprintf(stderr, "kvg: %s failed at %s:%d: %s\n", #call, __FILE__,      \
                    __LINE__, cudaGetErrorString(e_));                             \
            rc = -EIO;                                                             \
            goto fail;                                                             \
        }                                                                          \
    } while (0)

/* Element i of a dtype array, widened exactly to fp32. */
__device__ __forceinline__ float kvg_load(int dt, const void *base, size_t i)
{
    if (dt == KVARC_DTYPE_F32)
        return ((const float *)base)[i];
    unsigned short h = ((const unsigned short *)base)[i];
    if (dt == KVARC_DTYPE_F16)
        return __half2float(__ushort_as_half(h));
    return __uint_as_float((unsigned)h << 16);
}

/* Tree sum of s[0..d) in shared memory, SCHEMA.md section 1 order; all d
 * threads of the block call it; s is clobbered; returns the sum to all. */
__device__ __forceinline__ float kvg_tree_sum(float *s, int d)
{
    int i = threadIdx.x;
    for (int h = d / 2; h >= 1; h /= 2) {
        __syncthreads();
        if (i < h)
            s[i] = __fadd_rn(s[i], s[i + h]);
    }
    __syncthreads();
    float r = s[0];
    __syncthreads();
    return r;
}

/* The Walsh-Hadamard butterflies of kvarc_fwht on shared t[0..d). */
__device__ __forceinline__ void kvg_fwht(float *t, int d)
{
    int i = threadIdx.x;
    for (int h = 1; h < d; h *= 2) {
        __syncthreads();
        if ((i & h) == 0) {
            float a = t[i], b = t[i + h];
            t[i] = __fadd_rn(a, b);
            t[i + h] = __fsub_rn(a, b);
        }
    }
    __syncthreads();
}

static inline cudaStream_t kvg_stream(void *s) { return (cudaStream_t)s; }

/* The per-item failure flags a kernel set, d_bad[n] (device), back into
 * bad[n] after the stream's work: KVARC_ENONFINITE if any is set, 0 if
 * none, -EIO (said on stderr) if the copy failed. */
static inline int kvg_flags_back(const int *d_bad, int *bad, size_t n, cudaStream_t s)
{
    int rc = 0;
    KVG_CUDA_TRY(cudaMemcpyAsync(bad, d_bad, n * sizeof(int), cudaMemcpyDeviceToHost, s));
    KVG_CUDA_TRY(cudaStreamSynchronize(s));
    for (size_t j = 0; j < n; j++)
        if (bad[j])
            rc = KVARC_ENONFINITE;
fail:
    return rc;
}

#endif
