/* gpu_none.c - the device backend of a libkvarc built without CUDA
 * (gpu.h): there is never a device, so cv->gpu stays NULL and the paths
 * that test it run on the CPU; the calls that need a device answer
 * -ENOTSUP. */
#include <errno.h>

#include "gpu.h"

int kl_gpu_init(kvarc_conv *cv)
{
    cv->gpu = NULL;
    return 0;
}

void kl_gpu_free(kvarc_conv *cv)
{
    cv->gpu = NULL;
}

int kl_gpu_put_sigs(kvarc_conv *cv, uint32_t layer, uint32_t head, uint64_t first, const uint8_t *bits,
                    const uint16_t *scales, uint64_t n)
{
    (void)cv, (void)layer, (void)head, (void)first, (void)bits, (void)scales, (void)n;
    return -ENOTSUP;
}

long kl_gpu_stage1(kvarc_conv *cv, uint32_t layer, uint32_t head, const kvg_query *qs, int n_q, uint64_t first,
                   uint64_t n, const float *blk_bias, size_t nblk, size_t r, uint32_t blocks, kl_coarse_scratch *x,
                   uint32_t *idx_out)
{
    (void)cv, (void)layer, (void)head, (void)qs, (void)n_q, (void)first, (void)n, (void)blk_bias, (void)nblk;
    (void)r, (void)blocks, (void)x, (void)idx_out;
    return -ENOTSUP;
}

int kl_gpu_ring_sync(kvarc_conv *cv, uint32_t layer)
{
    (void)cv, (void)layer;
    return -ENOTSUP;
}

int kl_gpu_attend(kvarc_conv *cv, uint32_t layer, const float *qi, const float *sink_k, const float *sink_v,
                  size_t ns, const float *rk, const float *rv, size_t kstride, size_t kn, uint64_t hot_lo,
                  size_t n_hot, float scale, float *out)
{
    (void)cv, (void)layer, (void)qi, (void)sink_k, (void)sink_v, (void)ns, (void)rk, (void)rv, (void)kstride;
    (void)kn, (void)hot_lo, (void)n_hot, (void)scale, (void)out;
    return -ENOTSUP;
}

int kl_gpu_to_host(void *dst, const void *d_src, size_t bytes)
{
    (void)dst, (void)d_src, (void)bytes;
    return -ENOTSUP;
}

int kl_gpu_to_device(void *d_dst, const void *src, size_t bytes)
{
    (void)d_dst, (void)src, (void)bytes;
    return -ENOTSUP;
}
