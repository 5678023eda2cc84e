#!/usr/bin/env bash
# test_cli.sh KVARC KVARCD: the kvarc CLI's grammar against a real kvarcd.
#  - connection options before the command work as after it (the same answer);
#  - kvarc help COMMAND and kvarc COMMAND --help explain every command the usage lists;
#  - an unknown option or command, an option a command does not take: exit 2 with a message;
#  - kvarc --version and kvarcd --version give the same version and git revision.
set -euo pipefail
kvarc=$1
kvarcd=$2
. "$(dirname "$0")/kvarcd_util.sh"
kd_init

v1=$("$kvarc" --version) || fail "kvarc --version"
v2=$("$kvarcd" --version) || fail "kvarcd --version"
r1=$(echo "$v1" | sed -n 's/^kvarc \([^ ]*\) (git \([^;)]*\).*/\1 \2/p')
r2=$(echo "$v2" | sed -n 's/^kvarcd \([^ ]*\) (git \([^;)]*\).*/\1 \2/p')
[ -n "$r1" ] && [ "$r1" = "$r2" ] || fail "versions differ or lack a git revision: '$v1' / '$v2'"

kd_start "$kvarcd" "$tmp/data"

"$kvarc" --data "$tmp/data" health >/dev/null || fail "kvarc --data DIR health"
after=$("$kvarc" ls --data "$tmp/data" --json) || fail "kvarc ls --data DIR --json"
before=$("$kvarc" --data "$tmp/data" --json ls) || fail "kvarc --data DIR --json ls"
[ "$before" = "$after" ] || fail "options before and after the command answer differently: '$before' / '$after'"
mixed=$("$kvarc" --json stats --data "$tmp/data") || fail "kvarc --json stats --data DIR"
case "$mixed" in "{"*) ;; *) fail "--json before the command was not applied: $mixed" ;; esac
# the command's own option wins over the one before it: a wrong --data first, the right one after
"$kvarc" --data "$tmp/nowhere" health --data "$tmp/data" >/dev/null || fail "the later --data did not win"

all="demo selfcheck formats health stats ls stat inspect fork snapshot restore delete verify compact top export import rebuild-index"
# every command kvarc --help names (its usage lines, and the '|' lists) is one of them, and has help
listed=$("$kvarc" --help | sed -n '/^commands:/,/^exit codes/p' | grep -E '^  [a-z]' | tr '|' '\n' |
         sed -E 's/^ +//' | grep -oE '^[a-z-]+' | sort -u)
for c in $listed; do
    case " $all " in *" $c "*) ;; *) fail "kvarc --help lists '$c', which test_cli does not know" ;; esac
done
[ "$(echo "$listed" | wc -l)" -ge 18 ] || fail "kvarc --help lists only: $listed"
for c in $all; do
    h=$("$kvarc" help "$c") || fail "kvarc help $c"
    case "$h" in "usage: kvarc $c"*) ;; *) fail "kvarc help $c: '$h'" ;; esac
    [ "$("$kvarc" "$c" --help)" = "$h" ] || fail "kvarc $c --help differs from kvarc help $c"
done

expect2() {   # expect2 WORDS ARGS...: exit 2 and WORDS on stderr
    local words=$1; shift
    set +e
    "$kvarc" "$@" >/dev/null 2>"$tmp/err"
    local rc=$?
    set -e
    [ $rc -eq 2 ] || fail "kvarc $*: exit $rc, not 2"
    grep -q -- "$words" "$tmp/err" || fail "kvarc $*: '$(cat "$tmp/err")' does not say '$words'"
}
expect2 "unknown option '--bogus'" --bogus ls
expect2 "unknown command 'nosuch'" nosuch
expect2 "unknown command 'nosuch'" help nosuch
expect2 "--data does not apply" --data "$tmp/data" formats
expect2 "--socket does not apply" --socket "$tmp/data/kvarcd.sock" demo
expect2 "needs a value" --data
expect2 "give one data directory" --json rebuild-index       # --json taken before it, then its own check
echo "test_cli: options before and after the command, help for every command, $v1"
