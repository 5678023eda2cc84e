/* test_kvarcd_auth: kvarcd on a loopback TCP port with bearer tokens scoped
 * to namespaces, and with TLS. Checks: the start-up refusals (TCP without a
 * token file, a token file others can read, a bad line named by file:line);
 * SIGHUP reads the token file again (a bad one keeps the tokens in force);
 * missing and unknown tokens are UNAUTHENTICATED; a scoped token sees only
 * its namespaces (others' conversations answer as unknown ids, and their
 * data is unchanged afterwards), named foreign namespaces are
 * PERMISSION_DENIED, whole-archive calls need '*'; the unix socket stays
 * local and unscoped; the CLI over TCP; TLS with a self-signed certificate
 * (plaintext and an untrusted CA fail). */
#include <sys/stat.h>

#include "kvarcd_util.h"

#define TOK_A     "team-a-0123456789abcdef"
#define TOK_ADMIN "admin-fedcba9876543210"
#define TOK_NEW   "fresh-00112233445566778899"

static int write_file(const char *path, const char *text, mode_t mode)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fputs(text, f);
    fclose(f);
    return chmod(path, mode);
}

/* kvarcd with extra args, run to completion (it must refuse): its exit code and the log's last line. */
static int refused(const char *const *extra, char *last, size_t len)
{
    char log[300], line[1024];
    snprintf(log, sizeof log, "%s.log", dir);
    unlink(log);
    int code = wait_exit(start_daemon_args(extra), 30000);   /* a guard: it refuses at once */
    FILE *f = fopen(log, "r");
    *last = 0;
    while (f && fgets(line, sizeof line, f))
        snprintf(last, len, "%s", line);
    if (f)
        fclose(f);
    return code;
}

static kvc_conn *tcp_conn(int port, const char *token, const char *ca)
{
    char addr[64], msg[256];
    snprintf(addr, sizeof addr, "%s:%d", ca ? "localhost" : "127.0.0.1", port);
    kvc_options o = { .token = token, .tls_ca_file = ca };
    kvc_conn *c = NULL;
    if (kvc_connect_opts(addr, &o, &c, msg, sizeof msg))
        fprintf(stderr, "connect %s: %s\n", addr, msg);
    return c;
}

/* Health's status. The deadline is kvc_call's default (30 s), a failure
 * guard: a refusal (UNAUTHENTICATED, UNAVAILABLE) comes back at once, and
 * a short deadline would turn a slow answer into DEADLINE_EXCEEDED. */
/* Wait (at most ms) until kvarcd's log holds n lines containing words; 1 if it came. */
static int wait_log_lines(const char *words, int n, long ms)
{
    char log[300], line[1024];
    snprintf(log, sizeof log, "%s.log", dir);
    for (long end = kd_now_ms() + ms;;) {
        FILE *f = fopen(log, "r");
        int got = 0;
        while (f && fgets(line, sizeof line, f))
            got += strstr(line, words) != NULL;
        if (f)
            fclose(f);
        if (got >= n)
            return 1;
        if (kd_now_ms() > end)
            return 0;
        kd_sleep_ms(20);
    }
}

static int health(kvc_conn *c, char *msg)
{
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c, "Health", &e.base, &kvarc__v1__health_reply__descriptor, &rep, 0, msg, 256);
    if (!st)
        protobuf_c_message_free_unpacked(rep, NULL);
    return st;
}

static int simple(kvc_conn *c, const char *method, const ProtobufCMessageDescriptor *d, char *msg)
{
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c, method, &e.base, d, &rep, 0, msg, 256);
    if (!st)
        protobuf_c_message_free_unpacked(rep, NULL);
    return st;
}

static int stat_id(kvc_conn *c, uint64_t id, char *msg)
{
    Kvarc__V1__StatRequest r = KVARC__V1__STAT_REQUEST__INIT;
    r.id = id;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c, "Stat", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, 256);
    if (!st)
        protobuf_c_message_free_unpacked(rep, NULL);
    return st;
}

static void stop(pid_t pid)
{
    kill(pid, SIGTERM);
    CHECK(wait_exit(pid, 30000) == 0, "kvarcd exits 0 on SIGTERM (within 30 s)");
}

