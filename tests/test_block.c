/* test_block: CRC-32C matches the standard check value (hardware and
 * table paths agree on every length and alignment), block headers round-
 * trip and any flipped header bit is caught, geometry is consistent. */
#include <string.h>

#include "testutil.h"

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
    return tu_finish("test_block");
}
