/* block.c - CRC-32C and the segment block layout (SCHEMA.md section 9). */
#include "kvarc_schema.h"

#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

static uint32_t crc_table[8][256];
static int crc_hw_ok;   /* set once at load, before any thread exists */

__attribute__((constructor)) static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc_hw_ok = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t crc_sw(uint32_t c, const uint8_t *p, size_t n)
{
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c;
        c = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^
            crc_table[5][(w >> 16) & 0xff] ^ crc_table[4][(w >> 24) & 0xff] ^
            crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
            crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xff];
    return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t c, const uint8_t *p, size_t n)
{
    uint64_t c64 = c;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = _mm_crc32_u64(c64, w);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--)
        c = _mm_crc32_u8(c, *p++);
    return c;
}
#endif

uint32_t kvarc_crc32c(uint32_t crc, const void *buf, size_t len)
{
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (crc_hw_ok)
        return ~crc_hw(c, buf, len);
#endif
    return ~crc_sw(c, buf, len);
}

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

void kvarc_block_header_encode(kvarc_block_header *h, uint8_t out[KVARC_BLOCK_HEADER])
{
    memset(out, 0, KVARC_BLOCK_HEADER);
    put32(out + 0, KVARC_BLOCK_MAGIC);
    out[4] = h->kind;
    out[5] = h->version;
    out[6] = h->format;
    out[7] = h->format_version;
    put16(out + 8, h->head_dim);
    put16(out + 10, h->n_heads);
    put32(out + 12, h->layer);
    put64(out + 16, h->conv);
    put64(out + 24, h->first_pos);
    put32(out + 32, h->count);
    put32(out + 36, h->rec_bytes);
    put32(out + 40, h->payload_bytes);
    put32(out + 44, h->payload_crc);
    put64(out + 48, h->seq);
    put32(out + 56, h->n_sum);
    h->header_crc = kvarc_crc32c(0, out, 60);
    put32(out + 60, h->header_crc);
}

int kvarc_block_header_decode(const uint8_t in[KVARC_BLOCK_HEADER], kvarc_block_header *h)
{
    if (get32(in) != KVARC_BLOCK_MAGIC || get32(in + 60) != kvarc_crc32c(0, in, 60))
        return KVARC_ECORRUPT;
    if (in[5] < 1 || in[5] > KVARC_BLOCK_VERSION)
        return in[5] > KVARC_BLOCK_VERSION ? KVARC_EVERSION : KVARC_ECORRUPT;
    h->kind = in[4];
    h->version = in[5];
    h->format = in[6];
    h->format_version = in[7];
    h->head_dim = get16(in + 8);
    h->n_heads = get16(in + 10);
    h->layer = get32(in + 12);
    h->conv = get64(in + 16);
    h->first_pos = get64(in + 24);
    h->count = get32(in + 32);
    h->rec_bytes = get32(in + 36);
    h->payload_bytes = get32(in + 40);
    h->payload_crc = get32(in + 44);
    h->seq = get64(in + 48);
    h->n_sum = get32(in + 56);
    h->header_crc = get32(in + 60);
    if (h->kind < KVARC_BLOCK_DATA || h->kind > KVARC_BLOCK_CONV_DELETE || h->payload_bytes % 8)
        return KVARC_ECORRUPT;
    /* summaries: data blocks of version 2 only, for every block they complete */
    if (h->n_sum && (h->version < 2 || h->kind != KVARC_BLOCK_DATA || h->n_sum != kvarc_block_n_sum(h->first_pos, h->count)))
        return KVARC_ECORRUPT;
    if (h->kind == KVARC_BLOCK_DATA &&
        (kvarc_head_dim_check(h->head_dim) || h->n_heads == 0 || h->count == 0 ||
         kvarc_record_bytes(h->format, h->head_dim) != (int)h->rec_bytes ||
         kvarc_block_payload_bytes_sum(h->count, h->head_dim, h->n_heads, h->rec_bytes, h->n_sum) != h->payload_bytes))
        return KVARC_ECORRUPT;
    return 0;
}

size_t kvarc_block_sig_section(uint32_t count, int head_dim)
{
    size_t b = (size_t)count * (size_t)(head_dim / 8) + (size_t)count * 2;
    return (b + 3) / 4 * 4 + 4;
}

uint32_t kvarc_block_n_sum(uint64_t first_pos, uint32_t count)
{
    return (uint32_t)((first_pos + count) / KVARC_SUM_BLOCK - first_pos / KVARC_SUM_BLOCK);
}

size_t kvarc_block_sum_section(uint32_t n_sum, int head_dim)
{
    size_t b = (size_t)n_sum * KVARC_SUM_ITEMS * ((size_t)(head_dim / 8) + 2);
    return n_sum ? (b + 3) / 4 * 4 + 4 : 0;
}

size_t kvarc_block_payload_bytes_sum(uint32_t count, int head_dim, int n_heads, uint32_t rec_bytes, uint32_t n_sum)
{
    size_t p = (size_t)n_heads * (kvarc_block_sig_section(count, head_dim) +
                                  (size_t)count * ((size_t)rec_bytes + 4) + kvarc_block_sum_section(n_sum, head_dim));
    return (p + 7) / 8 * 8;
}

size_t kvarc_block_payload_bytes(uint32_t count, int head_dim, int n_heads, uint32_t rec_bytes)
{
    return kvarc_block_payload_bytes_sum(count, head_dim, n_heads, rec_bytes, 0);
}

size_t kvarc_block_sum_offset(const kvarc_block_header *h, int head)
{
    return kvarc_block_slot_offset(h, h->n_heads, 0) + (size_t)head * kvarc_block_sum_section(h->n_sum, h->head_dim);
}

size_t kvarc_block_sig_offset(const kvarc_block_header *h, int head)
{
    return KVARC_BLOCK_HEADER + (size_t)head * kvarc_block_sig_section(h->count, h->head_dim);
}

size_t kvarc_block_slot_offset(const kvarc_block_header *h, int head, uint32_t t)
{
    size_t slot = (size_t)h->rec_bytes + 4;
    return KVARC_BLOCK_HEADER + (size_t)h->n_heads * kvarc_block_sig_section(h->count, h->head_dim) +
           ((size_t)head * h->count + t) * slot;
}

static uint32_t key_crc(uint64_t conv, uint32_t layer, uint32_t head, uint64_t pos)
{
    uint8_t key[24];
    put64(key, conv);
    put32(key + 8, layer);
    put32(key + 12, head);
    put64(key + 16, pos);
    return kvarc_crc32c(0, key, sizeof key);
}

uint32_t kvarc_sig_section_crc(uint64_t conv, uint32_t layer, uint64_t first_pos, uint32_t head,
                               const uint8_t *section, size_t bytes)
{
    return kvarc_crc32c(key_crc(conv, layer, head | 0x80000000u, first_pos), section, bytes);
}

uint32_t kvarc_sum_section_crc(uint64_t conv, uint32_t layer, uint64_t first_pos, uint32_t head,
                               const uint8_t *section, size_t bytes)
{
    return kvarc_crc32c(key_crc(conv, layer, head | 0x40000000u, first_pos), section, bytes);
}

uint32_t kvarc_record_crc(uint64_t conv, uint32_t layer, uint32_t head, uint64_t pos,
                          const uint8_t *rec, uint32_t rec_bytes)
{
    return kvarc_crc32c(key_crc(conv, layer, head, pos), rec, rec_bytes);
}
