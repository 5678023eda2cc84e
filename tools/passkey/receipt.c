/* receipt.c - JSON receipts (see receipt.h). SHA-256 from OpenSSL's
 * libcrypto, JSON from cJSON. */
#include "receipt.h"

#include <errno.h>
#include <fcntl.h>
#include <gnu/libc-version.h>
#include <grpc/grpc.h>
#include <lmdb.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <protobuf-c/protobuf-c.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#ifndef KVARC_SOURCE_DIR
#define KVARC_SOURCE_DIR "."
#endif
#ifndef KVARC_URING_VERSION
#define KVARC_URING_VERSION "unknown"
#endif

static void hex_of(const unsigned char *md, char hex[65])
{
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
}

void rc_sha256_buf(const void *buf, size_t n, char hex[65])
{
    unsigned char md[32];
    unsigned int mdl = 0;
    EVP_Digest(buf, n, md, &mdl, EVP_sha256(), NULL);
    hex_of(md, hex);
}

int rc_sha256_file(const char *path, char hex[65], char *err, size_t len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, len, "%s: %s", path, strerror(errno));
        return -1;
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned char buf[1 << 16], md[32];
    unsigned int mdl = 0;
    size_t n;
    int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    while (ok && (n = fread(buf, 1, sizeof buf, f)) > 0)
        ok = EVP_DigestUpdate(ctx, buf, n);
    ok = ok && !ferror(f) && EVP_DigestFinal_ex(ctx, md, &mdl);
    EVP_MD_CTX_free(ctx);
    fclose(f);
    if (!ok) {
        snprintf(err, len, "%s: read or hash failed", path);
        return -1;
    }
    hex_of(md, hex);
    return 0;
}

void rc_git_revision(char *buf, size_t len)
{
    char cmd[1024], rev[64] = "", dirty[8] = "";
    snprintf(cmd, sizeof cmd, "git -C '%s' rev-parse HEAD 2>/dev/null", KVARC_SOURCE_DIR);
    FILE *p = popen(cmd, "r");
    if (p) {
        if (!fgets(rev, sizeof rev, p))
            rev[0] = 0;
        pclose(p);
    }
    rev[strcspn(rev, "\n")] = 0;
    /* untracked files do not count: build outputs and receipts live there */
    snprintf(cmd, sizeof cmd, "git -C '%s' status --porcelain --untracked-files=no 2>/dev/null | head -1",
             KVARC_SOURCE_DIR);
    if ((p = popen(cmd, "r"))) {
        if (fgets(dirty, sizeof dirty, p) && dirty[0])
            strcpy(dirty, "+dirty");
        else
            dirty[0] = 0;
        pclose(p);
    }
    snprintf(buf, len, "%s%s", rev[0] ? rev : "unknown", rev[0] ? dirty : "");
}

static cJSON *environment(void)
{
    cJSON *e = cJSON_CreateObject();
    char cpu[256] = "unknown", line[512];
    FILE *f = fopen("/proc/cpuinfo", "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10) && strchr(line, ':')) {
            snprintf(cpu, sizeof cpu, "%s", strchr(line, ':') + 2);
            cpu[strcspn(cpu, "\n")] = 0;
            break;
        }
    if (f)
        fclose(f);
    struct utsname u;
    uname(&u);
    char kern[512];
    snprintf(kern, sizeof kern, "%s %s %s", u.sysname, u.release, u.machine);
    cJSON_AddStringToObject(e, "cpu", cpu);
    cJSON_AddNumberToObject(e, "cores_online", (double)sysconf(_SC_NPROCESSORS_ONLN));
    cJSON_AddStringToObject(e, "kernel", kern);
    cJSON_AddStringToObject(e, "compiler", "gcc-compatible " __VERSION__);
    cJSON_AddStringToObject(e, "glibc", gnu_get_libc_version());
    cJSON_AddStringToObject(e, "lmdb", mdb_version(NULL, NULL, NULL));
    cJSON_AddStringToObject(e, "liburing", KVARC_URING_VERSION);
    cJSON_AddStringToObject(e, "grpc", grpc_version_string());
    cJSON_AddStringToObject(e, "protobuf-c", protobuf_c_version());
    cJSON_AddStringToObject(e, "openssl", OpenSSL_version(OPENSSL_VERSION));
    cJSON_AddStringToObject(e, "cjson", cJSON_Version());
    return e;
}

