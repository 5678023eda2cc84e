#!/usr/bin/env bash
# test_install.sh BUILD_DIR [EXTRA_CFLAGS]: `cmake --install` the build into a
# fresh prefix and check what an engine's build would see there:
#  - bin/kvarcd, bin/kvarc, lib/libkvarc.so (SONAME libkvarc.so.0), the headers,
#    lib/pkgconfig/kvarc.pc;
#  - libkvarc.so exports kvarc_* only (no kvarc__* protobuf-c names, no internals);
#  - smoke.c, compiled with nothing but `pkg-config --cflags --libs kvarc`, runs
#    against the installed kvarcd.
# EXTRA_CFLAGS: the sanitizer flags of an ASan build (its libkvarc.so needs them).
set -euo pipefail
build=$1
extra=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../kvarcd_util.sh"
kd_init

cmake --install "$build" --prefix "$tmp/prefix" >"$tmp/install.log" || { cat "$tmp/install.log"; fail "cmake --install"; }
P=$tmp/prefix
libdir=$(dirname "$(find "$P" -name kvarc.pc)")/..
libdir=$(cd "$libdir" && pwd)
for f in "$P/bin/kvarcd" "$P/bin/kvarc" "$P/include/kvarc.h" "$P/include/kvarc_schema.h" "$libdir/libkvarc.so" \
         "$libdir/pkgconfig/kvarc.pc"; do
    [ -e "$f" ] || fail "cmake --install did not place $f"
done
soname=$(objdump -p "$libdir/libkvarc.so" | awk '/SONAME/{print $2}')
[ "$soname" = libkvarc.so.0 ] || fail "SONAME is '$soname', not libkvarc.so.0"
syms=$(nm -D --defined-only "$libdir/libkvarc.so" | awk '{sub(/@.*/, "", $3); print $3}')
bad=$(echo "$syms" |
      grep -v -E '^kvarc_[a-z]' | grep -v -E '^KVARC_0$' || true)
[ -z "$bad" ] || fail "libkvarc.so exports symbols outside kvarc_*: $(echo $bad | head -c 400)"
# every function the installed headers declare (but static inline ones) is there
declared=$(cat "$P/include/kvarc.h" "$P/include/kvarc_schema.h" | grep -v 'static inline' |
           grep -oE '\bkvarc_[a-z0-9_]+\(' | tr -d '(' | sort -u)
[ "$(echo "$declared" | wc -l)" -ge 40 ] || fail "found only $(echo "$declared" | wc -l) declarations in the headers"
for f in $declared; do
    grep -qx -- "$f" <<<"$syms" || fail "libkvarc.so does not export $f, which the installed headers declare"
done

export PKG_CONFIG_PATH="$libdir/pkgconfig"
flags=$(pkg-config --cflags --libs kvarc) || fail "pkg-config kvarc"
# shellcheck disable=SC2086
cc -std=c11 -Wall -Wextra -Werror $extra -o "$tmp/smoke" "$here/smoke.c" $flags -lm || fail "building smoke.c with '$flags'"

kd_start "$P/bin/kvarcd" "$tmp/data"
LD_LIBRARY_PATH="$libdir" "$tmp/smoke" "$tmp/data" || fail "smoke against the installed kvarcd"
v1=$("$P/bin/kvarcd" --version)
echo "test_install: $soname, $(echo "$syms" | grep -c '^kvarc_') exports, $v1"