int main(void)
{
    eu_tmpdir(dir, sizeof dir, "kvarcd-auth");
    char tokens[300], loose[300], badline[300], last[1024], msg[256];
    snprintf(tokens, sizeof tokens, "%s.tokens", dir);
    snprintf(loose, sizeof loose, "%s.loose", dir);
    snprintf(badline, sizeof badline, "%s.bad", dir);
    CHECK_RC(write_file(tokens, "# test tokens\n" TOK_A " team-a\n" TOK_ADMIN " *  # admin\n", 0600), 0);
    CHECK_RC(write_file(loose, TOK_A " team-a\n", 0644), 0);
    CHECK_RC(write_file(badline, TOK_A " team-a\nshort x\n", 0600), 0);

    /* start-up refusals */
    const char *no_tokens[] = { "--listen", "127.0.0.1:0", NULL };
    CHECK(refused(no_tokens, last, sizeof last) == 2, "--listen without --token-file exits 2");
    const char *loose_args[] = { "--listen", "127.0.0.1:0", "--token-file", loose, NULL };
    CHECK(refused(loose_args, last, sizeof last) == 1 && strstr(last, "chmod 600"), "readable token file: %s", last);
    const char *bad_args[] = { "--listen", "127.0.0.1:0", "--token-file", badline, NULL };
    CHECK(refused(bad_args, last, sizeof last) == 1 && strstr(last, ".bad:2"), "bad line named: %s", last);
    const char *half_tls[] = { "--listen", "127.0.0.1:0", "--token-file", tokens, "--tls-cert", tokens, NULL };
    CHECK(refused(half_tls, last, sizeof last) == 2, "--tls-cert without --tls-key exits 2");
    const char *rt0[] = { "--rerank-threads", "0", NULL }, *rtx[] = { "--rerank-threads", "2x", NULL };
    CHECK(refused(rt0, last, sizeof last) == 2 && strstr(last, "--rerank-threads"), "--rerank-threads 0: %s", last);
    CHECK(refused(rtx, last, sizeof last) == 2 && strstr(last, "--rerank-threads"), "--rerank-threads 2x: %s", last);

    /* plaintext TCP with tokens */
    char log[300];
    snprintf(log, sizeof log, "%s.log", dir);
    unlink(log);
    const char *args[] = { "--listen", "127.0.0.1:0", "--token-file", tokens, NULL };
    pid_t pid = start_daemon_args(args);
    int port = daemon_tcp_port();
    CHECK(port > 0, "kvarcd logs its TCP port");
    kvc_conn *local, *anon = tcp_conn(port, NULL, NULL), *wrong = tcp_conn(port, "not-a-token-0000000", NULL),
                     *a = tcp_conn(port, TOK_A, NULL), *admin = tcp_conn(port, TOK_ADMIN, NULL);
    CHECK_RC(kvc_connect(dir, &local), 0);
    CHECK(local && anon && wrong && a && admin && wait_ready(local), "connections");
    if (tu_failures) {
        kill(pid, SIGKILL);
        return tu_finish("test_kvarcd_auth");
    }
    CHECK_RC(health(anon, msg), GRPC_STATUS_UNAUTHENTICATED);
    CHECK(strstr(msg, "no bearer token"), "missing token message: %s", msg);
    CHECK_RC(health(wrong, msg), GRPC_STATUS_UNAUTHENTICATED);
    CHECK(strstr(msg, "not one of"), "unknown token message: %s", msg);
    CHECK_RC(health(a, msg), GRPC_STATUS_OK);

    /* team-b holds data the scoped token must not see nor change */
    uint64_t idb = 0, ida = 0, len = 0;
    uint64_t pos[3] = { 0, 7, 19 };
    CHECK_RC(create(local, "team-b", "secret", 128, msg, &idb), GRPC_STATUS_OK);
    CHECK_RC(rpc_append(local, idb, 0, 0, 20, 5, 0, &len, msg), GRPC_STATUS_OK);
    CHECK_RC(create(a, "team-a", "mine", 128, msg, &ida), GRPC_STATUS_OK);
    CHECK_RC(rpc_append(a, ida, 0, 0, 20, 6, 0, &len, msg), GRPC_STATUS_OK);
    CHECK_RC(rpc_fetch_check(a, ida, 0, 1, pos, 3, 6, msg), 0);

    CHECK_RC(create(a, "team-b", "intruder", 128, msg, NULL), GRPC_STATUS_PERMISSION_DENIED);
    CHECK(strstr(msg, "not scoped to namespace 'team-b'"), "create message: %s", msg);
    CHECK_RC(open_conv(a, "team-b", "secret", NULL, msg), GRPC_STATUS_PERMISSION_DENIED);
    CHECK_RC(stat_id(a, idb, msg), GRPC_STATUS_NOT_FOUND);
    char unknown[256];
    CHECK_RC(stat_id(local, 999999, unknown), GRPC_STATUS_NOT_FOUND);
    char expect[256];
    snprintf(expect, sizeof expect, "conversation id %llu not found", (unsigned long long)idb);
    CHECK(strstr(msg, expect), "a foreign id reads like an unknown one: '%s' vs '%s'", msg, unknown);
    CHECK_RC(rpc_append(a, idb, 0, 20, 20, 9, 0, &len, msg), GRPC_STATUS_NOT_FOUND);
    CHECK_RC(rpc_fetch_check(a, idb, 0, 0, pos, 3, 5, msg), GRPC_STATUS_NOT_FOUND);
    CHECK_RC(fork_call(a, "Fork", "x", "y", msg), GRPC_STATUS_PERMISSION_DENIED);  /* fork_call uses ns "t" */
    int pages = 0;
    CHECK(list_all(a, "", 1, &pages) == 1, "the scoped token lists only team-a");
    CHECK(list_all(a, "team-b", 10, &pages) < 0, "listing team-b is refused");
    CHECK(list_all(admin, "", 1, &pages) == 2 && pages >= 2, "the admin token lists both, paged");
    CHECK(list_all(local, "", 10, &pages) == 2, "the local socket lists both");
    CHECK_RC(simple(a, "Stats", &kvarc__v1__stats_reply__descriptor, msg), GRPC_STATUS_PERMISSION_DENIED);
    CHECK(strstr(msg, "whole archive"), "stats message: %s", msg);
    {
        Kvarc__V1__Empty e0 = KVARC__V1__EMPTY__INIT;
        Kvarc__V1__JobEvent *ev = NULL;
        CHECK_RC(kvc_job(a, "Verify", &e0.base, 0, NULL, NULL, &ev, msg, sizeof msg), GRPC_STATUS_PERMISSION_DENIED);
    }
    CHECK_RC(simple(admin, "Stats", &kvarc__v1__stats_reply__descriptor, msg), GRPC_STATUS_OK);
    CHECK_RC(stat_id(admin, idb, msg), GRPC_STATUS_OK);
    /* team-b's data is as it was: its bytes, and nothing past its 20 tokens */
    CHECK_RC(rpc_fetch_check(local, idb, 0, 0, pos, 3, 5, msg), 0);
    uint64_t past = 20;
    CHECK_RC(rpc_fetch_check(local, idb, 0, 0, &past, 1, 5, msg), GRPC_STATUS_INVALID_ARGUMENT);

    /* the CLI over TCP */
    {
        char cmd[1200], out[4096];
        snprintf(cmd, sizeof cmd, "%s ls --connect 127.0.0.1:%d --token-file %s --json 2>&1", KD_CLI, port,
                 tokens);
        FILE *f = popen(cmd, "r");
        size_t n = f ? fread(out, 1, sizeof out - 1, f) : 0;
        out[n] = 0;
        int st = f ? pclose(f) : -1;
        /* the first token of the file is team-a's */
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0 && strstr(out, "mine") && !strstr(out, "secret"),
              "kvarc ls over TCP: %s", out);
        snprintf(cmd, sizeof cmd, "%s stats --connect 127.0.0.1:%d --token-file %s 2>&1", KD_CLI, port,
                 tokens);
        f = popen(cmd, "r");
        n = f ? fread(out, 1, sizeof out - 1, f) : 0;
        out[n] = 0;
        st = f ? pclose(f) : -1;
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 1 && strstr(out, "PERMISSION_DENIED"), "kvarc stats scoped: %s", out);
    }
    /* SIGHUP reads the token file again: team-a's token goes, a new one comes, calls on open
     * connections are checked against the new set */
    CHECK_RC(write_file(tokens, TOK_NEW " *\n" TOK_ADMIN " *\n", 0600), 0);
    kill(pid, SIGHUP);
    CHECK(wait_log_lines("read again", 1, 30000), "kvarcd logs the token file read again");
    kvc_conn *fresh = tcp_conn(port, TOK_NEW, NULL);
    CHECK(fresh && health(fresh, msg) == GRPC_STATUS_OK, "the new token is taken after SIGHUP: %s", msg);
    CHECK(health(a, msg) == GRPC_STATUS_UNAUTHENTICATED && strstr(msg, "not one of"),
          "the removed token is refused after SIGHUP, on its open connection: %s", msg);
    CHECK_RC(health(admin, msg), GRPC_STATUS_OK);
    /* a token file that does not load keeps the tokens in force, and the log says why */
    CHECK_RC(write_file(tokens, TOK_A " team-a\nshort *\n", 0600), 0);
    kill(pid, SIGHUP);
    CHECK(wait_log_lines("stay in force", 1, 30000), "kvarcd logs why the new file was not taken");
    CHECK(fresh && health(fresh, msg) == GRPC_STATUS_OK, "the tokens read before stay after a bad file: %s", msg);
    CHECK(health(a, msg) == GRPC_STATUS_UNAUTHENTICATED, "nothing of the bad file was taken: %s", msg);
    CHECK_RC(write_file(tokens, "# test tokens\n" TOK_A " team-a\n" TOK_ADMIN " *  # admin\n", 0600), 0);
    if (fresh)
        kvc_close(fresh);
    CHECK_RC(health(local, msg), GRPC_STATUS_OK);     /* still up */
    kvc_close(anon);
    kvc_close(wrong);
    kvc_close(a);
    kvc_close(admin);
    kvc_close(local);
    stop(pid);

    /* TLS with a self-signed certificate for localhost */
    char cert[300], key[300], other[300], okey[300], cmd[1600];
    snprintf(cert, sizeof cert, "%s.crt", dir);
    snprintf(key, sizeof key, "%s.key", dir);
    snprintf(other, sizeof other, "%s.other.crt", dir);
    snprintf(okey, sizeof okey, "%s.other.key", dir);
    snprintf(cmd, sizeof cmd,
             "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost "
             "-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout %s -out %s 2>/dev/null && "
             "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost "
             "-addext subjectAltName=DNS:localhost -keyout %s -out %s 2>/dev/null",
             key, cert, okey, other);
    if (system(cmd) != 0) {
        fprintf(stderr, "test_kvarcd_auth: openssl could not make a certificate; TLS part skipped\n");
        return tu_failures ? tu_finish("test_kvarcd_auth") : 77;
    }
    unlink(log);
    const char *tls[] = { "--listen", "127.0.0.1:0", "--token-file", tokens, "--tls-cert", cert, "--tls-key", key,
                          NULL };
    pid = start_daemon_args(tls);
    port = daemon_tcp_port();
    CHECK(port > 0, "kvarcd with TLS logs its TCP port");
    kvc_conn *t = tcp_conn(port, TOK_A, cert), *plain = tcp_conn(port, TOK_A, NULL),
             *untrusted = tcp_conn(port, TOK_A, other), *tanon = tcp_conn(port, NULL, cert);
    CHECK(t && plain && untrusted && tanon, "TLS connections");
    int ok = 0;
    for (long end = kd_now_ms() + 30000; !ok && kd_now_ms() < end;) {   /* until it serves */
        ok = health(t, msg) == GRPC_STATUS_OK;
        if (!ok)
            kd_sleep_ms(50);
    }
    CHECK(ok, "Health over TLS with the token: %s", msg);
    CHECK_RC(open_conv(t, "team-a", "mine", NULL, msg), GRPC_STATUS_OK);
    CHECK_RC(health(tanon, msg), GRPC_STATUS_UNAUTHENTICATED);
    CHECK(health(plain, msg) == GRPC_STATUS_UNAVAILABLE, "plaintext to the TLS port fails: %s", msg);
    CHECK(health(untrusted, msg) == GRPC_STATUS_UNAVAILABLE, "an untrusted certificate fails: %s", msg);
    kvc_close(t);
    kvc_close(plain);
    kvc_close(untrusted);
    kvc_close(tanon);
    stop(pid);
    if (!tu_failures && !getenv("KEEP")) {     /* the data directory and its side files */
        const char *side[] = { "log", "tokens", "loose", "bad", "crt", "key", "other.crt", "other.key" };
        for (size_t i = 0; i < sizeof side / sizeof *side; i++) {
            char p[320];
            snprintf(p, sizeof p, "%s.%s", dir, side[i]);
            unlink(p);
        }
        eu_rmrf(dir);
    }
    return tu_finish("test_kvarcd_auth");
}
