/* test_engine_faults: an injected EIO, ENOSPC, short write or failed
 * fdatasync in the write path fails that append with a message, keeps
 * nothing of it (not even half), leaves the engine usable, and leaves every
 * earlier record intact, also across a reopen. */
#include <errno.h>

#include "engine_util.h"

int main(void)
{
    char dir[256];
    eu_tmpdir(dir, sizeof dir, "faults");
    kvd_options o = { .dir = dir, .segment_bytes = 128 << 10 };
    kvd_engine *e;
    kvd_err err = { 0 };
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    kvd_shape s = eu_shape(1, 2, KVARC_FMT_Q4);
    kvd_conv_info ci;
    CHECK_RC(kvd_conv_create(e, "f", "conv", &s, NULL, &ci, &err), 0);
    kvd_reader *r;
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);

    static const struct { kvd_fault_op op; int error; const char *name; } faults[] = {
        { KVD_FAULT_WRITE, -EIO, "EIO on write" },
        { KVD_FAULT_WRITE, -ENOSPC, "ENOSPC on write" },
        { KVD_FAULT_SHORT, -ENOSPC, "short write then ENOSPC" },
        { KVD_FAULT_SYNC, -EIO, "EIO on fdatasync" },
    };
    uint64_t len = 0;
    for (int round = 0; round < 3; round++)
        for (size_t f = 0; f < sizeof faults / sizeof faults[0]; f++) {
            CHECK_RC(eu_append(e, &ci, 7, 0, len, 40, &err), 0);
            len += 40;
            kvd_fault_set(faults[f].op, faults[f].error, 0);
            int rc = eu_append(e, &ci, 7, 0, len, 40, &err);
            CHECK(rc == faults[f].error, "%s: append returned %d (%s)", faults[f].name, rc, kvarc_strerror(rc));
            CHECK(strstr(err.msg, "nothing of it was kept") != NULL, "%s: message: %s", faults[f].name, err.msg);
            uint64_t now;
            CHECK_RC(kvd_layer_length(e, ci.id, 0, &now, &err), 0);
            CHECK(now == len, "%s: length %llu after a failed append, want %llu", faults[f].name,
                  (unsigned long long)now, (unsigned long long)len);
            /* a failed create is as clean */
            kvd_fault_set(faults[f].op, faults[f].error, 0);
            char name[32];
            snprintf(name, sizeof name, "x%d%zu", round, f);
            CHECK(kvd_conv_create(e, "f", name, &s, NULL, NULL, &err) == faults[f].error,
                  "%s: create must fail", faults[f].name);
            kvd_conv_info tmp;
            CHECK_RC(kvd_conv_open(e, "f", name, NULL, &tmp, &err), -ENOENT);
        }
    kvd_fault_set(KVD_FAULT_WRITE, 0, -1);
    kvd_fault_set(KVD_FAULT_SHORT, 0, -1);
    kvd_fault_set(KVD_FAULT_SYNC, 0, -1);
    CHECK_RC(eu_append(e, &ci, 7, 0, len, 40, &err), 0);   /* usable again */
    len += 40;
    uint64_t *pos = malloc(len * sizeof *pos);
    for (uint64_t i = 0; i < len; i++)
        pos[i] = i;
    for (uint32_t h = 0; h < 2; h++)
        CHECK(eu_check_records(r, &ci, 7, 0, h, pos, len, &err) == 0, "records after faults: %s", err.msg);
    kvd_reader_close(r);
    kvd_close(e);

    CHECK_RC(kvd_open(&o, &e, &err), 0);
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);
    uint64_t now;
    CHECK_RC(kvd_layer_length(e, ci.id, 0, &now, &err), 0);
    CHECK(now == len, "length after reopen %llu, want %llu", (unsigned long long)now, (unsigned long long)len);
    for (uint32_t h = 0; h < 2; h++)
        CHECK(eu_check_records(r, &ci, 7, 0, h, pos, len, &err) == 0, "records after reopen: %s", err.msg);
    kvd_verify_report rep;
    CHECK_RC(kvd_verify(e, &rep, NULL, NULL, NULL, NULL, &err), 0);
    kvd_conv_info list[4];
    CHECK(kvd_conv_list(e, "f", NULL, list, 4, &err) == 1, "only the one conversation exists");
    free(pos);
    kvd_reader_close(r);
    kvd_close(e);
    eu_rmrf(dir);
    return tu_finish("test_engine_faults");
}
