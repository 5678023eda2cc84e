/* transfer.c - export and import of one conversation (schema/SCHEMA.md
 * section 10; the fixed parts: xfile.c).
 *
 * Design notes
 * Export is a cursor: each kvd_export_next makes the next piece of the
 * file in one buffer (the preamble with the conversation section, then
 * one layer section, then the end section), so memory stays one section
 * (at most max_section bytes of data) whatever the conversation's size.
 * A layer section is [p, end): at most what fits, cut at 64-position
 * boundaries and where summaries start or stop being present (so that it
 * is one append with all of its blocks' summaries or none). Everything is
 * read as a client's reads return it (verified, through forks), each
 * head's signatures, records and summaries.
 * Import is a push parser: kvd_import_feed takes the file's bytes in any
 * pieces, keeps at most one incomplete section (<= KVX_MAX_PAYLOAD +
 * header), checks each complete one and stores a layer section as one
 * durable append into a stage (kvd_conv_create_stage). kvd_import_finish
 * checks the end section came and publishes the stage under the real name
 * as a fork of it (no bytes copied), then deletes the stage; kvd_import_free
 * of an unpublished import deletes the stage. The state: the next
 * expected section index and kind, the layer and position the next layer
 * section must start at, the byte offset in the file (for messages). */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvd_internal.h"
#include "transfer.h"
#include "xfile.h"

/* ---- export ------------------------------------------------------------------ */

struct kvd_export {
    kvd_engine    *e;
    kvd_reader    *r;
    kvd_conv_info  info;
    size_t         max_section;
    uint32_t       d, H, rb;
    uint32_t       layer;
    uint64_t       pos, sections, done_tokens;
    int            stage;        /* 0 preamble + conversation, 1 layers, 2 end, 3 done */
    uint8_t       *buf;
    size_t         cap;
    uint64_t      *positions;    /* [max tokens of a section] */
    uint8_t       *ok;           /* [blocks of a section] */
    uint8_t       *probe_bits;   /* [blocks of a section][2][d/8]: head 0's summaries, for presence */
    uint16_t      *probe_sc;
};

static int grow(uint8_t **buf, size_t *cap, size_t need, kvd_err *err)
{
    if (need <= *cap)
        return 0;
    uint8_t *b = realloc(*buf, need);
    if (!b)
        return kvd_fail(err, -ENOMEM, "out of memory for a %zu-byte section", need);
    *buf = b;
    *cap = need;
    return 0;
}

static size_t sum_bytes(uint32_t H, uint32_t d)     /* one 64-position block's summaries, every head */
{
    return (size_t)H * KVARC_SUM_ITEMS * (d / 8 + 2);
}

/* Tokens a layer section may hold at most: whole 64-position blocks when one fits. */
static uint64_t section_tokens(const kvd_export *x)
{
    size_t per = (size_t)x->H * (x->d / 8 + 2 + x->rb), room = x->max_section - KVX_LAYER_FIXED;
    size_t per64 = 64 * per + sum_bytes(x->H, x->d);
    if (per64 <= room)
        return (uint64_t)(room / per64) * 64;
    size_t n = room > sum_bytes(x->H, x->d) ? (room - sum_bytes(x->H, x->d)) / per : 0;
    return n ? n : 1;
}

int kvd_export_open(kvd_engine *e, kvd_reader *r, uint64_t conv, size_t max_section, kvd_export **out,
                    kvd_err *err)
{
    kvd_export *x = calloc(1, sizeof *x);
    if (!x)
        return kvd_fail(err, -ENOMEM, "out of memory");
    int rc = kvd_conv_stat(e, conv, &x->info, err);
    if (rc) {
        free(x);
        return rc;
    }
    x->e = e;
    x->r = r;
    x->d = x->info.shape.head_dim;
    x->H = x->info.shape.n_kv_heads;
    x->rb = (uint32_t)kvarc_record_bytes(x->info.shape.format, (int)x->d);
    x->max_section = max_section < 4096 ? 4096 : max_section > KVX_MAX_PAYLOAD ? KVX_MAX_PAYLOAD : max_section;
    uint64_t n = section_tokens(x);
    size_t nb = n / 64 + 2;
    if (!(x->positions = malloc(n * sizeof *x->positions)) || !(x->ok = malloc(nb)) ||
        !(x->probe_bits = malloc(nb * KVARC_SUM_ITEMS * (x->d / 8))) ||
        !(x->probe_sc = malloc(nb * KVARC_SUM_ITEMS * 2))) {
        kvd_export_close(x);
        return kvd_fail(err, -ENOMEM, "out of memory");
    }
    *out = x;
    return 0;
}

