/* fuzz_tokens - kvarcd's token file (storaged/auth.c, the format in
 * auth.h): the input is written as a file of mode 0600 and read with
 * auth_load, as kvarcd --token-file does at start and on SIGHUP; a set
 * that loads is then asked what a call asks of it: auth_check with the
 * file's own first word as a bearer token (and mangled forms of it), and
 * auth_ns_allowed of the namespaces a scope names. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "fuzz_util.h"

static char dir[256], path[300];

static void at_exit(void)
{
    fz_rmrf(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fz_tmpdir(dir, sizeof dir, "tok");
    snprintf(path, sizeof path, "%s/tokens", dir);
    atexit(at_exit);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fz_write_file(path, data, size, 0600) || chmod(path, 0600))
        fz_die("write", path);
    auth_tokens *t = NULL;
    char msg[512];
    if (auth_load(path, &t, msg, sizeof msg)) {
        if (!msg[0])
            abort();                     /* a refusal says what and where */
        return 0;
    }
    /* the first word of the first line that is not a comment: a token of the set */
    char hdr[AUTH_TOKEN_MAX + 64];
    size_t i = 0, w = 0;
    while (i < size) {
        while (i < size && (data[i] == ' ' || data[i] == '\t'))
            i++;
        if (i < size && data[i] != '#' && data[i] != '\n' && data[i] != '\r')
            break;
        while (i < size && data[i] != '\n')
            i++;
        i++;
    }
    w = (size_t)snprintf(hdr, sizeof hdr, "Bearer ");
    while (i < size && w < sizeof hdr - 1 && data[i] > ' ' && data[i] != 0x7f)
        hdr[w++] = (char)data[i++];
    hdr[w] = 0;
    const auth_scope *s = auth_check(t, hdr, w);
    if (s) {
        if (!s->all && !s->nns)
            abort();                     /* a token sees something */
        for (size_t k = 0; k < s->nns; k++)
            if (!auth_ns_allowed(s, s->ns[k]))
                abort();
        (void)auth_ns_allowed(s, "");
        (void)auth_ns_allowed(s, "some-ns");
    }
    (void)auth_check(t, hdr, w > 8 ? w - 1 : w);        /* a prefix of it */
    (void)auth_check(t, hdr + 7, w - 7);                /* without "Bearer " */
    auth_tokens *r = auth_ref(t);
    auth_free(t);
    auth_free(r);
    return 0;
}
