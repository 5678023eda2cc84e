/* daemon.h - start and stop a kvarcd from the tools (demo, benchmarks). */
#ifndef KVARC_TOOLS_DAEMON_H
#define KVARC_TOOLS_DAEMON_H

#include <stddef.h>
#include <sys/types.h>

/* The kvarcd to run: `given` if set; else the one beside this executable;
 * else ../storaged/kvarcd or ../../storaged/kvarcd from it (a build tree); else "kvarcd" (PATH). */
const char *kd_find_kvarcd(const char *given, char *buf, size_t len);

/* 1 if a kvarcd answers Health at target within timeout_ms. */
int kd_alive(const char *target, int timeout_ms);

/* Start `kvarcd --data dir` (stderr appended to log, or /dev/null) and
 * wait up to 30 s for it to answer. Call before this process makes any
 * gRPC channel of its own (gRPC must not cross a fork). 0, or -1 with msg. */
int kd_spawn(const char *kvarcd, const char *dir, const char *log, pid_t *pid, char *msg, size_t len);

/* SIGTERM and wait; its exit code (-1 if it died by a signal). */
int kd_stop(pid_t pid);

/* A benchmark's own kvarcd: its data directory (made by the tool) and
 * process (0: none yet). kd_run_end stops it and removes the directory;
 * it may run twice (an error path, then the normal end). tool names the
 * caller in its messages. */
typedef struct kd_run {
    char  dir[64];
    pid_t pid;
} kd_run;
void kd_run_end(kd_run *r, const char *tool);

#endif
