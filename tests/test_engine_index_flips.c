/* test_engine_index_flips: one bit flipped in the LMDB index (data.mdb),
 * at a few hundred places spread over every page, one at a time, on a
 * small archive. For each flip, in a child process (LMDB itself may crash
 * on a damaged page header or page pointer):
 *   - kvd_open may refuse; if it opens, every record read either comes
 *     back bit-exact or fails with an error; never other bytes;
 *   - when a read or an open of the conversation fails, verify must
 *     report a problem (damage that breaks reads is never silent);
 *   - the segments are never damaged by recovery: with the pristine index
 *     put back, everything reads back bit-exact and verify is clean.
 * The flips are spread over the file by a stride, the same every run.
 * What it found when written: recovery unlinked the only segment when a
 * flip made the segment table unreadable or its state byte 0 (the file
 * looked unknown), and verify reported nothing when a damaged main table
 * made LMDB open an empty extents table. */
#include <errno.h>
#include <fcntl.h>
#include <sys/wait.h>

#include "engine_util.h"

#define TAG    5
#define LAYERS 4
#define LEN    60
#define FLIPS  4000

enum { HARMLESS, REFUSED, DETECTED, VERIFY_ONLY, WRONG_BYTES, SILENT, DESTROYED, NCLASS };
static const char *class_name[NCLASS] = { "harmless", "refused at open", "reads fail, verify reports",
                                          "verify reports, reads fine", "WRONG BYTES SERVED",
                                          "SILENT (reads fail, verify clean)", "SEGMENTS DAMAGED" };

/* 0 all of [0, LEN) of every layer and head read back; 1 another error; 2 other bytes. */
static int read_all(kvd_engine *e)
{
    kvd_err err;
    kvd_conv_info ci;
    if (kvd_conv_open(e, "f", "c", NULL, &ci, &err))
        return 1;
    kvd_reader *r;
    if (kvd_reader_open(e, &r, &err))
        return 1;
    uint64_t pos[LEN];
    for (int i = 0; i < LEN; i++)
        pos[i] = (uint64_t)i;
    int bad = 0;
    for (uint32_t l = 0; l < LAYERS && !bad; l++) {
        uint64_t len;
        if (kvd_layer_length(e, ci.id, l, &len, &err) || len != LEN) {
            bad = 1;
            break;
        }
        for (uint32_t h = 0; h < 2 && !bad; h++) {
            int rc = eu_check_records(r, &ci, TAG, l, h, pos, LEN, &err);
            bad = rc == 1 ? 2 : rc ? 1 : 0;      /* eu_check_records: 1 means the bytes differ */
        }
    }
    kvd_reader_close(r);
    return bad;
}

static int write_file(const char *path, const uint8_t *buf, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int ok = fd >= 0 && write(fd, buf, n) == (ssize_t)n;
    if (fd >= 0)
        close(fd);
    return ok ? 0 : -1;
}

static int classify(const char *dir, const char *mdb, const char *lock, const uint8_t *img, size_t n)
{
    kvd_options o = { .dir = dir };
    kvd_engine *e;
    kvd_err err;
    int cls;
    if (kvd_open(&o, &e, &err)) {
        cls = REFUSED;
    } else {
        kvd_verify_report rep;
        int vrc = kvd_verify(e, &rep, NULL, NULL, NULL, NULL, &err);
        int rd = read_all(e);
        kvd_close(e);
        cls = rd == 2 ? WRONG_BYTES : rd && vrc == 0 ? SILENT : rd ? DETECTED : vrc ? VERIFY_ONLY : HARMLESS;
    }
    /* the pristine index back: the segments must still hold everything */
    unlink(lock);
    if (write_file(mdb, img, n) || kvd_open(&o, &e, &err))
        return DESTROYED;
    kvd_verify_report rep;
    int vrc = kvd_verify(e, &rep, NULL, NULL, NULL, NULL, &err);
    int rd = read_all(e);
    kvd_close(e);
    return vrc || rd ? DESTROYED : cls;
}

int main(void)
{
    char dir[256], mdb[320], lock[320];
    eu_tmpdir(dir, sizeof dir, "flips");
    snprintf(mdb, sizeof mdb, "%s/index/data.mdb", dir);
    snprintf(lock, sizeof lock, "%s/index/lock.mdb", dir);
    kvd_options o = { .dir = dir, .segment_bytes = 16 << 10 };  /* several segments, sealed ones among them */
    kvd_engine *e;
    kvd_err err;
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    if (tu_failures)
        return tu_finish("test_engine_index_flips");
    kvd_shape s = eu_shape(LAYERS, 2, KVARC_FMT_Q3);
    kvd_conv_info ci;
    CHECK_RC(kvd_conv_create(e, "f", "c", &s, NULL, &ci, &err), 0);
    for (int b = 0; b < LEN / 10; b++)
        for (uint32_t l = 0; l < LAYERS; l++)
            CHECK_RC(eu_append(e, &ci, TAG, l, (uint64_t)b * 10, 10, &err), 0);
    kvd_close(e);
    /* the pristine image */
    struct stat st;
    CHECK(stat(mdb, &st) == 0, "stat %s", mdb);
    size_t n = (size_t)st.st_size;
    uint8_t *img = malloc(n), *flip = malloc(n);
    int fd = open(mdb, O_RDONLY);
    CHECK(fd >= 0 && read(fd, img, n) == (ssize_t)n, "read %s", mdb);
    if (fd >= 0)
        close(fd);
    if (tu_failures)
        return tu_finish("test_engine_index_flips");

    int count[NCLASS + 1] = { 0 };
    size_t stride = n / FLIPS | 1;                /* odd: every byte position within a page gets hit */
    for (size_t off = 0; off < n; off += stride) {
        memcpy(flip, img, n);
        flip[off] ^= (uint8_t)(1u << (off % 8));
        unlink(lock);
        CHECK_RC(write_file(mdb, flip, n), 0);
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0)
            _exit(classify(dir, mdb, lock, img, n));
        int status;
        waitpid(pid, &status, 0);
        int cls = WIFEXITED(status) && WEXITSTATUS(status) < NCLASS ? WEXITSTATUS(status) : NCLASS;
        count[cls]++;
        if (cls == NCLASS) {
            /* LMDB crashed on the damaged page (it checks no page); the
             * pristine index must still give everything back */
            unlink(lock);
            CHECK_RC(write_file(mdb, img, n), 0);
            CHECK_RC(kvd_open(&o, &e, &err), 0);
            if (!tu_failures) {
                CHECK(read_all(e) == 0, "offset %zu: after LMDB crashed, the pristine index does not read back",
                      off);
                kvd_close(e);
            }
        }
        CHECK(cls != WRONG_BYTES && cls != SILENT && cls != DESTROYED, "data.mdb offset %zu bit %zu: %s", off,
              off % 8, cls < NCLASS ? class_name[cls] : "?");
        unlink(lock);
        CHECK_RC(write_file(mdb, img, n), 0);
        char old[400];
        snprintf(old, sizeof old, "%s/index.old", dir);
        eu_rmrf(old);
    }
    printf("  %zu-byte index, a bit flipped every %zu bytes:\n", n, stride);
    for (int c = 0; c < NCLASS; c++)
        printf("    %-36s %d\n", class_name[c], count[c]);
    printf("    %-36s %d\n", "LMDB crashed (child killed)", count[NCLASS]);
    free(img);
    free(flip);
    eu_rmrf(dir);
    return tu_finish("test_engine_index_flips");
}
