/* segment.c - segment file I/O and its fault-injection hooks.
 *
 * Segment life (state committed in the index, `segs`):
 *   (file only) --engine_roll/compact_copy--> OPEN (appends go here)
 *   OPEN --engine_roll--> SEALED --kvd_compact--> DEAD --seg_unpin/open--> unlinked
 * Invariants:
 *  1. A segment file's bytes past its committed size are garbage: the
 *     engine truncates them on open and after a failed batch.
 *  2. Blocks are never modified in place; a DEAD segment is unlinked only
 *     once no reader holds it pinned (segtab.c).
 *  3. Every write path goes through seg_pwritev/seg_sync, where tests can
 *     inject EIO, ENOSPC or a short write. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "kvd_internal.h"

static struct {
    atomic_int countdown[3];
    atomic_int error[3];
} faults = { { -1, -1, -1 }, { 0, 0, 0 } };

void kvd_fault_set(kvd_fault_op op, int error, int countdown)
{
    if ((int)op < 0 || op > KVD_FAULT_SHORT)
        return;
    atomic_store(&faults.error[op], error);
    atomic_store(&faults.countdown[op], countdown);
}

/* 1 if the armed fault op fires on this call (then disarmed). */
static int fault_fires(kvd_fault_op op)
{
    int c = atomic_load(&faults.countdown[op]);
    while (c >= 0) {
        if (atomic_compare_exchange_weak(&faults.countdown[op], &c, c - 1))
            return c == 0;
    }
    return 0;
}

void seg_path(const char *dir, uint64_t id, char *out, size_t len)
{
    snprintf(out, len, "%s/segments/%016llx.seg", dir, (unsigned long long)id);
}

int seg_parse_name(const char *name, uint64_t *id)
{
    unsigned long long v;
    char tail[8];
    char canon[32];
    if (sscanf(name, "%16llx.%7s", &v, tail) != 2 || strcmp(tail, "seg"))
        return 0;
    /* only the name seg_path gives: "5.seg" or "0x5.seg" is another file */
    snprintf(canon, sizeof canon, "%016llx.seg", v);
    if (strcmp(name, canon))
        return 0;
    *id = v;
    return 1;
}

int seg_pwritev(int fd, const struct iovec *iov_in, int n, uint64_t off)
{
    struct iovec iov[64];
    if (n > 64)
        return -EINVAL;
    for (int i = 0; i < n; i++)
        iov[i] = iov_in[i];
    if (fault_fires(KVD_FAULT_WRITE))
        return atomic_load(&faults.error[KVD_FAULT_WRITE]);
    int short_fault = fault_fires(KVD_FAULT_SHORT);
    int i = 0;
    while (i < n) {
        ssize_t w;
        if (short_fault) {
            /* write half of the first piece, then report the error */
            w = pwrite(fd, iov[i].iov_base, iov[i].iov_len / 2, (off_t)off);
            (void)w;
            return atomic_load(&faults.error[KVD_FAULT_SHORT]);
        }
        w = pwritev(fd, iov + i, n - i > 1024 ? 1024 : n - i, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        off += (uint64_t)w;
        while (i < n && (size_t)w >= iov[i].iov_len) {
            w -= (ssize_t)iov[i].iov_len;
            i++;
        }
        if (i < n && w > 0) {
            iov[i].iov_base = (char *)iov[i].iov_base + w;
            iov[i].iov_len -= (size_t)w;
        }
    }
    return 0;
}

int seg_sync(int fd)
{
    if (fault_fires(KVD_FAULT_SYNC))
        return atomic_load(&faults.error[KVD_FAULT_SYNC]);
    return fdatasync(fd) ? -errno : 0;
}

int seg_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    char *p = buf;
    while (len) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)             /* the index points past the file's end */
            return KVARC_ECORRUPT;
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}
