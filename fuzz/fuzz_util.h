/* fuzz_util.h - what the fuzz targets share: scratch directories (on
 * /dev/shm when there is one: rebuilds and appends fsync, and tmpfs makes
 * that free), whole-file writes, a small engine with a few conversations,
 * and the checksum fix-ups that let a mutated input reach the code behind
 * a CRC (segment blocks, SCHEMA.md section 9; export sections, section 10).
 * Header-only: each target is one translation unit. */
#ifndef KVARC_FUZZ_UTIL_H
#define KVARC_FUZZ_UTIL_H

#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvarc_schema.h"
#include "kvd.h"

static inline void fz_die(const char *what, const char *msg)
{
    fprintf(stderr, "fuzz setup: %s: %s\n", what, msg);
    abort();
}

/* A fresh directory kvarc-fuzz-TAG-XXXXXX under $TMPDIR, else /dev/shm, else /tmp. */
static inline void fz_tmpdir(char *out, size_t len, const char *tag)
{
    const char *base = getenv("TMPDIR");
    struct stat st;
    if (!base)
        base = !stat("/dev/shm", &st) && S_ISDIR(st.st_mode) && !access("/dev/shm", W_OK) ? "/dev/shm" : "/tmp";
    snprintf(out, len, "%s/kvarc-fuzz-%s-XXXXXX", base, tag);
    if (!mkdtemp(out))
        fz_die("mkdtemp", out);
}

static inline void fz_rmrf(const char *path)
{
    DIR *d = opendir(path);
    if (d) {
        struct dirent *de;
        while ((de = readdir(d))) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
                continue;
            char p[4096];
            if (snprintf(p, sizeof p, "%s/%s", path, de->d_name) >= (int)sizeof p)
                continue;
            fz_rmrf(p);
        }
        closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}

static inline int fz_write_file(const char *path, const uint8_t *b, size_t n, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0)
        return -1;
    size_t off = 0;
    while (off < n) {
        ssize_t w = write(fd, b + off, n - off);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        off += (size_t)w;
    }
    return close(fd);
}

/* The shape of the fuzz engines' conversations: small, so appends are cheap. */
static inline kvd_shape fz_shape(int fmt, uint8_t pos_mode)
{
    kvd_shape s;
    memset(&s, 0, sizeof s);
    s.n_layers = 2;
    s.n_kv_heads = 2;
    s.n_q_heads = 4;
    s.head_dim = 64;
    s.format = (uint8_t)fmt;
    s.pos_mode = pos_mode;
    s.dtype = KVARC_DTYPE_F16;
    s.rotary_dims = pos_mode == KVARC_POS_REMAPPED ? 0 : 64;
    s.rope_theta = 10000.0f;
    s.seed = 0x1234;
    snprintf(s.fingerprint, sizeof s.fingerprint, "fuzz-model");
    return s;
}

/* count tokens at first of every layer of conversation ci, deterministic bytes. */
static inline int fz_append(kvd_engine *e, const kvd_conv_info *ci, uint64_t first, uint32_t count, kvd_err *err)
{
    const kvd_shape *s = &ci->shape;
    int rb = kvarc_record_bytes(s->format, (int)s->head_dim);
    size_t n = (size_t)s->n_kv_heads * count;
    uint8_t *bits = malloc(n * s->head_dim / 8), *recs = malloc(n * (size_t)rb);
    uint16_t *sc = malloc(n * 2);
    uint64_t st = ci->id * 7919 + first;
    for (size_t i = 0; i < n * s->head_dim / 8; i++)
        bits[i] = (uint8_t)kvarc_splitmix64(&st);
    for (size_t i = 0; i < n; i++)
        sc[i] = kvarc_f32_to_f16(0.5f + (float)(kvarc_splitmix64(&st) % 100) / 100.0f);
    for (size_t i = 0; i < n * (size_t)rb; i++)
        recs[i] = (uint8_t)kvarc_splitmix64(&st);
    if (s->format == KVARC_FMT_F16 || s->format == KVARC_FMT_BF16)   /* finite values in lossless records */
        for (size_t i = 1; i < n * (size_t)rb; i += 2)
            recs[i] &= 0x3f;
    int rc = 0;
    for (uint32_t l = 0; l < s->n_layers && !rc; l++)
        rc = kvd_append(e, ci->id, l, first, count, bits, sc, recs, err);
    free(bits);
    free(recs);
    free(sc);
    return rc;
}

