/* append.c - durable appends of data blocks: one block (kvd_append,
 * kvd_append_sums) or many at once (kvd_append_n), each checked against
 * the conversation's shape and layer length in the batch's transaction
 * (prepare_data) and made durable by the group commit (commit.c). */
#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "cluster.h"
#include "kvd_internal.h"

/* ---- append ------------------------------------------------------------- */

static int prepare_data(kvd_engine *e, MDB_txn *txn, kvd_item *it, uint64_t seg, uint64_t off)
{
    conv_rec c;
    int rc = conv_get(e, txn, it->h.conv, &c);
    if (rc == -ENOENT || (!rc && (c.flags & KVD_CONV_DELETED)))
        return kvd_fail(&it->err, -ENOENT, "conversation %llu not found (deleted?)",
                        (unsigned long long)it->h.conv);
    if (rc)
        return rc;
    if (c.flags & KVD_CONV_SNAPSHOT)
        return kvd_fail(&it->err, -EPERM, "conversation '%s/%s' is a snapshot: fork it to append",
                        c.ns, c.name);
    if (it->h.layer >= c.shape.n_layers || it->h.n_heads != c.shape.n_kv_heads ||
        it->h.head_dim != c.shape.head_dim || it->h.format != c.shape.format)
        return kvd_fail(&it->err, KVARC_ESHAPE, "append to '%s/%s' layer %u does not match its shape "
                        "(%u layers, %u kv heads, head_dim %u, format %u)", c.ns, c.name,
                        it->h.layer, c.shape.n_layers, c.shape.n_kv_heads, c.shape.head_dim,
                        c.shape.format);
    uint64_t len;
    if ((rc = layer_len_get(e, txn, it->h.conv, it->h.layer, &len)))
        return rc;
    assert(it->h.count > 0 && len + it->h.count > len);   /* a layer only grows */
    if (it->h.first_pos != len)
        return kvd_fail(&it->err, -ERANGE, "append to '%s/%s' layer %u at position %llu, but the "
                        "layer has %llu tokens: appends must continue at the end", c.ns, c.name,
                        it->h.layer, (unsigned long long)it->h.first_pos, (unsigned long long)len);
    uint8_t kb[20];
    extent_key(kb, it->h.conv, it->h.layer, it->h.first_pos);
    extent_val ev = { seg, off, it->h.count, (uint32_t)it->bytes };
    MDB_val k = { 20, kb }, v = { sizeof ev, &ev };
    if ((rc = kvd_mdb_err(mdb_put(txn, e->extents, &k, &v, MDB_NOOVERWRITE))))
        return rc;
    return layer_len_put(e, txn, it->h.conv, it->h.layer, len + it->h.count);
}

int kvd_append(kvd_engine *e, uint64_t conv, uint32_t layer, uint64_t first_pos, uint32_t count,
               const uint8_t *sig_bits, const uint16_t *sig_scale, const uint8_t *records,
               kvd_err *err)
{
    return kvd_append_sums(e, conv, layer, first_pos, count, sig_bits, sig_scale, records, NULL, NULL, err);
}

/* The data block of b for conversation info (its shape checked) in *it
 * (it->block malloc'ed): 0 or an error in err. */