void kvd_export_close(kvd_export *x)
{
    if (!x)
        return;
    free(x->buf);
    free(x->positions);
    free(x->ok);
    free(x->probe_bits);
    free(x->probe_sc);
    free(x);
}

void kvd_export_progress(const kvd_export *x, uint64_t *done, uint64_t *total)
{
    *done = x->done_tokens;
    *total = x->info.length * x->info.shape.n_layers;
}

/* Header for a payload of n bytes written at x->buf + at + KVX_HEADER. */
static void seal(kvd_export *x, size_t at, uint32_t kind, size_t n)
{
    kvx_header h = { kind, x->sections++, n, kvarc_crc32c(0, x->buf + at + KVX_HEADER, n) };
    kvx_header_encode(&h, x->buf + at);
}

static int export_conv(kvd_export *x, size_t *len, kvd_err *err)
{
    const kvd_shape *s = &x->info.shape;
    size_t per = 2 * (size_t)x->d, nm = (size_t)s->n_layers * x->H * per;
    size_t n = KVX_CONV_FIXED + nm * 4;
    int rc = grow(&x->buf, &x->cap, KVX_PREAMBLE + KVX_HEADER + n, err);
    if (rc)
        return rc;
    kvx_preamble_encode(x->buf);
    uint8_t *p = x->buf + KVX_PREAMBLE + KVX_HEADER;
    kvx_conv c = { .shape = *s, .format_version = kvarc_format_get(s->format)->version,
                   .flags = x->info.flags & KVD_CONV_SNAPSHOT, .length = x->info.length,
                   .created_ns = x->info.created_ns };
    snprintf(c.src_ns, sizeof c.src_ns, "%s", x->info.ns);
    snprintf(c.src_name, sizeof c.src_name, "%s", x->info.name);
    kvx_conv_encode(&c, p);
    for (uint32_t l = 0; l < s->n_layers; l++)
        for (uint32_t h = 0; h < x->H; h++) {
            float mu[2 * KVARC_HEAD_DIM_MAX];
            if ((rc = kvd_conv_means(x->e, x->info.id, l, h, mu, mu + x->d, err)))
                return rc;
            memcpy(p + KVX_CONV_FIXED + (((size_t)l * x->H + h) * per) * 4, mu, per * 4);
        }
    seal(x, KVX_PREAMBLE, KVX_CONV, n);
    *len = KVX_PREAMBLE + KVX_HEADER + n;
    return 0;
}

