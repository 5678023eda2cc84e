#!/usr/bin/env bash
# test_install.sh: `pip install ./python` into a fresh directory (no network, no
# compiler: the package is pure Python over libkvarc.so), then the installed
# package, and not the source tree, creates a conversation on a real kvarcd.
# Skips (77) where pip or numpy is missing.
set -euo pipefail
src=$(cd "$(dirname "$0")/../../python" && pwd)
py=/usr/bin/python3
$py -m pip --version >/dev/null 2>&1 || { echo "pip is missing: skipped"; exit 77; }
$py -c "import numpy" 2>/dev/null || { echo "numpy is missing: skipped"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r "$src" "$tmp/src"                      # setuptools writes build/ and *.egg-info beside the sources
$py -m pip install --quiet --no-build-isolation --no-deps --no-index --target "$tmp/site" "$tmp/src" 2>&1 |
    grep -v "Running pip as the 'root' user" || true
[ -f "$tmp/site/kvarc/__init__.py" ] || { echo "FAIL: pip did not install kvarc into $tmp/site"; exit 1; }
cd "$tmp"
PYTHONPATH="$tmp/site" $py - <<'PY'
import numpy as np
import kvarc, kvarc.daemon
assert kvarc.__file__.startswith(__import__("os").getcwd()), kvarc.__file__
with kvarc.daemon.Kvarcd() as kd, kvarc.Client(kd.data) as cl:
    m = kvarc.Model(n_layers=1, n_kv_heads=2, n_q_heads=4, head_dim=64)
    with cl.create("pip", "c", m, format="f16", hot_window=64, batch=32) as c:
        x = np.ones((2, 100, 64), np.float32)
        c.append(0, x, x)
        out = c.attend(0, np.ones((4, 1, 64), np.float32))
        assert np.allclose(out, 1.0), out
        assert c.stats().archived == 96, c.stats()
print("python_install: pip-installed kvarc", kvarc.__version__, "from", kvarc.__file__, "on", kvarc._lib.lib.path)
PY
