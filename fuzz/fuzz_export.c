/* fuzz_export - an export file (SCHEMA.md section 10) as kvarc import and
 * kvarcd's Import read it: kvd_import_begin, the bytes fed in pieces
 * (kvd_import_feed: sections checked and staged as they complete),
 * kvd_import_finish, then kvd_import_free; an import that publishes is
 * deleted again. One engine for the run, made again every RESET inputs
 * (what imports leave in segments grows until then).
 *
 * Input: byte 0 flags: bit 0 fix the preamble's and every section's
 * checksums (header and payload), so mutations reach the section decoders;
 * bits 1-7 choose up to three cut points (pieces of any size, as a stream
 * delivers them); the rest is the file. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "transfer.h"
#include "xfile.h"

enum { RESET = 1000 };

static char        dir[256];
static kvd_engine *eng;
static unsigned    runs;

static void engine_up(void)
{
    kvd_options o;
    kvd_err err;
    fz_tmpdir(dir, sizeof dir, "export");
    memset(&o, 0, sizeof o);
    o.dir = dir;
    o.map_size = 256u << 20;
    o.segment_bytes = 4u << 20;
    if (kvd_open(&o, &eng, &err))
        fz_die("kvd_open", err.msg);
}

static void engine_down(void)
{
    kvd_close(eng);
    fz_rmrf(dir);
}

static void at_exit(void)
{
    engine_down();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    engine_up();
    atexit(at_exit);
    return 0;
}

/* Right CRCs for the preamble and every section header and payload in b[n]. */
static void fix_export(uint8_t *b, size_t n)
{
    if (n < KVX_PREAMBLE)
        return;
    fz_put32(b + 12, kvarc_crc32c(0, b, 12));
    size_t off = KVX_PREAMBLE;
    while (off + KVX_HEADER <= n) {
        uint8_t *h = b + off;
        fz_put32(h, KVX_SECTION_MAGIC);
        uint64_t pb = (uint64_t)fz_get32(h + 16) | (uint64_t)fz_get32(h + 20) << 32;
        int fits = pb <= n - off - KVX_HEADER;
        if (fits)
            fz_put32(h + 24, kvarc_crc32c(0, h + KVX_HEADER, (size_t)pb));
        fz_put32(h + 28, kvarc_crc32c(0, h, 28));
        if (!fits)
            return;
        off += KVX_HEADER + (size_t)pb;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (++runs % RESET == 0) {
        engine_down();
        engine_up();
    }
    size_t n = size - 1;
    uint8_t *b = malloc(n ? n : 1);
    if (!b)
        return 0;
    memcpy(b, data + 1, n);
    if (data[0] & 1)
        fix_export(b, n);
    size_t cut[4], nc = 0;
    uint64_t st = data[0] >> 1;
    for (int i = 0; i < (data[0] >> 1) % 4; i++)
        cut[nc++] = n ? (size_t)(kvarc_splitmix64(&st) % (n + 1)) : 0;
    cut[nc++] = n;
    for (size_t i = 1; i < nc; i++)     /* ascending */
        for (size_t j = i; j > 0 && cut[j] < cut[j - 1]; j--) {
            size_t t = cut[j];
            cut[j] = cut[j - 1];
            cut[j - 1] = t;
        }
    kvd_err err;
    kvd_import *im;
    if (kvd_import_begin(eng, "fz", "imported", &im, &err))
        fz_die("kvd_import_begin", err.msg);
    int rc = 0;
    size_t at = 0;
    for (size_t i = 0; i < nc && !rc; i++) {
        rc = kvd_import_feed(im, b + at, cut[i] - at, &err);
        at = cut[i];
    }
    kvd_conv_info info;
    if (!rc && !kvd_import_finish(im, &info, &err)) {
        if (strcmp(info.ns, "fz") || strcmp(info.name, "imported"))
            abort();
        if (kvd_conv_delete(eng, "fz", "imported", &err))
            fz_die("kvd_conv_delete", err.msg);
    }
    kvd_import_free(im);
    free(b);
    return 0;
}