/* The next layer section, [x->pos, end) of x->layer. */
static int export_layer(kvd_export *x, size_t *len, kvd_err *err)
{
    uint64_t p = x->pos, L = x->info.length, end = p + section_tokens(x);
    if (end > L)
        end = L;
    uint64_t b0 = p / 64, nb = end / 64 - b0;
    int rc = 0, sums = 0;
    if (nb) {   /* where summaries start or stop being present, the section ends */
        if ((rc = kvd_read_sums(x->r, x->info.id, x->layer, 0, b0, nb, x->probe_bits, x->probe_sc, x->ok, err)))
            return rc;
        uint64_t j = 1;
        while (j < nb && x->ok[j] == x->ok[0])
            j++;
        if (j < nb) {
            end = 64 * (b0 + j);
            nb = j;
        }
        sums = x->ok[0];
    }
    uint32_t n = (uint32_t)(end - p), ns = sums ? (uint32_t)nb : 0, H = x->H, sb = x->d / 8;
    size_t bits = (size_t)H * n * sb, scales = (size_t)H * n * 2, recs = (size_t)H * n * x->rb;
    size_t sbits = (size_t)H * ns * KVARC_SUM_ITEMS * sb, sscales = (size_t)H * ns * KVARC_SUM_ITEMS * 2;
    size_t payload = KVX_LAYER_FIXED + bits + scales + recs + sbits + sscales;
    if ((rc = grow(&x->buf, &x->cap, KVX_HEADER + payload, err)))
        return rc;
    uint8_t *q = x->buf + KVX_HEADER;
    kvx_put32(q, x->layer);
    kvx_put32(q + 4, n);
    kvx_put64(q + 8, p);
    kvx_put32(q + 16, ns);
    kvx_put32(q + 20, x->rb);
    uint8_t *b = q + KVX_LAYER_FIXED, *sc = b + bits, *rec = sc + scales, *smb = rec + recs, *sms = smb + sbits;
    for (uint32_t t = 0; t < n; t++)
        x->positions[t] = p + t;
    /* fp16 scales go through an aligned copy: the payload's offsets need not be even */
    uint16_t *tmp = malloc(((size_t)n > (size_t)ns * KVARC_SUM_ITEMS ? n : (size_t)ns * KVARC_SUM_ITEMS) * 2 + 2);
    if (!tmp)
        return kvd_fail(err, -ENOMEM, "out of memory");
    for (uint32_t h = 0; h < H && !rc; h++) {
        rc = kvd_read_sigs(x->r, x->info.id, x->layer, h, p, n, b + (size_t)h * n * sb, tmp, err);
        if (!rc) {
            memcpy(sc + (size_t)h * n * 2, tmp, (size_t)n * 2);
            rc = kvd_read_records(x->r, x->info.id, x->layer, h, x->positions, n, rec + (size_t)h * n * x->rb, err);
        }
        if (!rc && ns) {
            rc = kvd_read_sums(x->r, x->info.id, x->layer, h, b0, ns, smb + (size_t)h * ns * KVARC_SUM_ITEMS * sb,
                               tmp, x->ok, err);
            memcpy(sms + (size_t)h * ns * KVARC_SUM_ITEMS * 2, tmp, (size_t)ns * KVARC_SUM_ITEMS * 2);
            for (uint32_t j = 0; !rc && j < ns; j++)
                if (!x->ok[j])   /* presence is per append, the same for every head */
                    rc = kvd_fail(err, KVARC_ECORRUPT, "layer %u head %u: block %llu has no summary while head 0's "
                                  "has", x->layer, h, (unsigned long long)(b0 + j));
        }
    }
    free(tmp);
    if (rc)
        return rc;
    assert(n > 0 && end <= L && (!ns || ns == kvarc_block_n_sum(p, n)));
    seal(x, 0, KVX_LAYER, payload);
    *len = KVX_HEADER + payload;
    x->done_tokens += n;
    x->pos = end;
    if (x->pos >= L) {
        x->layer++;
        x->pos = 0;
    }
    return 0;
}

int kvd_export_next(kvd_export *x, const uint8_t **buf, size_t *len, kvd_err *err)
{
    int rc = 0;
    *len = 0;
    *buf = NULL;
    if (x->stage == 0) {
        rc = export_conv(x, len, err);
        x->stage = x->info.length && x->info.shape.n_layers ? 1 : 2;
    } else if (x->stage == 1) {
        rc = export_layer(x, len, err);
        if (!rc && x->layer >= x->info.shape.n_layers)
            x->stage = 2;
    } else if (x->stage == 2) {
        if (!(rc = grow(&x->buf, &x->cap, KVX_HEADER + 16, err))) {
            kvx_put64(x->buf + KVX_HEADER, x->sections);
            kvx_put64(x->buf + KVX_HEADER + 8, x->done_tokens);
            seal(x, 0, KVX_END, 16);
            *len = KVX_HEADER + 16;
            x->stage = 3;
        }
    }
    if (!rc && *len)
        *buf = x->buf;
    return rc;
}

/* ---- import ------------------------------------------------------------------ */

struct kvd_import {
    kvd_engine    *e;
    char           ns[KVD_NS_MAX], name[KVD_NAME_MAX];
    kvd_conv_info  stage;       /* stage.id 0: not created yet */
    int            published, ended, have_preamble;
    kvx_conv       c;
    uint32_t       rb, layer;
    uint64_t       pos, next_index, tokens;
    uint64_t       offset;      /* file offset of buf[0] */
    uint8_t       *buf;
    size_t         len, cap;
};

int kvd_import_begin(kvd_engine *e, const char *ns, const char *name, kvd_import **out, kvd_err *err)
{
    kvd_conv_info info;
    if (!kvd_name_valid(ns, KVD_NS_MAX) || !kvd_name_valid(name, KVD_NAME_MAX))
        return kvd_fail(err, -EINVAL, "'%s/%s' is not NAMESPACE/NAME (1-63 and 1-127 characters of "
                        "[A-Za-z0-9._-], not starting with '.')", ns ? ns : "", name ? name : "");
    if (!kvd_conv_open(e, ns, name, NULL, &info, NULL))
        return kvd_fail(err, -EEXIST, "conversation '%s/%s' already exists: import to another name, or "
                        "delete it first", ns, name);
    kvd_import *im = calloc(1, sizeof *im);
    if (!im)
        return kvd_fail(err, -ENOMEM, "out of memory");
    im->e = e;
    snprintf(im->ns, sizeof im->ns, "%s", ns);
    snprintf(im->name, sizeof im->name, "%s", name);
    *out = im;
    return 0;
}

