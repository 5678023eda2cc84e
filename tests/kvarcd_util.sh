# kvarcd_util.sh - what the shell tests share (sourced): a temporary directory removed at exit,
# fail, and a kvarcd started on a data directory, waited for by its socket.
#   kd_init                 make $tmp, arrange its removal (and kvarcd's stop) at exit
#   fail WORDS              print FAIL: WORDS (and kvarcd's last log lines) and exit 1
#   kd_start KVARCD DIR     start KVARCD --data DIR (log $tmp/kvarcd.log) and wait until DIR/kvarcd.sock
#                           exists (kvarcd binds it once it serves) or kvarcd exits; a 60 s guard
kd_init() {
    tmp=$(mktemp -d)
    kd_pid=
    trap 'kd_cleanup' EXIT
}
kd_cleanup() {
    if [ -n "$kd_pid" ]; then
        kill "$kd_pid" 2>/dev/null && wait "$kd_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
fail() {
    echo "FAIL: $*" >&2
    [ -f "$tmp/kvarcd.log" ] && tail -5 "$tmp/kvarcd.log" >&2
    exit 1
}
kd_start() {
    mkdir -p "$2"
    "$1" --data "$2" --threads 2 2>"$tmp/kvarcd.log" &
    kd_pid=$!
    for _ in $(seq 1 600); do
        [ -S "$2/kvarcd.sock" ] && return 0
        kill -0 "$kd_pid" 2>/dev/null || fail "kvarcd ($1) exited while starting"
        sleep 0.1
    done
    fail "kvarcd ($1) never opened $2/kvarcd.sock"
}
