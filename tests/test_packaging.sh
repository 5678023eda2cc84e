#!/usr/bin/env bash
# test_packaging.sh BUILD_DIR UNITDIR SYSUSERSDIR MANDIR DOCDIR: what an admin
# installs beside the binaries (packaging/CMakeLists.txt), installed into a
# staging directory (DESTDIR: never the real system, whatever the directories):
#  - kvarcd.service, sysusers.d/kvarc.conf, kvarc.1, kvarcd.8 and kvarcd.env
#    where the build's settings say;
#  - the unit's ExecStart names the installed kvarcd, with only options that
#    kvarcd --help lists (kvarcd.env's examples too);
#  - systemd-analyze verify accepts the unit, systemd-sysusers creates the
#    user (each skipped, saying so, where the tool is missing);
#  - the man pages render without warnings (groff, man or mandoc; skipped
#    where none is installed);
#  - no drift: every option kvarcd --help lists is an entry of kvarcd.8's
#    OPTIONS; every command kvarc --help lists is an entry of kvarc.1's
#    COMMANDS, with every option its `kvarc help COMMAND` usage names; every
#    connection option of kvarc --help is an entry of CONNECTION OPTIONS.
# The directories are the build's (relative: under the prefix).
set -euo pipefail
build=$1
unitdir=$2
sysusersdir=$3
mandir=$4
docdir=$5
here=$(cd "$(dirname "$0")" && pwd)
. "$here/kvarcd_util.sh"
kd_init

# Stage under $tmp/dest with the prefix $tmp/prefix; $tmp/prefix then points at
# the staged tree, so the absolute paths written into the unit resolve.
prefix=$tmp/prefix
DESTDIR=$tmp/dest cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1 ||
    { cat "$tmp/install.log"; fail "cmake --install"; }
