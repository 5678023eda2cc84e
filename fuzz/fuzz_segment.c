/* fuzz_segment - a segment file as the offline tools read it: the input
 * becomes segments/<id>.seg of a fresh data directory, then `kvarc
 * rebuild-index` (kvd_rebuild_index: every block walked, damage skipped,
 * valid blocks replayed into a new index), `kvarc verify` on the stopped
 * directory (kvd_open_check + kvd_verify: every block, extent and counter)
 * and, with flag bit 2, kvarcd's own start (kvd_open: crash recovery over
 * the same bytes).
 *
 * Input: byte 0 flags: bits 0-1 as fuzz_block (checksum fix-ups), bit 2
 * also kvd_open, bit 3 a second copy of the file under the next id (two
 * segments: replay order across files, sealed and open states); the rest
 * is the segment file. Slow (two or three LMDB environments are made per
 * input, and ASan zeroes LMDB's large callocs): ~900 inputs a second on
 * /dev/shm. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"

static void quiet(void *arg, const char *line)
{
    (void)arg;
    (void)line;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t n = size - 1;
    uint8_t *b = malloc(n ? n : 1);
    if (!b)
        return 0;
    memcpy(b, data + 1, n);
    if (data[0] & 3)
        fz_fix_blocks(b, n, data[0] & 2);
    char dir[256], p[512];
    fz_tmpdir(dir, sizeof dir, "seg");
    snprintf(p, sizeof p, "%s/segments", dir);
    mkdir(p, 0700);
    snprintf(p, sizeof p, "%s/segments/%016llx.seg", dir, 1ull);
    if (fz_write_file(p, b, n, 0600))
        fz_die("write", p);
    if (data[0] & 8) {
        snprintf(p, sizeof p, "%s/segments/%016llx.seg", dir, 2ull);
        if (fz_write_file(p, b, n, 0600))
            fz_die("write", p);
    }
    free(b);
    kvd_err err;
    uint64_t dropped = 0;
    if (!kvd_rebuild_index(dir, quiet, NULL, &dropped, NULL, NULL, &err)) {
        kvd_engine *e;
        if (!kvd_open_check(dir, &e, &err)) {
            kvd_verify_report rep;
            (void)kvd_verify(e, &rep, quiet, NULL, NULL, NULL, &err);   /* problems found are its answer */
            kvd_close(e);
        }
        if (data[0] & 4) {
            kvd_options o = { .dir = dir, .map_size = 64u << 20, .segment_bytes = 1u << 20 };
            if (!kvd_open(&o, &e, &err))
                kvd_close(e);
        }
    }
    fz_rmrf(dir);
    return 0;
}
