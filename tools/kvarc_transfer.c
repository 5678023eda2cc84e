/* kvarc_transfer.c - `kvarc export NS/NAME FILE` and `kvarc import FILE
 * NS/NAME`: the bytes of an export file (schema/SCHEMA.md section 10)
 * between a file and kvarcd, which writes and checks the format.
 *
 * Export writes FILE.partial-PID as the chunks come, fsyncs it and renames
 * it to FILE only once the stream ended OK, so FILE is either a complete
 * export or not there; an existing FILE is not overwritten. Import sends
 * the file in messages of at most 4 MiB; kvarcd stores nothing under
 * NS/NAME unless the whole file checks out. Both show progress on stderr:
 * a line redrawn in place on a terminal, else a line per 10%. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvarc_admin.h"

#define MSG_DATA ((4 << 20) - 4096)      /* file bytes per Import message: with its fields, <= 4 MiB */
#define LONG_CALL_MS (24 * 3600 * 1000)  /* a transfer's deadline: a day */

typedef struct progress {
    const char *what;
    int         last, tty;
} progress;

static void progress_show(progress *p, uint64_t done, uint64_t total, const char *unit, double mib)
{
    int pct = total ? (int)(100.0 * (double)done / (double)total) : 100;
    if (p->tty) {
        if (pct != p->last)
            fprintf(stderr, "\r%s: %3d%% (%llu of %llu %s, %.1f MiB)", p->what, pct, (unsigned long long)done,
                    (unsigned long long)total, unit, mib);
    } else if (pct / 10 != p->last / 10 || p->last < 0) {
        fprintf(stderr, "%s: %d%% (%llu of %llu %s, %.1f MiB)\n", p->what, pct, (unsigned long long)done,
                (unsigned long long)total, unit, mib);
    }
    p->last = pct;
}

