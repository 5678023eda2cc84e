/* auth.c - token file parsing and bearer-token checks for kvarcd.
 *
 * Design notes
 * The token set is read once at start and is immutable afterwards, so
 * worker threads read it without locks. A check walks every stored token
 * and compares each in constant time, so the time taken says nothing
 * about which bytes of a guessed token were right.
 */
#include <errno.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "auth.h"
#include "kvd.h"

struct auth_tokens {
    atomic_int  refs;      /* the holders: kvarcd, and each call authenticated with it (SIGHUP swaps sets) */
    size_t      n;
    char      **tok;       /* NUL-terminated tokens */
    size_t     *len;
    auth_scope *scope;
};

auth_tokens *auth_ref(auth_tokens *t)
{
    if (t)
        atomic_fetch_add(&t->refs, 1);
    return t;
}

void auth_free(auth_tokens *t)
{
    if (!t || atomic_fetch_sub(&t->refs, 1) > 1)
        return;
    for (size_t i = 0; i < t->n; i++) {
        free(t->tok[i]);
        for (size_t j = 0; j < t->scope[i].nns; j++)
            free(t->scope[i].ns[j]);
        free(t->scope[i].ns);
    }
    free(t->tok);
    free(t->len);
    free(t->scope);
    free(t);
}

size_t auth_count(const auth_tokens *t)
{
    return t ? t->n : 0;
}

/* Append one token line (already split into token and scope). */
static int add_token(auth_tokens *t, const char *tok, char *scope, const char *where, char *msg, size_t msglen)
{
    size_t tl = strlen(tok);
    if (tl < AUTH_TOKEN_MIN || tl > AUTH_TOKEN_MAX) {
        snprintf(msg, msglen, "%s: a token is %d..%d bytes; this one is %zu", where, AUTH_TOKEN_MIN,
                 AUTH_TOKEN_MAX, tl);
        return -EINVAL;
    }
    for (size_t i = 0; i < t->n; i++)
        if (!strcmp(t->tok[i], tok)) {
            snprintf(msg, msglen, "%s: the same token appears twice", where);
            return -EINVAL;
        }
    char **nt = realloc(t->tok, (t->n + 1) * sizeof *nt);
    if (nt)
        t->tok = nt;
    size_t *nl = realloc(t->len, (t->n + 1) * sizeof *nl);
    if (nl)
        t->len = nl;
    auth_scope *ns = realloc(t->scope, (t->n + 1) * sizeof *ns);
    if (ns)
        t->scope = ns;
    if (!nt || !nl || !ns)
        goto oom;
    auth_scope *s = &t->scope[t->n];
    memset(s, 0, sizeof *s);
    snprintf(s->token_tag, sizeof s->token_tag, "%.8s...", tok);
    if (!(t->tok[t->n] = strdup(tok)))
        goto oom;
    t->len[t->n] = tl;
    t->n++;                 /* from here auth_free releases the entry */
    if (!strcmp(scope, "*")) {
        s->all = 1;
        return 0;
    }
    for (char *save = NULL, *p = strtok_r(scope, ",", &save); p; p = strtok_r(NULL, ",", &save)) {
        if (!kvd_name_valid(p, KVD_NS_MAX)) {
            snprintf(msg, msglen, "%s: '%s' is not a namespace name (letters, digits, '.', '_', '-', at most "
                     "%d bytes) nor '*'", where, p, KVD_NS_MAX - 1);
            return -EINVAL;
        }
        char **nn = realloc(s->ns, (s->nns + 1) * sizeof *nn);
        if (!nn)
            goto oom;
        s->ns = nn;
        if (!(s->ns[s->nns] = strdup(p)))
            goto oom;
        s->nns++;
    }
    if (!s->nns) {
        snprintf(msg, msglen, "%s: the token has no namespaces (give NS[,NS...] or *)", where);
        return -EINVAL;
    }
    return 0;
oom:
    snprintf(msg, msglen, "%s: out of memory", where);
    return -ENOMEM;
}

int auth_load(const char *path, auth_tokens **out, char *msg, size_t msglen)
{
    struct stat st;
    int rc = 0;
    FILE *f = fopen(path, "r");
    if (!f) {
        rc = -errno;
        snprintf(msg, msglen, "token file %s: %s", path, strerror(errno));
        return rc;
    }
    if (fstat(fileno(f), &st) == 0 && (st.st_mode & 077)) {
        snprintf(msg, msglen, "token file %s is readable or writable by group or others (mode %04o): "
                 "chmod 600 it", path, (unsigned)(st.st_mode & 07777));
        fclose(f);
        return -EPERM;
    }
    auth_tokens *t = calloc(1, sizeof *t);
    if (!t) {
        fclose(f);
        snprintf(msg, msglen, "out of memory");
        return -ENOMEM;
    }
    atomic_init(&t->refs, 1);
    char line[1024], where[300];
    for (int lineno = 1; !rc && fgets(line, sizeof line, f); lineno++) {
        snprintf(where, sizeof where, "token file %s:%d", path, lineno);
        if (!strchr(line, '\n') && !feof(f)) {
            snprintf(msg, msglen, "%s: line longer than %zu bytes", where, sizeof line - 2);
            rc = -EINVAL;
            break;
        }
        char *save = NULL, *tok = strtok_r(line, " \t\r\n", &save);
        if (!tok || tok[0] == '#')
            continue;
        char *scope = strtok_r(NULL, " \t\r\n", &save);
        char *extra = scope ? strtok_r(NULL, " \t\r\n", &save) : NULL;
        if (!scope || (extra && extra[0] != '#')) {
            snprintf(msg, msglen, "%s: expected 'TOKEN NS[,NS...]' or 'TOKEN *'", where);
            rc = -EINVAL;
            break;
        }
        rc = add_token(t, tok, scope, where, msg, msglen);
    }
    fclose(f);
    if (!rc && !t->n) {
        snprintf(msg, msglen, "token file %s holds no tokens", path);
        rc = -EINVAL;
    }
    if (rc) {
        auth_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

/* Equal in time that depends on the lengths only. */
static int ct_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    unsigned char d = alen != blen;
    size_t n = alen < blen ? alen : blen;
    for (size_t i = 0; i < n; i++)
        d |= (unsigned char)(a[i] ^ b[i]);
    return d == 0;
}

const auth_scope *auth_check(const auth_tokens *t, const char *value, size_t len)
{
    static const char bearer[] = "Bearer ";
    if (!t || len <= sizeof bearer - 1 || strncasecmp(value, bearer, sizeof bearer - 1))
        return NULL;
    value += sizeof bearer - 1;
    len -= sizeof bearer - 1;
    const auth_scope *found = NULL;
    for (size_t i = 0; i < t->n; i++)
        if (ct_equal(value, len, t->tok[i], t->len[i]))
            found = &t->scope[i];
    return found;
}

int auth_ns_allowed(const auth_scope *s, const char *ns)
{
    if (!s || s->all)
        return 1;
    for (size_t i = 0; i < s->nns; i++)
        if (ns && !strcmp(s->ns[i], ns))
            return 1;
    return 0;
}