void kvd_import_free(kvd_import *im)
{
    if (!im)
        return;
    if (im->stage.id && !im->published)
        kvd_conv_delete(im->e, im->stage.ns, im->stage.name, NULL);
    free(im->buf);
    free(im);
}

/* "section 3 (layer data, layer 1, positions [4096, +4096)) at byte 812345" into w. */
static void where(const kvd_import *im, const kvx_header *h, const uint8_t *payload, char *w, size_t len)
{
    static const char *const kinds[] = { "?", "conversation", "layer data", "end" };
    const char *k = h && h->kind >= 1 && h->kind <= 3 ? kinds[h->kind] : "unknown kind";
    if (h && h->kind == KVX_LAYER && payload && h->payload_bytes >= KVX_LAYER_FIXED)
        snprintf(w, len, "section %llu (layer data, layer %u, positions [%llu, +%u)) at byte %llu",
                 (unsigned long long)im->next_index, kvx_get32(payload), (unsigned long long)kvx_get64(payload + 8),
                 kvx_get32(payload + 4), (unsigned long long)im->offset);
    else
        snprintf(w, len, "section %llu (%s) at byte %llu", (unsigned long long)im->next_index, h ? k : "header",
                 (unsigned long long)im->offset);
}

static int import_conv(kvd_import *im, const uint8_t *p, size_t n, const char *w, kvd_err *err)
{
    if (n < KVX_CONV_FIXED)
        return kvd_fail(err, -EINVAL, "%s: %zu bytes, fewer than the %d of its fields", w, n, KVX_CONV_FIXED);
    kvx_conv_decode(p, &im->c);
    const kvd_shape *s = &im->c.shape;
    const kvarc_format_info *fi = kvarc_format_get(s->format);
    if (!fi)
        return kvd_fail(err, KVARC_EFORMAT, "%s: record format %u is not one this kvarcd knows", w, s->format);
    if (fi->version != im->c.format_version)
        return kvd_fail(err, KVARC_EVERSION, "%s: record format %s version %u; this kvarcd writes version %u",
                        w, fi->name, im->c.format_version, fi->version);
    if (kvarc_head_dim_check((int)s->head_dim) || !s->n_layers || s->n_layers > KVD_MAX_LAYERS ||
        !s->n_kv_heads || s->n_kv_heads > 4096)
        return kvd_fail(err, -EINVAL, "%s: shape out of range (%u layers, %u KV heads, head_dim %u)", w,
                        s->n_layers, s->n_kv_heads, s->head_dim);
    size_t nm = (size_t)s->n_layers * s->n_kv_heads * 2 * s->head_dim;
    if (n != KVX_CONV_FIXED + nm * 4)
        return kvd_fail(err, -EINVAL, "%s: %zu bytes; its shape needs %zu (%zu means)", w, n,
                        KVX_CONV_FIXED + nm * 4, nm);
    float *means = malloc(nm * 4 + 4);
    if (!means)
        return kvd_fail(err, -ENOMEM, "out of memory");
    memcpy(means, p + KVX_CONV_FIXED, nm * 4);
    int rc = kvd_conv_create_stage(im->e, im->ns, s, means, &im->stage, err);
    free(means);
    if (rc) {
        char m[sizeof err->msg];
        snprintf(m, sizeof m, "%s", err->msg);
        return kvd_fail(err, rc, "%s: %s", w, m);
    }
    im->rb = (uint32_t)kvarc_record_bytes(s->format, (int)s->head_dim);
    return 0;
}

