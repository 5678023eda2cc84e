/* fuzz_block - segment blocks alone (SCHEMA.md section 9): the header
 * decoder (kvarc_block_header_decode) and the payload checks every reader
 * runs on a whole block (block_check_payload: the data geometry, the
 * signature, summary and record sections, a metadata payload's CRC), block
 * after block over the input as a segment's bytes. The cheap, fast target;
 * fuzz_segment runs the same bytes through the whole offline tools.
 *
 * Input: byte 0 flags: bit 0 fix every header CRC and metadata payload
 * CRC, bit 1 also a data block's section and record CRCs (fz_fix_blocks),
 * so mutations reach the code behind the checksums; the rest is the
 * segment's bytes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "kvd_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t n = size - 1;
    uint8_t *b = malloc(n ? n : 1);     /* its own allocation: ASan sees reads past the segment's end */
    if (!b)
        return 0;
    memcpy(b, data + 1, n);
    if (data[0] & 3)
        fz_fix_blocks(b, n, data[0] & 2);
    size_t off = 0;
    uint64_t records = 0;
    while (off + KVARC_BLOCK_HEADER <= n) {
        kvarc_block_header h;
        if (kvarc_block_header_decode(b + off, &h)) {
            off += 8;                   /* as resync would: look further on */
            continue;
        }
        if (h.payload_bytes > n - off - KVARC_BLOCK_HEADER)
            break;
        const char *what = NULL;
        uint8_t *blk = malloc(KVARC_BLOCK_HEADER + (size_t)h.payload_bytes);   /* exactly the block, as read_block reads it */
        if (!blk)
            break;
        memcpy(blk, b + off, KVARC_BLOCK_HEADER + (size_t)h.payload_bytes);
        int rc = block_check_payload(&h, blk, &what, &records);
        if (rc && !what)
            abort();                    /* a refusal names what failed */
        if (h.kind == KVARC_BLOCK_DATA && !rc)
            for (int hd = 0; hd < h.n_heads; hd++)   /* every offset a reader may take lies inside the block */
                if (kvarc_block_sig_offset(&h, hd) > KVARC_BLOCK_HEADER + (size_t)h.payload_bytes ||
                    kvarc_block_slot_offset(&h, hd, h.count - 1) + h.rec_bytes + 4 >
                        KVARC_BLOCK_HEADER + (size_t)h.payload_bytes)
                    abort();
        free(blk);
        off += KVARC_BLOCK_HEADER + h.payload_bytes;
    }
    free(b);
    return 0;
}
