/* kvarc_admin.h - the CLI commands that talk to kvarcd (tools/kvarc_admin.c). */
#ifndef KVARC_ADMIN_H
#define KVARC_ADMIN_H

#include "kvarc_rpc.h"
#include "kvarc_schema.h"

/* Run admin command cmd with its arguments; the process exit code, or -1
 * if cmd is not an admin command. */
int kvarc_admin(const char *cmd, int argc, char **argv);

/* "NS/NAME" -> ns, name (pointers into buf, len bytes); 2 with a message
 * on stderr when full is not that. */
int kvarc_split_name(const char *full, char *buf, size_t len, char **ns, char **name);

/* Report a failed call (status, kvarcd's message) of command `what` to
 * target on stderr; the exit code: 3 when no kvarcd answers, else 1. */
int kvarc_admin_fail(int status, const char *what, const char *msg, const char *target);

/* `kvarc top` (tools/kvarc_top.c) on a connected kvarcd: a view every
 * interval seconds, count views (0: until interrupted). */
int kvarc_top(kvc_conn *k, const char *target, double interval, long count);

/* `kvarc export NS/NAME FILE` and `kvarc import FILE NS/NAME`
 * (tools/kvarc_transfer.c). section_bytes: data per layer section (0: kvarcd's default). */
int kvarc_export(kvc_conn *k, const char *target, const char *conv, const char *file, uint32_t section_bytes,
                 int json);
int kvarc_import(kvc_conn *k, const char *target, const char *file, const char *conv, int json);

/* `kvarc demo` (tools/kvarc_demo.c): the main job through libkvarc. */
int kvarc_demo(int argc, char **argv);

#endif
