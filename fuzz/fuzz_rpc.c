/* fuzz_rpc - every kvarcd method's request, decoded, validated and
 * handled in process exactly as kvarcd's call machine runs it for a local
 * caller (rpc_call_local: decode + string checks + the handler; jobs
 * inline, a client stream's one message then its close, a server stream to
 * its end), on a real engine with conversations fz/a, fz/b, fz/c (ids 1..3).
 *
 * Input: byte 0 picks the method (rpc_methods[b % rpc_nmethods]), the rest
 * is the request message. The engine changes as the requests do (appends,
 * forks, deletes): it is thrown away and made again every RESET inputs,
 * which bounds its growth and brings back what deletes took. A crash may
 * so depend on the inputs before it; libFuzzer's reproducer replays the
 * one input on a fresh engine, and the campaigns so far found none that
 * needed history. */
#include <grpc/grpc.h>
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "rpc_call.h"

enum { RESET = 2000 };

static char       dir[256];
static kvd_engine *eng;
static rpc_local  *loc;
static unsigned   runs;

static void engine_up(void)
{
    kvd_err err;
    fz_tmpdir(dir, sizeof dir, "rpc");
    eng = fz_engine(dir);
    if (rpc_local_open(eng, &loc, &err))
        fz_die("rpc_local_open", err.msg);
}

static void engine_down(void)
{
    rpc_local_close(loc);
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
    grpc_init();
    engine_up();
    atexit(at_exit);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (++runs % RESET == 0) {
        engine_down();
        engine_up();
    }
    const rpc_method *m = &rpc_methods[data[0] % rpc_nmethods];
    grpc_byte_buffer *out = NULL;
    kvd_err err;
    int rc = rpc_call_local(loc, m, data + 1, size - 1, &out, &err);
    if (rc == 0 && !out && m->kind != RPC_SERVER_STREAM)
        abort();                         /* OK must come with a reply */
    if (rc && out)
        abort();                         /* a failed call has none */
    if (out)
        grpc_byte_buffer_destroy(out);
    return 0;
}
