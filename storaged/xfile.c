/* xfile.c - encode and check the export format's fixed parts (xfile.h). */
#include <errno.h>
#include <string.h>

#include "kvarc_schema.h"
#include "xfile.h"

static const uint8_t magic[8] = { 0x89, 'K', 'V', 'X', '\r', '\n', 0x1a, '\n' };

void kvx_put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

void kvx_put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

uint32_t kvx_get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

uint64_t kvx_get64(const uint8_t *p)
{
    return (uint64_t)kvx_get32(p) | (uint64_t)kvx_get32(p + 4) << 32;
}

void kvx_preamble_encode(uint8_t out[KVX_PREAMBLE])
{
    memcpy(out, magic, 8);
    kvx_put32(out + 8, KVX_VERSION);
    kvx_put32(out + 12, kvarc_crc32c(0, out, 12));
}

int kvx_preamble_decode(const uint8_t in[KVX_PREAMBLE], uint32_t *version)
{
    *version = 0;
    if (memcmp(in, magic, 8) || kvx_get32(in + 12) != kvarc_crc32c(0, in, 12))
        return -EINVAL;
    *version = kvx_get32(in + 8);
    return *version > KVX_VERSION || *version == 0 ? KVARC_EVERSION : 0;
}

void kvx_header_encode(const kvx_header *h, uint8_t out[KVX_HEADER])
{
    kvx_put32(out, KVX_SECTION_MAGIC);
    kvx_put32(out + 4, h->kind);
    kvx_put64(out + 8, h->index);
    kvx_put64(out + 16, h->payload_bytes);
    kvx_put32(out + 24, h->payload_crc);
    kvx_put32(out + 28, kvarc_crc32c(0, out, 28));
}

int kvx_header_decode(const uint8_t in[KVX_HEADER], kvx_header *h)
{
    if (kvx_get32(in) != KVX_SECTION_MAGIC || kvx_get32(in + 28) != kvarc_crc32c(0, in, 28))
        return -EINVAL;
    h->kind = kvx_get32(in + 4);
    h->index = kvx_get64(in + 8);
    h->payload_bytes = kvx_get64(in + 16);
    h->payload_crc = kvx_get32(in + 24);
    return 0;
}

void kvx_conv_encode(const kvx_conv *c, uint8_t out[KVX_CONV_FIXED])
{
    memset(out, 0, KVX_CONV_FIXED);
    const kvd_shape *s = &c->shape;
    kvx_put32(out, s->n_layers);
    kvx_put32(out + 4, s->n_kv_heads);
    kvx_put32(out + 8, s->n_q_heads);
    kvx_put32(out + 12, s->head_dim);
    out[16] = s->format;
    out[17] = c->format_version;
    out[18] = s->pos_mode;
    out[19] = s->rope_layout;
    out[20] = s->dtype;
    kvx_put32(out + 24, s->rotary_dims);
    uint32_t th;
    memcpy(&th, &s->rope_theta, 4);
    kvx_put32(out + 28, th);
    kvx_put64(out + 32, s->seed);
    memcpy(out + 40, s->fingerprint, strnlen(s->fingerprint, 63));
    kvx_put32(out + 104, c->flags);
    kvx_put64(out + 112, c->length);
    kvx_put64(out + 120, (uint64_t)c->created_ns);
    memcpy(out + 128, c->src_ns, strnlen(c->src_ns, KVD_NS_MAX - 1));
    memcpy(out + 192, c->src_name, strnlen(c->src_name, KVD_NAME_MAX - 1));
}

void kvx_conv_decode(const uint8_t in[KVX_CONV_FIXED], kvx_conv *c)
{
    memset(c, 0, sizeof *c);
    kvd_shape *s = &c->shape;
    s->n_layers = kvx_get32(in);
    s->n_kv_heads = kvx_get32(in + 4);
    s->n_q_heads = kvx_get32(in + 8);
    s->head_dim = kvx_get32(in + 12);
    s->format = in[16];
    c->format_version = in[17];
    s->pos_mode = in[18];
    s->rope_layout = in[19];
    s->dtype = in[20];
    s->rotary_dims = kvx_get32(in + 24);
    uint32_t th = kvx_get32(in + 28);
    memcpy(&s->rope_theta, &th, 4);
    s->seed = kvx_get64(in + 32);
    memcpy(s->fingerprint, in + 40, 63);
    c->flags = kvx_get32(in + 104);
    c->length = kvx_get64(in + 112);
    c->created_ns = (int64_t)kvx_get64(in + 120);
    memcpy(c->src_ns, in + 128, KVD_NS_MAX - 1);
    memcpy(c->src_name, in + 192, KVD_NAME_MAX - 1);
}