/* Engine on dir with conversations fz/a (q3, remapped, 80 tokens), fz/b
 * (f16, true positions, 70 tokens), fz/c (q4, empty): ids 1..3. */
static inline kvd_engine *fz_engine(const char *dir)
{
    kvd_options o = { .dir = dir, .map_size = 64u << 20, .segment_bytes = 1u << 20 };
    kvd_engine *e;
    kvd_err err;
    kvd_conv_info ci;
    if (kvd_open(&o, &e, &err))
        fz_die("kvd_open", err.msg);
    kvd_shape s = fz_shape(KVARC_FMT_Q3, KVARC_POS_REMAPPED);
    if (kvd_conv_create(e, "fz", "a", &s, NULL, &ci, &err) || fz_append(e, &ci, 0, 80, &err))
        fz_die("fz/a", err.msg);
    s = fz_shape(KVARC_FMT_F16, KVARC_POS_TRUE);
    if (kvd_conv_create(e, "fz", "b", &s, NULL, &ci, &err) || fz_append(e, &ci, 0, 64, &err) ||
        fz_append(e, &ci, 64, 6, &err))
        fz_die("fz/b", err.msg);
    s = fz_shape(KVARC_FMT_Q4, KVARC_POS_REMAPPED);
    if (kvd_conv_create(e, "fz", "c", &s, NULL, &ci, &err))
        fz_die("fz/c", err.msg);
    return e;
}

static inline uint32_t fz_get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void fz_put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* Make every segment block in b[n] (walked from 0, block after block)
 * carry right checksums: its header CRC, a metadata payload's CRC and,
 * with sections, a data block's section and record CRCs (where its
 * geometry fits in b). Stops at the first header that still does not
 * decode or whose payload runs past n. */
static inline void fz_fix_blocks(uint8_t *b, size_t n, int sections)
{
    size_t off = 0;
    while (off + KVARC_BLOCK_HEADER <= n) {
        uint8_t *p = b + off;
        fz_put32(p, KVARC_BLOCK_MAGIC);
        uint32_t pb = fz_get32(p + 40);
        if (pb > n - off - KVARC_BLOCK_HEADER)
            pb = 0;
        if (p[4] != KVARC_BLOCK_DATA && pb)
            fz_put32(p + 44, kvarc_crc32c(0, p + KVARC_BLOCK_HEADER, pb));
        fz_put32(p + 60, kvarc_crc32c(0, p, 60));
        kvarc_block_header h;
        if (kvarc_block_header_decode(p, &h) || h.payload_bytes > n - off - KVARC_BLOCK_HEADER)
            return;
        if (sections && h.kind == KVARC_BLOCK_DATA) {
            size_t sec = kvarc_block_sig_section(h.count, h.head_dim);
            size_t ssec = kvarc_block_sum_section(h.n_sum, h.head_dim);
            for (int hd = 0; hd < h.n_heads; hd++) {
                uint8_t *s = p + kvarc_block_sig_offset(&h, hd);
                fz_put32(s + sec - 4, kvarc_sig_section_crc(h.conv, h.layer, h.first_pos, (uint32_t)hd, s, sec - 4));
                if (ssec) {
                    uint8_t *q = p + kvarc_block_sum_offset(&h, hd);
                    fz_put32(q + ssec - 4, kvarc_sum_section_crc(h.conv, h.layer, h.first_pos, (uint32_t)hd, q,
                                                                 ssec - 4));
                }
                for (uint32_t t = 0; t < h.count; t++) {
                    uint8_t *r = p + kvarc_block_slot_offset(&h, hd, t);
                    fz_put32(r + h.rec_bytes, kvarc_record_crc(h.conv, h.layer, (uint32_t)hd, h.first_pos + t, r,
                                                               h.rec_bytes));
                }
            }
        }
        off += KVARC_BLOCK_HEADER + h.payload_bytes;
    }
}

#endif
