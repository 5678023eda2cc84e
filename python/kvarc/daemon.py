"""kvarc.daemon - start a kvarcd of your own (tests, tools, a single-host setup).

    with kvarc.daemon.Kvarcd("/tmp/kv") as kd:        # kvarcd --data /tmp/kv, until the block ends
        with kvarc.Client(kd.data) as cl: ...

Which kvarcd: the kvarcd argument, else $KVARCD_PATH, else `kvarcd` on
PATH, else the build tree's (../build/storaged/kvarcd beside this package).
Start waits for kvarcd's socket to accept a connection (or for kvarcd to
exit, which raises with its log's last lines); stop sends SIGTERM and
waits for the exit. Start it before the process opens a kvarc.Client
(gRPC's rule: no fork after a channel exists).
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from ._errors import Error


def find_kvarcd(given=None):
    """The kvarcd binary to run (see the module's docstring)."""
    for cand in (given, os.environ.get("KVARCD_PATH")):
        if cand:
            return cand
    found = shutil.which("kvarcd")
    if found:
        return found
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for b in ("build", "build-release", "build-rel"):
        p = os.path.join(root, b, "storaged", "kvarcd")
        if os.access(p, os.X_OK):
            return p
    raise Error("no kvarcd found: pass kvarcd=PATH, set KVARCD_PATH, or put kvarcd on PATH")


class Kvarcd:
    """A kvarcd process on data (a new temporary directory, removed at stop, when None)."""

    def __init__(self, data=None, kvarcd=None, args=(), timeout=60.0):
        self.binary = find_kvarcd(kvarcd)
        self._tmp = None if data else tempfile.mkdtemp(prefix="kvarcd-")
        self.data = data or self._tmp
        self.socket = os.path.join(self.data, "kvarcd.sock")
        self.log = self.data.rstrip("/") + ".log"
        self.args, self.timeout, self.proc = list(args), timeout, None

    def start(self):
        os.makedirs(self.data, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "--data", self.data] + self.args, stdout=subprocess.DEVNULL,
                                         stderr=log, start_new_session=True)
        deadline = time.monotonic() + self.timeout    # a failure guard, not a pace: the loop ends on the socket
        while True:
            if self.proc.poll() is not None:
                raise Error(f"kvarcd exited with {self.proc.returncode} while starting on {self.data}: "
                            f"{self._log_tail()}")
            if os.path.exists(self.socket):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(self.socket)
                    return self
                except OSError:
                    pass
                finally:
                    s.close()
            if time.monotonic() > deadline:
                self.kill()
                raise Error(f"kvarcd did not open {self.socket} within {self.timeout:.0f} s: {self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self):
        try:
            with open(self.log, "rb") as f:
                return " | ".join(f.read().decode(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    def stop(self):
        """SIGTERM, wait for the exit; the exit code (removes a temporary data directory)."""
        rc = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            rc = self.proc.wait()
        elif self.proc:
            rc = self.proc.returncode
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            try:
                os.unlink(self.log)
            except OSError:
                pass
            self._tmp = None
        return rc

    def kill(self):
        """SIGKILL (a crash), wait for it."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