ln -s "$tmp/dest$prefix" "$prefix"
under() {   # under DIR: DIR as installed (relative: under the prefix), in the staged tree
    case "$1" in /*) echo "$tmp/dest$1" ;; *) echo "$prefix/$1" ;; esac
}
unit=$(under "$unitdir")/kvarcd.service
sysusers=$(under "$sysusersdir")/kvarc.conf
man1=$(under "$mandir")/man1/kvarc.1
man8=$(under "$mandir")/man8/kvarcd.8
envfile=$(under "$docdir")/kvarcd.env
for f in "$unit" "$sysusers" "$man1" "$man8" "$envfile" "$prefix/bin/kvarcd" "$prefix/bin/kvarc"; do
    [ -f "$f" ] || fail "cmake --install did not place $f"
done
kvarcd=$prefix/bin/kvarcd
kvarc=$prefix/bin/kvarc
checked=()

# ---- the unit ---------------------------------------------------------------
if grep -nE '@[A-Za-z_]+@' "$unit"; then fail "$unit keeps an unsubstituted @VAR@"; fi
[ "$(grep -c '^ExecStart=' "$unit")" = 1 ] || fail "$unit: not exactly one ExecStart="
read -r -a exec <<<"$(sed -n 's/^ExecStart=//p' "$unit")"
[ "${exec[0]}" = "$kvarcd" ] || fail "ExecStart runs '${exec[0]}', not the installed $kvarcd"
[ -x "${exec[0]}" ] || fail "ExecStart's ${exec[0]} is not executable"
kd_opts=$("$kvarcd" --help | grep -oE -- '--[a-z][a-z-]*' | sort -u)
[ "$(echo "$kd_opts" | wc -l)" -ge 8 ] || fail "kvarcd --help lists only: $kd_opts"
known_opt() {   # known_opt WHERE OPT: OPT is one kvarcd --help lists
    grep -qx -- "$2" <<<"$kd_opts" || fail "$1 gives kvarcd '$2', which kvarcd --help does not list"
}
for w in "${exec[@]:1}"; do
    case "$w" in --*) known_opt "ExecStart" "$w" ;; esac
done
for o in $(grep -oE -- '--[a-z][a-z-]*' "$envfile" | sort -u); do known_opt "$envfile" "$o"; done
for key in 'ExecReload=/bin/kill -HUP $MAINPID' 'KillSignal=SIGTERM' 'Restart=on-failure' 'User=kvarc' \
           'StateDirectory=kvarc' 'MemoryDenyWriteExecute=yes'; do
    grep -qxF -- "$key" "$unit" || fail "$unit lacks '$key'"
done
# the stop timeout outlasts kvarcd's default grace (--grace-ms 5000)
stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' "$unit")
[ -n "$stop" ] && [ "$stop" -gt 5 ] || fail "TimeoutStopSec='$stop' s does not outlast kvarcd's 5 s grace"
# kvarcd reads through io_uring: the syscall filter must let it
filter=$(sed -n 's/^SystemCallFilter=\([^~].*\)/\1/p' "$unit")
for sc in io_uring_setup io_uring_enter io_uring_register; do
    allowed=0
    for g in $filter; do
        if [ "$g" = "$sc" ]; then
            allowed=1
        elif [ "${g#@}" != "$g" ] && command -v systemd-analyze >/dev/null &&
             systemd-analyze syscall-filter "$g" 2>/dev/null | grep -qx "  *$sc"; then
            allowed=1
        fi
    done
    [ $allowed = 1 ] || fail "SystemCallFilter= ($filter) does not allow $sc"
    for g in $(sed -n 's/^SystemCallFilter=~//p' "$unit"); do
        [ "$g" != "$sc" ] || fail "SystemCallFilter=~ denies $sc"
        if [ "${g#@}" != "$g" ] && command -v systemd-analyze >/dev/null &&
           systemd-analyze syscall-filter "$g" 2>/dev/null | grep -qx "  *$sc"; then
            fail "SystemCallFilter=~$g denies $sc"
        fi
    done
done
checked+=("unit")

if command -v systemd-analyze >/dev/null; then
    # Documentation=man:kvarcd(8) is checked with man(1), on the staged pages;
    # a warning about kvarcd.service fails too (not one about the host's units)
    manopt=--man=yes
    command -v man >/dev/null || manopt=--man=no
    if ! MANPATH=$(under "$mandir") systemd-analyze verify "$manopt" "$unit" >"$tmp/verify.log" 2>&1 ||
       grep -q 'kvarcd\.service' "$tmp/verify.log"; then
        cat "$tmp/verify.log" >&2
        fail "systemd-analyze verify $unit"
    fi
    checked+=("systemd-analyze verify $manopt")
else
    echo "test_packaging: no systemd-analyze here: the unit is not verified by systemd (the rest is checked)"
fi
if command -v systemd-sysusers >/dev/null; then
    mkdir -p "$tmp/root/etc"
    systemd-sysusers --root="$tmp/root" "$sysusers" >"$tmp/sysusers.log" 2>&1 ||
        { cat "$tmp/sysusers.log" >&2; fail "systemd-sysusers $sysusers"; }
    grep -q '^kvarc:x:[0-9]*:[0-9]*:[^:]*:/var/lib/kvarc:' "$tmp/root/etc/passwd" ||
        fail "systemd-sysusers did not create kvarc with home /var/lib/kvarc: $(cat "$tmp/root/etc/passwd")"
    grep -q '^kvarc:' "$tmp/root/etc/group" || fail "systemd-sysusers did not create the group kvarc"
    checked+=("systemd-sysusers")
else
    echo "test_packaging: no systemd-sysusers here: $sysusers is not tried"
fi

# ---- the man pages render without warnings ---------------------------------
rendered=
for page in "$man1" "$man8"; do
    if command -v groff >/dev/null; then
        out=$(groff -man -ww -z "$page" 2>&1) || fail "groff -man -ww $page: $out"
        [ -z "$out" ] || fail "groff -man -ww warns on $page: $out"
        rendered="groff"
    fi
    if command -v man >/dev/null; then
        out=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -E UTF-8 -l "$page" 2>&1 >/dev/null) ||
            fail "man -l $page: $out"
        [ -z "$out" ] || fail "man --warnings warns on $page: $out"
        rendered="$rendered${rendered:+, }man"
    elif [ -z "$rendered" ] && command -v mandoc >/dev/null; then
        out=$(mandoc -Tlint -Wwarning "$page" 2>&1) || fail "mandoc -Tlint $page: $out"
        rendered="mandoc"
    fi
done
if [ -n "$rendered" ]; then
    checked+=("man pages render ($rendered)")
else
    echo "test_packaging: no groff, man or mandoc here: the man pages are not rendered (their contents are checked)"
fi

# ---- no drift between --help and the man pages ------------------------------
# section PAGE NAME: the roff source of section NAME (.SH NAME up to the next .SH)
section() {
    awk -v name="$2" '/^\.SH /{ s = $0; sub(/^\.SH +"?/, "", s); sub(/"$/, "", s); on = (s == name); next } on' "$1"
}
# tags: the tag lines (the line after each .TP) of roff on stdin, as plain text
tags() {
    awk 'tp { print; tp = 0; next } /^\.TP/ { tp = 1 }' |
        sed -E -e 's/\\f[BIRP]//g' -e 's/\\-/-/g' -e 's/^\.(B|I|BI|IB|BR|RB|IR|RI) +//' -e 's/"//g' -e 's/\\c$//'
}
has_opt() {   # has_opt OPT: OPT is a whole word of stdin
    grep -qE -- "(^|[^a-z-])$1([^a-z-]|$)"
}
opts8=$(section "$man8" OPTIONS | tags)
for o in $kd_opts; do
    has_opt "$o" <<<"$opts8" || fail "kvarcd --help lists $o, which kvarcd.8's OPTIONS does not describe"
done
for s in SIGTERM SIGHUP KVARC_DATA kvarcd.sock; do
    grep -q "$s" "$man8" || fail "kvarcd.8 does not mention $s"
done

cmds1=$(section "$man1" COMMANDS | tags)
conn1=$(section "$man1" "CONNECTION OPTIONS" | tags)
# the commands: the first word of each '|'-separated piece of the lines indented by two spaces
listed=$("$kvarc" --help | grep -E '^  [a-z]' | tr '|' '\n' | awk '{ print $1 }' | sort -u)
[ "$(echo "$listed" | wc -l)" -ge 15 ] || fail "kvarc --help lists only: $listed"
for c in $listed; do
    entry=$(grep -E "^$c( |$)" <<<"$cmds1") || fail "kvarc --help lists '$c', which kvarc.1's COMMANDS does not describe"
    usage=$("$kvarc" help "$c" | head -2) || fail "kvarc help $c"
    for o in $(grep -oE -- '--[a-z][a-z-]*' <<<"$usage" | sort -u); do
        has_opt "$o" <<<"$entry" || fail "kvarc help $c names $o, which kvarc.1's entry for $c ('$entry') lacks"
    done
done
# the connection options: those of the paragraph of kvarc --help that introduces them
conn=$("$kvarc" --help | sed -n '/^commands that talk to a running kvarcd/,/^  /p' | grep -oE -- '--[a-z][a-z-]*' | sort -u)
[ "$(echo "$conn" | wc -l)" -ge 6 ] || fail "found only these connection options in kvarc --help: $conn"
for o in $conn; do
    has_opt "$o" <<<"$conn1" || fail "kvarc --help names the connection option $o, which kvarc.1 does not describe"
done
for s in KVARC_DATA KVARC_TOKEN_FILE; do
    grep -q "$s" "$man1" || fail "kvarc.1 does not mention $s"
done
checked+=("$(echo "$kd_opts" | wc -l) kvarcd options and $(echo "$listed" | wc -l) kvarc commands documented")

echo "test_packaging: $(IFS=';'; echo "${checked[*]}" | sed 's/;/; /g')"