static void progress_end(progress *p)
{
    if (p->tty && p->last >= 0)
        fprintf(stderr, "\n");
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int kvarc_export(kvc_conn *k, const char *target, const char *conv, const char *file, uint32_t section_bytes,
                 int json)
{
    char buf[256], *ns, *name, tmp[4200];
    int rc = kvarc_split_name(conv, buf, sizeof buf, &ns, &name);
    if (rc)
        return rc;
    struct stat st;
    if (!stat(file, &st)) {
        fprintf(stderr, "kvarc export: %s exists; remove it or name another file\n", file);
        return 2;
    }
    snprintf(tmp, sizeof tmp, "%s.partial-%ld", file, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "kvarc export: cannot create %s: %s\n", tmp, strerror(errno));
        return 1;
    }
    Kvarc__V1__ExportRequest req = KVARC__V1__EXPORT_REQUEST__INIT;
    req.ns = ns;
    req.name = name;
    req.section_bytes = section_bytes;
    kvc_stream *s;
    char msg[1024] = "";
    progress pg = { "export", -1, isatty(STDERR_FILENO) };
    uint64_t bytes = 0, done = 0, total = 0;
    int st_rc = kvc_sstream_open(k, "Export", &req.base, LONG_CALL_MS, &s);
    int werr = 0;
    if (!st_rc) {
        ProtobufCMessage *m;
        int got;
        while ((got = kvc_sstream_next(s, &kvarc__v1__file_chunk__descriptor, &m)) == 1) {
            Kvarc__V1__FileChunk *c = (Kvarc__V1__FileChunk *)m;
            if (!werr && write_all(fd, c->data.data, c->data.len))
                werr = errno ? errno : EIO;
            bytes += c->data.len;
            done = c->tokens_done;
            total = c->tokens_total;
            protobuf_c_message_free_unpacked(m, NULL);
            if (werr) {
                kvc_stream_cancel(s);
                s = NULL;
                break;
            }
            progress_show(&pg, done, total, "tokens", (double)bytes / 1048576);
        }
        if (s)
            st_rc = kvc_stream_finish(s, NULL, NULL, msg, sizeof msg);
    }
    progress_end(&pg);
    if (!werr && !st_rc && (fsync(fd) || close(fd) < 0))
        werr = errno;
    else
        close(fd);
    if (werr || st_rc) {
        unlink(tmp);
        if (werr) {
            fprintf(stderr, "kvarc export: writing %s: %s (nothing written to %s)\n", tmp, strerror(werr), file);
            return 1;
        }
        return kvarc_admin_fail(st_rc, "export", msg, target);
    }
    if (rename(tmp, file)) {
        fprintf(stderr, "kvarc export: renaming %s to %s: %s\n", tmp, file, strerror(errno));
        unlink(tmp);
        return 1;
    }
    char dirbuf[4200];
    snprintf(dirbuf, sizeof dirbuf, "%s", file);
    int dfd = open(dirname(dirbuf), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {              /* the rename itself durable */
        fsync(dfd);
        close(dfd);
    }
    if (json)
        printf("{\"conversation\":\"%s/%s\",\"file\":\"%s\",\"bytes\":%llu,\"tokens\":%llu}\n", ns, name, file,
               (unsigned long long)bytes, (unsigned long long)total);
    else
        printf("exported %s/%s to %s: %llu tokens (every layer's), %.1f MiB\n", ns, name, file,
               (unsigned long long)total, (double)bytes / 1048576);
    return 0;
}

int kvarc_import(kvc_conn *k, const char *target, const char *file, const char *conv, int json)
{
    char buf[256], *ns, *name;
    int rc = kvarc_split_name(conv, buf, sizeof buf, &ns, &name);
    if (rc)
        return rc;
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) {
        fprintf(stderr, "kvarc import: cannot read %s: %s\n", file, strerror(errno));
        if (fd >= 0)
            close(fd);
        return 1;
    }
    uint8_t *data = malloc(MSG_DATA);
    kvc_stream *s = NULL;
    char msg[1024] = "";
    if (!data || kvc_stream_open(k, "Import", LONG_CALL_MS, &s)) {
        fprintf(stderr, "kvarc import: cannot start the call to %s\n", target);
        free(data);
        close(fd);
        return 1;
    }
    progress pg = { "import", -1, isatty(STDERR_FILENO) };
    uint64_t sent = 0, total = (uint64_t)st.st_size;
    int first = 1, rerr = 0;
    for (;;) {
        ssize_t n = read(fd, data, MSG_DATA);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rerr = errno;
            break;
        }
        if (n == 0 && !first)
            break;
        Kvarc__V1__ImportRequest r = KVARC__V1__IMPORT_REQUEST__INIT;
        r.ns = first ? ns : "";
        r.name = first ? name : "";
        r.data.data = data;
        r.data.len = (size_t)n;
        first = 0;
        if (kvc_stream_send(s, &r.base))
            break;                      /* kvarcd ended the call: finish says why */
        sent += (uint64_t)n;
        progress_show(&pg, sent, total, "bytes", (double)sent / 1048576);
        if (n == 0)
            break;
    }
    progress_end(&pg);
    close(fd);
    free(data);
    if (rerr) {
        kvc_stream_cancel(s);
        fprintf(stderr, "kvarc import: reading %s: %s (nothing imported)\n", file, strerror(rerr));
        return 1;
    }
    ProtobufCMessage *rep = NULL;
    int st_rc = kvc_stream_finish(s, &kvarc__v1__conv_reply__descriptor, &rep, msg, sizeof msg);
    if (st_rc)
        return kvarc_admin_fail(st_rc, "import", msg, target);
    Kvarc__V1__ConvInfo *ci = ((Kvarc__V1__ConvReply *)rep)->info;
    if (json)
        printf("{\"conversation\":\"%s/%s\",\"id\":%llu,\"length\":%llu,\"layers\":%zu}\n", ns, name,
               (unsigned long long)ci->id, (unsigned long long)ci->length, ci->n_layer_lengths);
    else
        printf("imported %s into %s/%s (id %llu): %llu tokens x %zu layers\n", file, ns, name,
               (unsigned long long)ci->id, (unsigned long long)ci->length, ci->n_layer_lengths);
    protobuf_c_message_free_unpacked(rep, NULL);
    return 0;
}
