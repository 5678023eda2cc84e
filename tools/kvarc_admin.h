/* kvarc_admin.h - the CLI commands that talk to kvarcd (tools/kvarc_admin.c). */
#ifndef KVARC_ADMIN_H
#define KVARC_ADMIN_H

#include "kvarc_schema.h"

/* Run admin command cmd with its arguments; the process exit code, or -1
 * if cmd is not an admin command. */
int kvarc_admin(const char *cmd, int argc, char **argv);

/* `kvarc demo` (tools/kvarc_demo.c): the main job through libkvarc. */
int kvarc_demo(int argc, char **argv);

#endif
