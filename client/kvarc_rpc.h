/* kvarc_rpc.h - the C client transport to kvarcd (unary calls, blocking or
 * in two halves; streams).
 *
 * Used by libkvarc, the kvarc CLI and the tests. One kvc_conn holds one
 * gRPC channel; calls on it are thread-safe (each call has its own
 * completion queue). Messages are the protobuf-c types of proto/kvarc.proto.
 *
 * Return value of a call: the gRPC status code (0 = OK); on failure `msg`
 * holds the server's message (or the transport's). Replies are allocated
 * by protobuf-c: free them with protobuf_c_message_free_unpacked(m, NULL).
 */
#ifndef KVARC_RPC_H
#define KVARC_RPC_H

#include <stddef.h>
#include <stdint.h>

#include <grpc/status.h>

#include "kvarc.pb-c.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc_conn kvc_conn;

/* Connect to `target`: "unix:/path", "host:port", or a plain path to a
 * socket (a data directory works too: DIR/kvarcd.sock is used). Does not
 * wait for the server; the first call does. 0 or -errno. */
int  kvc_connect(const char *target, kvc_conn **out);
void kvc_close(kvc_conn *c);

/* The same over TCP to a kvarcd that wants a bearer token and perhaps TLS.
 * On failure msg (if given) says why. */
typedef struct kvc_options {
    const char *token;        /* sent as "authorization: Bearer TOKEN"; NULL: none */
    const char *tls_ca_file;  /* PEM to trust (a CA, or the server's self-signed
                                 certificate): TLS on; NULL: plaintext */
    const char *tls_name;     /* name to check in the server's certificate when it
                                 is not the target's host; NULL: the host */
} kvc_options;
int  kvc_connect_opts(const char *target, const kvc_options *o, kvc_conn **out, char *msg, size_t msglen);

/* Call `method` (e.g. "Health") with req; on OK *reply is the decoded
 * reply of type reply_desc. timeout_ms <= 0 means 30 s. */
int kvc_call(kvc_conn *c, const char *method, const ProtobufCMessage *req,
             const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
             int timeout_ms, char *msg, size_t msglen);

/* kvc_call in two halves, so that the caller can work while it is in
 * flight: start packs and sends the request (0, or a status with *out
 * NULL); finish waits for the reply and status (decoded as kvc_call
 * decodes them) and frees the pending call; every started call must be
 * finished. */
typedef struct kvc_pending kvc_pending;
int kvc_call_start(kvc_conn *c, const char *method, const ProtobufCMessage *req, int timeout_ms,
                   kvc_pending **out);
int kvc_call_finish(kvc_pending *pc, const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
                    char *msg, size_t msglen);

/* The same with raw request bytes and the raw reply bytes (malloc'ed into
 * *out, *out_len), for tests of malformed input. */
int kvc_call_raw(kvc_conn *c, const char *method, const void *req, size_t len, uint8_t **out,
                 size_t *out_len, int timeout_ms, char *msg, size_t msglen);

/* Client streaming (AppendStream): open, send messages (each <= 4 MiB),
 * then finish for the reply and status, or cancel. send returns 0, or
 * -EPIPE once the server has ended the call (finish then says why). */
typedef struct kvc_stream kvc_stream;
int  kvc_stream_open(kvc_conn *c, const char *method, int timeout_ms, kvc_stream **out);
int  kvc_stream_send(kvc_stream *s, const ProtobufCMessage *m);
int  kvc_stream_finish(kvc_stream *s, const ProtobufCMessageDescriptor *reply_desc,
                       ProtobufCMessage **reply, char *msg, size_t msglen);
void kvc_stream_cancel(kvc_stream *s);

/* Server streaming (LoadSignatures): open with the request, then next()
 * until it returns 0 (end) or a negative code, then finish for the status.
 * next() returns 1 with *m decoded (free it with
 * protobuf_c_message_free_unpacked). */
int kvc_sstream_open(kvc_conn *c, const char *method, const ProtobufCMessage *req, int timeout_ms,
                     kvc_stream **out);
int kvc_sstream_next(kvc_stream *s, const ProtobufCMessageDescriptor *desc, ProtobufCMessage **m);

/* A long whole-archive call (Verify, Compact): progress(arg, done, total)
 * for each progress event, then *last is the event carrying the result
 * (free it with protobuf_c_message_free_unpacked). Returns the status. */
int kvc_job(kvc_conn *c, const char *method, const ProtobufCMessage *req, int timeout_ms,
            void (*progress)(void *arg, uint64_t done, uint64_t total), void *arg,
            Kvarc__V1__JobEvent **last, char *msg, size_t msglen);

/* Name of a gRPC status code ("NOT_FOUND"). */
const char *kvc_status_name(int code);

#ifdef __cplusplus
}
#endif
#endif
