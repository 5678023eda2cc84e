/* test_block: CRC-32C matches the standard check value (hardware and
 * table paths agree on every length and alignment), block headers round-
 * trip and any flipped header bit is caught, geometry is consistent.
 * Version-2 data blocks with summaries (n_sum): which 64-position blocks
 * a block summarizes, the header round trip, what decode refuses (an
 * n_sum that is neither 0 nor kvarc_block_n_sum, n_sum on a version-1 or
 * a non-data block, version 3), and the summary sections' place after
 * the record slots. */
#include <string.h>

#include "testutil.h"

#define S_ITEMS KVARC_SUM_ITEMS

/* Re-seal a header whose bytes a test changed: the CRC of bytes 0..59. */
static void reseal(uint8_t hb[KVARC_BLOCK_HEADER])
{
    uint32_t crc = kvarc_crc32c(0, hb, 60);
    memcpy(hb + 60, &crc, 4);
}

static void n_sum_cases(void)
{
    static const struct { uint64_t first; uint32_t count, want; } c[] = {
        { 0, 64, 1 },    { 60, 10, 1 },  { 0, 63, 0 },   { 64, 128, 2 }, { 10, 200, 3 }, { 1, 63, 1 },
        { 1, 62, 0 },    { 63, 1, 1 },   { 64, 1, 0 },   { 64, 63, 0 },  { 127, 1, 1 },  { 0, 1, 0 },
        { 100, 28, 1 },  { 100, 27, 0 }, { 0, 4096, 64 }, { (1ull << 40) + 32, 64, 1 },
        { (1ull << 40) - 1, 1, 1 },
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        CHECK(kvarc_block_n_sum(c[i].first, c[i].count) == c[i].want, "kvarc_block_n_sum(%llu, %u) = %u, want %u",
              (unsigned long long)c[i].first, c[i].count, kvarc_block_n_sum(c[i].first, c[i].count), c[i].want);
    /* the definition: the 64-position blocks whose last position the block holds */
    int bad = 0;
    for (uint64_t f = 0; f < 200; f++)
        for (uint32_t n = 1; n < 200; n++) {
            uint32_t want = 0;
            for (uint64_t p = f; p < f + n; p++)
                want += p % 64 == 63;
            bad += kvarc_block_n_sum(f, n) != want;
        }
    CHECK(bad == 0, "kvarc_block_n_sum differs from a count of block ends in %d cases", bad);
}

static void sum_header_cases(void)
{
    /* positions [10, 210): summaries of blocks 0, 1, 2 */
    kvarc_block_header h = { .kind = KVARC_BLOCK_DATA, .version = KVARC_BLOCK_VERSION,
                             .format = KVARC_FMT_Q3, .format_version = 1, .head_dim = 128,
                             .n_heads = 8, .layer = 3, .conv = 0x5151ull, .first_pos = 10, .count = 200,
                             .rec_bytes = 104, .seq = 7, .n_sum = 3 };
    CHECK(KVARC_BLOCK_VERSION == 2, "block version %d", KVARC_BLOCK_VERSION);
    h.payload_bytes = (uint32_t)kvarc_block_payload_bytes_sum(200, 128, 8, 104, 3);
    uint8_t hb[KVARC_BLOCK_HEADER], x[KVARC_BLOCK_HEADER];
    kvarc_block_header_encode(&h, hb);
    uint32_t n_sum_le;
    memcpy(&n_sum_le, hb + 56, 4);
    CHECK(n_sum_le == 3 && hb[5] == 2, "n_sum at bytes 56..59 (%u), version at 5 (%u)", n_sum_le, hb[5]);
    kvarc_block_header back;
    CHECK_RC(kvarc_block_header_decode(hb, &back), 0);
    CHECK(back.n_sum == 3 && back.version == 2 && back.count == 200 && back.first_pos == 10 &&
          back.payload_bytes == h.payload_bytes && back.header_crc == h.header_crc, "round trip with n_sum");
    int missed = 0;
    for (int bit = 0; bit < KVARC_BLOCK_HEADER * 8; bit++) {
        memcpy(x, hb, sizeof x);
        x[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        missed += kvarc_block_header_decode(x, &back) == 0;
    }
    CHECK(missed == 0, "%d flipped bits of a header with n_sum went unnoticed", missed);

    /* n_sum 0 (archived without summaries) is always allowed */
    kvarc_block_header z = h;
    z.n_sum = 0;
    z.payload_bytes = (uint32_t)kvarc_block_payload_bytes(200, 128, 8, 104);
    kvarc_block_header_encode(&z, x);
    CHECK_RC(kvarc_block_header_decode(x, &back), 0);
    CHECK(back.n_sum == 0, "n_sum 0 round trip");

    /* neither 0 nor kvarc_block_n_sum: refused, even with a payload size to match */
    for (uint32_t wrong = 1; wrong <= 5; wrong++) {
        if (wrong == 3)
            continue;
        kvarc_block_header w = h;
        w.n_sum = wrong;
        w.payload_bytes = (uint32_t)kvarc_block_payload_bytes_sum(200, 128, 8, 104, wrong);
        kvarc_block_header_encode(&w, x);
        CHECK_RC(kvarc_block_header_decode(x, &back), KVARC_ECORRUPT);
    }
    /* the right n_sum with the payload size of none: refused */
    kvarc_block_header w = h;
    w.payload_bytes = z.payload_bytes;
    kvarc_block_header_encode(&w, x);
    CHECK_RC(kvarc_block_header_decode(x, &back), KVARC_ECORRUPT);
    /* a block that completes no 64-position block carries none */
    w = h;
    w.first_pos = 64;
    w.count = 63;
    w.n_sum = 1;
    w.payload_bytes = (uint32_t)kvarc_block_payload_bytes_sum(63, 128, 8, 104, 1);
    kvarc_block_header_encode(&w, x);
    CHECK_RC(kvarc_block_header_decode(x, &back), KVARC_ECORRUPT);

    /* version 1: readable without summaries, refused with them */
    memcpy(x, hb, sizeof x);
    x[5] = 1;
    reseal(x);
    CHECK_RC(kvarc_block_header_decode(x, &back), KVARC_ECORRUPT);
    kvarc_block_header_encode(&z, x);
    x[5] = 1;
    reseal(x);
    CHECK_RC(kvarc_block_header_decode(x, &back), 0);
    CHECK(back.version == 1 && back.n_sum == 0, "a version-1 data block decodes");
    /* versions 0 and 3 */
    memcpy(x, hb, sizeof x);
    x[5] = 3;
    reseal(x);
    CHECK_RC(kvarc_block_header_decode(x, &back), KVARC_EVERSION);
    kvarc_block_header_encode(&z, x);
    x[5] = 3;
    reseal(x);
    CHECK_RC(kvarc_block_header_decode(x, &back), KVARC_EVERSION);
    x[5] = 0;
    reseal(x);
    CHECK_RC(kvarc_block_header_decode(x, &back), KVARC_ECORRUPT);

    /* metadata blocks carry no summaries */
    kvarc_block_header m = { .kind = KVARC_BLOCK_CONV_CREATE, .version = KVARC_BLOCK_VERSION, .conv = 9,
                             .payload_bytes = 512, .payload_crc = 0x1234, .seq = 3 };
    kvarc_block_header_encode(&m, x);
    CHECK_RC(kvarc_block_header_decode(x, &back), 0);
    m.n_sum = 1;
    kvarc_block_header_encode(&m, x);
    CHECK_RC(kvarc_block_header_decode(x, &back), KVARC_ECORRUPT);
    m.kind = KVARC_BLOCK_CONV_DELETE;
    m.payload_bytes = 0;
    kvarc_block_header_encode(&m, x);
    CHECK_RC(kvarc_block_header_decode(x, &back), KVARC_ECORRUPT);

    /* geometry: per head a summary section of bits[n_sum][2][d/8],
     * scales[n_sum][2], pad to 4 and a CRC, after every record slot */
    CHECK(kvarc_block_sum_section(0, 128) == 0, "no summaries, no section");
    CHECK(kvarc_block_sum_section(3, 128) == 3 * S_ITEMS * 16 + 3 * S_ITEMS * 2 + 4, "summary section at d 128: %zu",
          kvarc_block_sum_section(3, 128));
    CHECK(kvarc_block_sum_section(1, 64) == 20 + 4 && kvarc_block_sum_section(3, 64) == 60 + 4,
          "summary section at d 64: %zu, %zu", kvarc_block_sum_section(1, 64), kvarc_block_sum_section(3, 64));
    CHECK(kvarc_block_payload_bytes_sum(200, 128, 8, 104, 0) == kvarc_block_payload_bytes(200, 128, 8, 104),
          "n_sum 0 is the plain payload");
    size_t ssec = kvarc_block_sum_section(3, 128);
    size_t after_slots = kvarc_block_slot_offset(&h, 7, 199) + 104 + 4;
    CHECK(kvarc_block_sum_offset(&h, 0) == after_slots, "summaries follow the last record slot (%zu, want %zu)",
          kvarc_block_sum_offset(&h, 0), after_slots);
    int tiled = 1;
    for (int hd = 1; hd < 8; hd++)
        tiled &= kvarc_block_sum_offset(&h, hd) == kvarc_block_sum_offset(&h, hd - 1) + ssec;
    CHECK(tiled, "summary sections are consecutive, head by head");
    size_t end = kvarc_block_sum_offset(&h, 7) + ssec;
    CHECK(end <= KVARC_BLOCK_HEADER + h.payload_bytes && end + 8 > KVARC_BLOCK_HEADER + h.payload_bytes &&
          h.payload_bytes % 8 == 0, "payload is the sections plus padding to 8 (%zu, %u)", end, h.payload_bytes);
    CHECK(kvarc_block_sig_offset(&h, 0) == KVARC_BLOCK_HEADER &&
          kvarc_block_slot_offset(&h, 0, 0) == KVARC_BLOCK_HEADER + 8 * kvarc_block_sig_section(200, 128),
          "summaries move neither signatures nor records");
    /* the section CRC is keyed like the signature sections', apart from them */
    uint8_t sec[64] = { 1, 2, 3 };
    CHECK(kvarc_sum_section_crc(1, 2, 10, 0, sec, 60) != kvarc_sum_section_crc(1, 2, 10, 1, sec, 60) &&
          kvarc_sum_section_crc(1, 2, 10, 0, sec, 60) != kvarc_sum_section_crc(1, 2, 74, 0, sec, 60) &&
          kvarc_sum_section_crc(1, 2, 10, 0, sec, 60) != kvarc_sig_section_crc(1, 2, 10, 0, sec, 60),
          "summary section CRCs name their head, block and kind of section");
}

int main(void)
{
    CHECK(kvarc_crc32c(0, "123456789", 9) == 0xe3069283u, "CRC-32C check value: %08x",
          kvarc_crc32c(0, "123456789", 9));
    /* chaining equals one pass, at every split and alignment */
    uint8_t buf[300];
    tu_rng r = { 3 };
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (uint8_t)kvarc_splitmix64(&r.s);
    uint32_t whole = kvarc_crc32c(0, buf + 3, 290);
    for (size_t split = 0; split <= 290; split += 7)
        CHECK(kvarc_crc32c(kvarc_crc32c(0, buf + 3, split), buf + 3 + split, 290 - split) == whole,
              "chained CRC at split %zu", split);

    kvarc_block_header h = { .kind = KVARC_BLOCK_DATA, .version = KVARC_BLOCK_VERSION,
                             .format = KVARC_FMT_Q3, .format_version = 1, .head_dim = 128,
                             .n_heads = 8, .layer = 31, .conv = 0x123456789abcull,
                             .first_pos = 1ull << 40, .count = 64, .rec_bytes = 104, .seq = 99 };
    h.payload_bytes = (uint32_t)kvarc_block_payload_bytes(64, 128, 8, 104);
    uint8_t hb[KVARC_BLOCK_HEADER];
    kvarc_block_header_encode(&h, hb);
    kvarc_block_header back;
    CHECK_RC(kvarc_block_header_decode(hb, &back), 0);
    CHECK(back.conv == h.conv && back.first_pos == h.first_pos && back.seq == 99 && back.layer == 31 &&
          back.payload_bytes == h.payload_bytes && back.header_crc == h.header_crc, "round trip");
    int missed = 0;
    for (int bit = 0; bit < KVARC_BLOCK_HEADER * 8; bit++) {
        hb[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        missed += kvarc_block_header_decode(hb, &back) == 0;
        hb[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    CHECK(missed == 0, "%d flipped header bits went unnoticed", missed);
    /* geometry: sections tile the payload */
    size_t last = kvarc_block_slot_offset(&h, 7, 63) + 104 + 4;
    CHECK(kvarc_block_sig_offset(&h, 0) == KVARC_BLOCK_HEADER, "first section follows the header");
    CHECK(kvarc_block_slot_offset(&h, 0, 0) == KVARC_BLOCK_HEADER + 8 * kvarc_block_sig_section(64, 128),
          "records follow the signature sections");
    CHECK(last <= KVARC_BLOCK_HEADER + h.payload_bytes && last + 8 > KVARC_BLOCK_HEADER + h.payload_bytes,
          "payload is the sections plus padding to 8");
    CHECK(kvarc_block_sig_section(64, 128) == 64 * 16 + 64 * 2 + 4, "signature section size");
    n_sum_cases();
    sum_header_cases();
    return tu_finish("test_block");
}