static int import_layer(kvd_import *im, const uint8_t *p, size_t n, const char *w, kvd_err *err)
{
    const kvd_shape *s = &im->c.shape;
    if (n < KVX_LAYER_FIXED)
        return kvd_fail(err, -EINVAL, "%s: %zu bytes, fewer than the %d of its fields", w, n, KVX_LAYER_FIXED);
    uint32_t layer = kvx_get32(p), count = kvx_get32(p + 4), ns = kvx_get32(p + 16), rb = kvx_get32(p + 20);
    uint64_t first = kvx_get64(p + 8);
    if (im->layer >= s->n_layers || layer != im->layer || first != im->pos)
        return kvd_fail(err, -EINVAL, "%s: out of order: layer %u position %llu comes next (the conversation "
                        "has %u layers of %llu tokens)", w, im->layer, (unsigned long long)im->pos, s->n_layers,
                        (unsigned long long)im->c.length);
    if (!count || first + count > im->c.length || rb != im->rb ||
        (ns && ns != kvarc_block_n_sum(first, count)))
        return kvd_fail(err, -EINVAL, "%s: %u tokens with %u-byte records and %u summaries; the layer has %llu "
                        "tokens, records of %u bytes, and a section's summaries are none or %u", w, count, rb, ns,
                        (unsigned long long)im->c.length, im->rb, kvarc_block_n_sum(first, count));
    size_t H = s->n_kv_heads, sb = s->head_dim / 8;
    size_t bits = H * count * sb, scales = H * count * 2, recs = H * count * rb;
    size_t sbits = H * ns * KVARC_SUM_ITEMS * sb, sscales = H * ns * KVARC_SUM_ITEMS * 2;
    if (n != KVX_LAYER_FIXED + bits + scales + recs + sbits + sscales)
        return kvd_fail(err, -EINVAL, "%s: %zu bytes; %u tokens of this shape need %zu", w, n, count,
                        KVX_LAYER_FIXED + bits + scales + recs + sbits + sscales);
    const uint8_t *b = p + KVX_LAYER_FIXED;
    uint16_t *sc = malloc(scales + 2), *ss = malloc(sscales + 2);
    if (!sc || !ss) {
        free(sc);
        free(ss);
        return kvd_fail(err, -ENOMEM, "out of memory");
    }
    memcpy(sc, b + bits, scales);
    memcpy(ss, b + bits + scales + recs + sbits, sscales);
    kvd_block_in blk = { layer, first, count, b, sc, b + bits + scales, ns ? b + bits + scales + recs : NULL,
                         ns ? ss : NULL };
    int brc = 0;
    int rc = kvd_append_n(im->e, im->stage.id, &blk, 1, &brc, NULL, err);
    free(sc);
    free(ss);
    if (rc) {
        char m[sizeof err->msg];
        snprintf(m, sizeof m, "%s", err->msg);
        return kvd_fail(err, rc, "%s: %s", w, m);
    }
    im->tokens += count;
    im->pos += count;
    if (im->pos >= im->c.length) {
        im->layer++;
        im->pos = 0;
    }
    return 0;
}

static int import_end(kvd_import *im, const uint8_t *p, size_t n, const char *w, kvd_err *err)
{
    uint64_t want = im->c.length * im->c.shape.n_layers;
    if (n != 16)
        return kvd_fail(err, -EINVAL, "%s: %zu bytes, not 16", w, n);
    if (kvx_get64(p) != im->next_index || kvx_get64(p + 8) != im->tokens || im->tokens != want)
        return kvd_fail(err, -EINVAL, "%s: the end says %llu sections and %llu tokens; the file had %llu and "
                        "%llu, and the conversation needs %llu (%u layers of %llu)", w,
                        (unsigned long long)kvx_get64(p), (unsigned long long)kvx_get64(p + 8),
                        (unsigned long long)im->next_index, (unsigned long long)im->tokens,
                        (unsigned long long)want, im->c.shape.n_layers, (unsigned long long)im->c.length);
    im->ended = 1;
    return 0;
}

