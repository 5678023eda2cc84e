/* engine_util.h - helpers for the storage engine tests: temporary data
 * directories and deterministic block contents that can be re-derived
 * from (conv, layer, head, position) to check what a read returns. */
#ifndef KVARC_ENGINE_UTIL_H
#define KVARC_ENGINE_UTIL_H

#include <dirent.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvd.h"
#include "testutil.h"

static inline void eu_tmpdir(char *out, size_t len, const char *tag)
{
    const char *base = getenv("TMPDIR");
    snprintf(out, len, "%s/kvarc-%s-XXXXXX", base ? base : "/tmp", tag);
    if (!mkdtemp(out)) {
        perror("mkdtemp");
        exit(1);
    }
}

static inline void eu_rmrf(const char *path)
{
    DIR *d = opendir(path);
    if (d) {
        struct dirent *de;
        while ((de = readdir(d))) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
                continue;
            char p[8192];
            if (snprintf(p, sizeof p, "%s/%s", path, de->d_name) >= (int)sizeof p)
                continue;
            eu_rmrf(p);
        }
        closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}

static inline kvd_shape eu_shape(uint32_t layers, uint32_t heads, int fmt)
{
    kvd_shape s;
    memset(&s, 0, sizeof s);
    s.n_layers = layers;
    s.n_kv_heads = heads;
    s.n_q_heads = heads * 4;
    s.head_dim = 128;
    s.format = (uint8_t)fmt;
    s.pos_mode = KVARC_POS_REMAPPED;   /* no RoPE here: kind-1 scores, the query as sent */
    s.dtype = KVARC_DTYPE_F16;
    s.rope_theta = 10000.0f;
    s.seed = 0x1234;
    snprintf(s.fingerprint, sizeof s.fingerprint, "test-model-v1");
    return s;
}

/* Byte b of the record of (tag, layer, head, pos): a pure function, so a
 * reader can check what it got. tag distinguishes conversations' data. */
static inline uint8_t eu_byte(uint64_t tag, uint32_t layer, uint32_t head, uint64_t pos, size_t b)
{
    uint64_t s = tag * 0x9e3779b97f4a7c15ull ^ ((uint64_t)layer << 48) ^ ((uint64_t)head << 40) ^
                 (pos << 8) ^ b;
    return (uint8_t)(kvarc_splitmix64(&s) >> 56);
}

/* Fill block buffers for `count` tokens from first_pos. */
static inline void eu_fill(const kvd_shape *s, uint64_t tag, uint32_t layer, uint64_t first,
                           uint32_t count, uint8_t *bits, uint16_t *scales, uint8_t *recs)
{
    int rb = kvarc_record_bytes(s->format, (int)s->head_dim), sb = (int)s->head_dim / 8;
    for (uint32_t h = 0; h < s->n_kv_heads; h++)
        for (uint32_t t = 0; t < count; t++) {
            uint64_t p = first + t;
            size_t i = (size_t)h * count + t;
            for (int b = 0; b < rb; b++)
                recs[i * rb + b] = eu_byte(tag, layer, h, p, (size_t)b);
            for (int b = 0; b < sb; b++)
                bits[i * sb + b] = eu_byte(tag, layer, h, p, 1000 + (size_t)b);
            scales[i] = (uint16_t)(eu_byte(tag, layer, h, p, 2000) | eu_byte(tag, layer, h, p, 2001) << 8);
        }
}

/* Append `count` tokens at first with contents eu_fill(tag ...). */
static inline int eu_append(kvd_engine *e, const kvd_conv_info *ci, uint64_t tag, uint32_t layer,
                            uint64_t first, uint32_t count, kvd_err *err)
{
    const kvd_shape *s = &ci->shape;
    int rb = kvarc_record_bytes(s->format, (int)s->head_dim);
    size_t n = (size_t)s->n_kv_heads * count;
    uint8_t *bits = malloc(n * s->head_dim / 8), *recs = malloc(n * rb);
    uint16_t *sc = malloc(n * 2);
    eu_fill(s, tag, layer, first, count, bits, sc, recs);
    int rc = kvd_append(e, ci->id, layer, first, count, bits, sc, recs, err);
    free(bits);
    free(recs);
    free(sc);
    return rc;
}

/* Check records at pos[0..n) of (conv, layer, head) read back as tag's. */
static inline int eu_check_records(kvd_reader *r, const kvd_conv_info *ci, uint64_t tag,
                                   uint32_t layer, uint32_t head, const uint64_t *pos, size_t n,
                                   kvd_err *err)
{
    int rb = kvarc_record_bytes(ci->shape.format, (int)ci->shape.head_dim);
    uint8_t *out = malloc(n * rb);
    int rc = kvd_read_records(r, ci->id, layer, head, pos, n, out, err);
    if (!rc)
        for (size_t i = 0; i < n && !rc; i++)
            for (int b = 0; b < rb; b++)
                if (out[i * rb + b] != eu_byte(tag, layer, head, pos[i], (size_t)b)) {
                    rc = 1;
                    break;
                }
    free(out);
    return rc;
}

#endif
