/* auth.h - kvarcd's bearer tokens and their namespace scopes (internal).
 *
 * A token file holds one token per line, then its scope:
 *
 *     # TOKEN                          NAMESPACES (comma-separated) or *
 *     4f1c0e8a9b2d47e6a1c3b5d7e9f01234  team-a,shared
 *     9a8b7c6d5e4f30211203f4e5d6c7b8a9  *
 *
 * Blank lines and lines starting with '#' are ignored. A token is 16..256
 * printable bytes without spaces; '*' scopes it to every namespace and to
 * the whole-archive calls (Stats, Verify, Compact). The file must not be
 * readable by group or others. Callers send "authorization: Bearer TOKEN".
 */
#ifndef KVARC_AUTH_H
#define KVARC_AUTH_H

#include <stddef.h>

#define AUTH_TOKEN_MIN 16
#define AUTH_TOKEN_MAX 256

typedef struct auth_scope {
    char   token_tag[12];   /* the first 8 bytes of the token and "...", for log lines */
    int    all;             /* '*': every namespace and the admin calls */
    size_t nns;
    char **ns;              /* the namespaces it may see (nns of them) */
} auth_scope;

typedef struct auth_tokens auth_tokens;

/* Read the token file at path. 0, or a negative errno with msg saying
 * what and where (file:line). The set is reference-counted: auth_load's
 * caller holds one reference, auth_ref takes another (t, or NULL for
 * NULL), auth_free drops one and frees the set with the last. */
int  auth_load(const char *path, auth_tokens **out, char *msg, size_t msglen);
auth_tokens *auth_ref(auth_tokens *t);
void auth_free(auth_tokens *t);
size_t auth_count(const auth_tokens *t);

/* The scope of the token in an "authorization" header value ("Bearer
 * TOKEN"), or NULL if it is not one of ours. Compares in constant time
 * per stored token. */
const auth_scope *auth_check(const auth_tokens *t, const char *value, size_t len);

/* 1 if the scope may see namespace ns. A NULL scope (a local unix-socket
 * caller without a token) sees everything. */
int auth_ns_allowed(const auth_scope *s, const char *ns);

#endif