/* Take every complete piece at the front of im->buf; 0 when it needs more bytes. */
static int import_take(kvd_import *im, kvd_err *err)
{
    size_t at = 0;
    int rc = 0;
    char w[200];
    for (;;) {
        const uint8_t *q = im->buf + at;
        size_t have = im->len - at;
        if (!im->have_preamble) {
            if (have < KVX_PREAMBLE)
                break;
            uint32_t v;
            rc = kvx_preamble_decode(q, &v);
            if (rc == KVARC_EVERSION) {
                rc = kvd_fail(err, rc, "export file version %u; this kvarcd reads version %d and older: import it "
                              "with a newer kvarcd", v, KVX_VERSION);
                break;
            }
            if (rc) {
                rc = kvd_fail(err, -EINVAL, "not a kvarc export file: its first 16 bytes are not the preamble "
                              "(schema/SCHEMA.md section 10)");
                break;
            }
            im->have_preamble = 1;
            at += KVX_PREAMBLE;
            im->offset += KVX_PREAMBLE;
            continue;
        }
        if (have < KVX_HEADER)
            break;
        kvx_header h;
        if (kvx_header_decode(q, &h)) {
            where(im, NULL, NULL, w, sizeof w);
            rc = kvd_fail(err, KVARC_ECORRUPT, "%s: its header is damaged (magic or checksum)", w);
            break;
        }
        if (h.payload_bytes > KVX_MAX_PAYLOAD) {
            where(im, &h, NULL, w, sizeof w);
            rc = kvd_fail(err, -EINVAL, "%s: %llu payload bytes, over the format's %u", w,
                          (unsigned long long)h.payload_bytes, KVX_MAX_PAYLOAD);
            break;
        }
        if (have < KVX_HEADER + h.payload_bytes)
            break;
        const uint8_t *p = q + KVX_HEADER;
        size_t n = (size_t)h.payload_bytes;
        where(im, &h, p, w, sizeof w);
        int want_kind = im->next_index == 0 ? KVX_CONV : 0;
        if (im->ended)
            rc = kvd_fail(err, -EINVAL, "%s: bytes after the end section", w);
        else if (h.index != im->next_index)
            rc = kvd_fail(err, -EINVAL, "%s: numbered %llu (a section missing, repeated or moved)", w,
                          (unsigned long long)h.index);
        else if (kvarc_crc32c(0, p, n) != h.payload_crc)
            rc = kvd_fail(err, KVARC_ECORRUPT, "%s: its payload does not match its checksum", w);
        else if ((want_kind && (int)h.kind != want_kind) || (!want_kind && h.kind != KVX_LAYER && h.kind != KVX_END))
            rc = kvd_fail(err, -EINVAL, "%s: a section of kind %u here; the file starts with the conversation "
                          "section, then layer data, then the end", w, h.kind);
        else if (h.kind == KVX_CONV)
            rc = import_conv(im, p, n, w, err);
        else if (h.kind == KVX_LAYER)
            rc = import_layer(im, p, n, w, err);
        else
            rc = import_end(im, p, n, w, err);
        if (rc)
            break;
        im->next_index++;
        at += KVX_HEADER + n;
        im->offset += KVX_HEADER + n;
    }
    if (at) {
        memmove(im->buf, im->buf + at, im->len - at);
        im->len -= at;
    }
    return rc;
}

int kvd_import_feed(kvd_import *im, const uint8_t *bytes, size_t len, kvd_err *err)
{
    if (im->ended && len)
        return kvd_fail(err, -EINVAL, "byte %llu: bytes after the end section", (unsigned long long)im->offset);
    if (!len)
        return 0;
    int rc = grow(&im->buf, &im->cap, im->len + len, err);
    if (rc)
        return rc;
    memcpy(im->buf + im->len, bytes, len);
    im->len += len;
    rc = import_take(im, err);
    /* bounded: at most one incomplete section (and its header) stays */
    assert(rc || im->len < KVX_PREAMBLE + KVX_HEADER + KVX_MAX_PAYLOAD);
    return rc;
}

uint64_t kvd_import_tokens(const kvd_import *im)
{
    return im->tokens;
}

int kvd_import_finish(kvd_import *im, kvd_conv_info *info, kvd_err *err)
{
    if (!im->ended) {
        if (!im->have_preamble)
            return kvd_fail(err, -EINVAL, "the file ends at byte %llu, inside its 16-byte preamble (truncated, "
                            "or not a kvarc export file)", (unsigned long long)(im->offset + im->len));
        return kvd_fail(err, -EINVAL, "truncated: the file ends at byte %llu, %s section %llu and before its end "
                        "section", (unsigned long long)(im->offset + im->len), im->len ? "inside" : "before",
                        (unsigned long long)im->next_index);
    }
    if (im->len)
        return kvd_fail(err, -EINVAL, "byte %llu: %zu bytes after the end section", (unsigned long long)im->offset,
                        im->len);
    int rc = kvd_conv_fork(im->e, im->stage.ns, im->stage.name, UINT64_MAX, im->ns, im->name,
                           im->c.flags & KVD_CONV_SNAPSHOT, info, err);
    if (rc)
        return rc;
    im->published = 1;
    kvd_conv_delete(im->e, im->stage.ns, im->stage.name, NULL);
    return 0;
}