cJSON *rc_new(int argc, char **argv)
{
    cJSON *r = cJSON_CreateObject();
    if (!r)
        return NULL;
    size_t n = 1;
    for (int i = 0; i < argc; i++)
        n += strlen(argv[i]) + 1;
    char *cmd = calloc(1, n), rev[128], when[64];
    for (int i = 0; cmd && i < argc; i++) {
        strcat(cmd, argv[i]);
        if (i + 1 < argc)
            strcat(cmd, " ");
    }
    rc_git_revision(rev, sizeof rev);
    time_t t = time(NULL);
    struct tm tm;
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&t, &tm));
    cJSON_AddStringToObject(r, "receipt", "kvarc/1");
    cJSON_AddStringToObject(r, "command", cmd ? cmd : "");
    cJSON_AddStringToObject(r, "git_revision", rev);
    cJSON_AddStringToObject(r, "time_utc", when);
    cJSON_AddItemToObject(r, "environment", environment());
    cJSON_AddItemToObject(r, "inputs", cJSON_CreateArray());
    free(cmd);
    return r;
}

/* path relative to the source tree when inside it */
static const char *tree_relative(const char *path, char *buf, size_t len)
{
    char real[4096], root[4096];
    if (!realpath(path, real) || !realpath(KVARC_SOURCE_DIR, root))
        return path;
    size_t rl = strlen(root);
    if (!strncmp(real, root, rl) && real[rl] == '/') {
        snprintf(buf, len, "%s", real + rl + 1);
        return buf;
    }
    snprintf(buf, len, "%s", real);
    return buf;
}

int rc_add_input(cJSON *receipt, const char *name, const char *path, char *err, size_t len)
{
    char hex[65], rel[4096];
    if (rc_sha256_file(path, hex, err, len))
        return -1;
    cJSON *in = cJSON_CreateObject();
    cJSON_AddStringToObject(in, "name", name);
    cJSON_AddStringToObject(in, "path", tree_relative(path, rel, sizeof rel));
    cJSON_AddStringToObject(in, "sha256", hex);
    cJSON_AddItemToArray(cJSON_GetObjectItem(receipt, "inputs"), in);
    return 0;
}

int rc_write(const cJSON *receipt, const char *path, char *err, size_t len)
{
    char *s = cJSON_Print(receipt), tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = s ? open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644) : -1;
    size_t n = s ? strlen(s) : 0;
    int ok = fd >= 0 && write(fd, s, n) == (ssize_t)n && write(fd, "\n", 1) == 1 && !fsync(fd);
    if (fd >= 0)
        close(fd);
    ok = ok && !rename(tmp, path);
    if (!ok) {
        snprintf(err, len, "writing the receipt %s: %s", path, s ? strerror(errno) : "out of memory");
        unlink(tmp);
    }
    cJSON_free(s);
    return ok ? 0 : -1;
}

cJSON *rc_read(const char *path, char *err, size_t len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, len, "%s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *b = realloc(buf, 2 * cap + 1);
            if (!b) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = b, cap *= 2;
        }
    }
    fclose(f);
    if (!buf) {
        snprintf(err, len, "%s: out of memory", path);
        return NULL;
    }
    buf[n] = 0;
    cJSON *r = cJSON_Parse(buf);
    if (!r)
        snprintf(err, len, "%s: not JSON (near byte %ld)", path,
                 cJSON_GetErrorPtr() ? (long)(cJSON_GetErrorPtr() - buf) : -1L);
    free(buf);
    return r;
}

int rc_check_inputs(const cJSON *receipt, const char *root, FILE *out)
{
    const cJSON *inputs = cJSON_GetObjectItemCaseSensitive(receipt, "inputs"), *in;
    if (!cJSON_IsArray(inputs) || !cJSON_GetArraySize(inputs))
        return -1;
    int bad = 0;
    cJSON_ArrayForEach(in, inputs) {
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(in, "name"));
        const char *path = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(in, "path"));
        const char *want = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(in, "sha256"));
        if (!name || !path || !want) {
            fprintf(out, "BAD   an input lacks name, path or sha256\n");
            bad++;
            continue;
        }
        char full[4096], hex[65], err[512];
        snprintf(full, sizeof full, "%s%s%s", path[0] == '/' ? "" : (root ? root : KVARC_SOURCE_DIR),
                 path[0] == '/' ? "" : "/", path);
        if (rc_sha256_file(full, hex, err, sizeof err)) {
            fprintf(out, "BAD   %s: %s\n", name, err);
            bad++;
        } else if (strcmp(hex, want)) {
            fprintf(out, "BAD   %s: %s has sha256 %s, the receipt says %s\n", name, full, hex, want);
            bad++;
        } else {
            fprintf(out, "ok    %s: %s sha256 %.16s...\n", name, path, hex);
        }
    }
    return bad;
}
