/* device.c - libkvarc's entry points for K, V, queries and outputs in the
 * caller's device memory (kvarc_append_device, kvarc_attend_device): a
 * copy to the host through the backend (gpu.h), then the host entry
 * points. Built the same with or without CUDA; without it the backend's
 * copies answer -ENOTSUP and so do these. */
#include <errno.h>
#include <stdlib.h>

#include "gpu.h"

/* The error for a failed copy of `what` (rc from kl_gpu_to_host/_device). */
static int copy_fail(kvarc_conv *cv, int rc, const char *what, size_t bytes)
{
    if (rc == -ENOTSUP)
        return kl_fail(cv, -ENOTSUP, "libkvarc was built without CUDA: no device pointers");
    return kl_fail(cv, rc, "%s is not %zu bytes of device memory", what, bytes);
}

int kvarc_append_device(kvarc_conv *cv, uint32_t layer, int dtype, const void *d_k, const void *d_v, uint32_t n)
{
    size_t es = kvarc_dtype_size((kvarc_dtype)dtype), bytes = (size_t)cv->m.n_kv_heads * n * cv->m.head_dim * es;
    if (!es || !d_k || !d_v)
        return kl_fail(cv, !es ? KVARC_EDTYPE : -EINVAL, "append_device: dtype %d, k and v device pointers", dtype);
    void *k = malloc(bytes + 1), *v = malloc(bytes + 1);
    int rc;
    if (!k || !v)
        rc = kl_fail(cv, -ENOMEM, "out of memory");
    else if ((rc = kl_gpu_to_host(k, d_k, bytes)) || (rc = kl_gpu_to_host(v, d_v, bytes)))
        rc = copy_fail(cv, rc, "append_device: k or v", bytes);
    else
        rc = kvarc_append(cv, layer, dtype, k, v, n);
    free(k);
    free(v);
    return rc;
}

int kvarc_attend_device(kvarc_conv *cv, uint32_t layer, const float *d_q, uint32_t n_q, float *d_out)
{
    size_t bytes = (size_t)cv->m.n_q_heads * n_q * cv->m.head_dim * 4;
    if (!d_q || !d_out)
        return kl_fail(cv, -EINVAL, "attend_device: q and out device pointers must be given");
    float *q = malloc(bytes + 1), *out = malloc(bytes + 1);
    int rc;
    if (!q || !out)
        rc = kl_fail(cv, -ENOMEM, "out of memory");
    else if ((rc = kl_gpu_to_host(q, d_q, bytes)))
        rc = copy_fail(cv, rc, "attend_device: q", bytes);
    else if (!(rc = kvarc_attend(cv, layer, q, n_q, out)) && (rc = kl_gpu_to_device(d_out, out, bytes)))
        rc = copy_fail(cv, rc, "attend_device: out", bytes);
    free(q);
    free(out);
    return rc;
}