static int block_make(const conv_rec *info, uint64_t conv, const kvd_block_in *b, kvd_item *it, kvd_err *err)
{
    const kvd_shape *s = &info->shape;
    const uint32_t layer = b->layer, count = b->count;
    const uint64_t first_pos = b->first_pos;
    memset(it, 0, sizeof *it);
    if (layer >= s->n_layers)
        return kvd_fail(err, -EINVAL, "layer %u out of range: '%s/%s' has %u layers", layer,
                        info->ns, info->name, s->n_layers);
    if (count == 0 || !b->sig_bits || !b->sig_scale || !b->records)
        return kvd_fail(err, -EINVAL, "append needs count > 0 and signature and record buffers");
    int d = (int)s->head_dim, H = (int)s->n_kv_heads;
    uint32_t rb = (uint32_t)kvarc_record_bytes(s->format, d);
    uint32_t n_sum = b->sum_bits && b->sum_scale ? kvarc_block_n_sum(first_pos, count) : 0;
    size_t payload = kvarc_block_payload_bytes_sum(count, d, H, rb, n_sum);
    if (payload > (1u << 30))
        return kvd_fail(err, -E2BIG, "append of %u tokens x %d heads is %zu bytes; split it into "
                        "blocks under 1 GiB", count, H, payload);
    it->bytes = KVARC_BLOCK_HEADER + payload;
    it->block = calloc(1, it->bytes);
    if (!it->block)
        return kvd_fail(err, -ENOMEM, "out of memory for a %zu-byte block", it->bytes);
    it->h.kind = KVARC_BLOCK_DATA;
    it->h.version = KVARC_BLOCK_VERSION_PLAIN;
    it->h.format = s->format;
    it->h.format_version = kvarc_format_get(s->format)->version;
    it->h.head_dim = (uint16_t)d;
    it->h.n_heads = (uint16_t)H;
    it->h.layer = layer;
    it->h.conv = conv;
    it->h.first_pos = first_pos;
    it->h.count = count;
    it->h.rec_bytes = rb;
    it->h.payload_bytes = (uint32_t)payload;
    it->h.n_sum = n_sum;
    if (n_sum)
        it->h.version = KVARC_BLOCK_VERSION;     /* summaries: the one kind of block an older reader cannot take */
    size_t sb = (size_t)d / 8, sec = kvarc_block_sig_section(count, d), ssec = kvarc_block_sum_section(n_sum, d);
    for (int h = 0; h < H && n_sum; h++) {
        uint8_t *p = it->block + kvarc_block_sum_offset(&it->h, h);
        size_t nb = (size_t)n_sum * KVARC_SUM_ITEMS;
        memcpy(p, b->sum_bits + (size_t)h * nb * sb, nb * sb);
        memcpy(p + nb * sb, b->sum_scale + (size_t)h * nb, nb * 2);
        uint32_t crc = kvarc_sum_section_crc(conv, layer, first_pos, (uint32_t)h, p, ssec - 4);
        memcpy(p + ssec - 4, &crc, 4);
    }
    for (int h = 0; h < H; h++) {
        uint8_t *p = it->block + kvarc_block_sig_offset(&it->h, h);
        memcpy(p, b->sig_bits + (size_t)h * count * sb, count * sb);
        memcpy(p + count * sb, b->sig_scale + (size_t)h * count, count * 2);
        uint32_t crc = kvarc_sig_section_crc(conv, layer, first_pos, (uint32_t)h, p, sec - 4);
        memcpy(p + sec - 4, &crc, 4);
        for (uint32_t t = 0; t < count; t++) {
            uint8_t *slot = it->block + kvarc_block_slot_offset(&it->h, h, t);
            const uint8_t *rec = b->records + ((size_t)h * count + t) * rb;
            memcpy(slot, rec, rb);
            uint32_t rcrc = kvarc_record_crc(conv, layer, (uint32_t)h, first_pos + t, rec, rb);
            memcpy(slot + rb, &rcrc, 4);
        }
    }
    it->prepare = prepare_data;
    return 0;
}

int kvd_append_sums(kvd_engine *e, uint64_t conv, uint32_t layer, uint64_t first_pos, uint32_t count,
                    const uint8_t *sig_bits, const uint16_t *sig_scale, const uint8_t *records,
                    const uint8_t *sum_bits, const uint16_t *sum_scale, kvd_err *err)
{
    kvd_block_in b = { layer, first_pos, count, sig_bits, sig_scale, records, sum_bits, sum_scale };
    int rc = 0;
    kvd_append_n(e, conv, &b, 1, &rc, NULL, err);
    return rc;
}

int kvd_append_n(kvd_engine *e, uint64_t conv, const kvd_block_in *b, size_t n, int *rcs, kvd_err *errs,
                 kvd_err *err)
{
    conv_rec info;      /* one lookup: the commit re-validates under its txn */
    int rc = e->cluster ? clu_writer_begin(e, conv, err) : 0, first = 0;
    if (!rc)
        rc = conv_lookup(e, conv, &info, err);
    for (size_t i = 0; i < n; i++) {
        rcs[i] = rc;
        if (rc && errs && err)
            errs[i] = *err;     /* each block's answer says why */
    }
    if (rc || n == 0)
        return rc;
    kvd_item *items = calloc(n, sizeof *items), **q = calloc(n, sizeof *q);
    if (!items || !q) {
        free(items);
        free(q);
        rc = kvd_fail(err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < n; i++)
            rcs[i] = rc;
        return rc;
    }
    size_t nq = 0;
    for (size_t i = 0; i < n; i++) {       /* a block that cannot be made is refused alone */
        kvd_err be = { 0, "" };
        if ((rcs[i] = block_make(&info, conv, &b[i], &items[i], &be))) {
            if (!first && err)
                *err = be;
            if (errs)
                errs[i] = be;
            first = first ? first : rcs[i];
        } else {
            q[nq++] = &items[i];
        }
    }
    gc_submit_n(e, q, nq);
    for (size_t i = 0; i < n; i++) {
        if (!items[i].block)
            continue;
        rcs[i] = items[i].rc;
        if (items[i].rc && errs)
            errs[i] = items[i].err;
        if (!items[i].rc)
            atomic_fetch_add(&e->n_appends, 1);
        else if (!first) {
            first = items[i].rc;
            if (err)
                *err = items[i].err;
        }
        free(items[i].block);
    }
    free(items);
    free(q);
    return first;
}
