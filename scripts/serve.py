"""Serve chatproject.asgi with N daphne processes on one port (what `make run` runs). Stdlib only, but
for the application it imports to fork the workers from.

    .venv/bin/python scripts/serve.py [--host 127.0.0.1] [--port 8000] [--workers N] [-- DAPHNE_OPTION...]

Every worker gets DAPHNE_ARGS below, then the options after `--` (a later option wins): the one
list of daphne flags, used by `make run` (whose DAPHNE_ARGS variable adds to them) and bench/run.py.

--workers defaults to the number of usable cores when REDIS_URL is set, else 1: the in-process
channel layer cannot deliver a message across processes, so several workers without REDIS_URL are
refused. Only whether REDIS_URL is set is looked at here; the service itself reads its
configuration in chatproject/settings.py.

One worker: this process becomes daphne (exec), bound by daphne itself, as `daphne -b HOST -p PORT`
(the command `make run` always ran) with daphne's imports made faster (DAPHNE_MAIN below). There is
no start to share.

Several workers: the launcher binds one listening socket per worker, all on HOST:PORT with
SO_REUSEPORT. The kernel spreads new connections over the sockets by their address hash. One socket
shared by every worker would also work, but Twisted accepts up to 100 pending connections per
wake-up, so under a burst (a reconnect storm) whichever worker wakes first takes most of them;
separate queues keep the split even. The port is bound before anything else, so a port in use fails
here, once, with its reason, and clients that connect during the start wait in the listen queues.
Then the launcher imports the application (chatproject/application.py: Django, the app, their
libraries, most of a worker's start) once, and forks each worker from itself: a worker starts in a
fraction of the time (it imports daphne's server, which makes its own event loop and Twisted
reactor, and serves its socket with `daphne --fd N`), the workers share the launcher's memory pages
until they write to them, and a bad setting stops the launcher once, before any worker exists. So
that the fork is safe, importing the application starts no thread (checked before the fork) and
makes no event loop, and the launcher closes the database connections before it forks. A worker's
command line is the launcher's; its process name is `daphne-worker`.

The workers share one fresh PROMETHEUS_MULTIPROC_DIR (created here, removed at exit; an operator's
own value is kept) so /metrics on any worker sums all of them. SIGTERM and SIGINT are passed on to
every worker; the launcher exits when they have. A worker that exits on its own is not restarted:
the launcher logs it, stops the others and exits non-zero, so the supervisor above (systemd,
Kubernetes, a shell loop) restarts the whole set with a fresh metrics directory and one restart
policy, instead of two nested ones hiding each other's crash loops.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = "chatproject.asgi:application"
STOP_TIMEOUT = 30.0  # seconds a worker gets to close its sockets after SIGTERM before SIGKILL
# daphne caps frames in and out: inbound frames over 1 MiB get an error frame from the consumer and
# the transport cuts at the cap (close 1009); the service reads the same CHAT_MAX_FRAME_BYTES (same
# default as chatproject/settings.py) and never hands daphne a larger frame.
MAX_FRAME_BYTES = os.environ.get("CHAT_MAX_FRAME_BYTES") or "2097152"
DAPHNE_ARGS = ["--websocket-max-message-size", MAX_FRAME_BYTES, "--websocket-max-frame-size", MAX_FRAME_BYTES]
LISTEN_BACKLOG = 1024  # per worker; daphne binding itself uses Twisted's 50
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}  # passed on to every worker


def log(text: str) -> None:
    print(f"[serve {os.getpid()}] {text}", file=sys.stderr, flush=True)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def redis_configured() -> bool:
    return bool(os.environ.get("REDIS_URL", "").strip())


def default_workers() -> int:
    return usable_cores() if redis_configured() else 1


# The one worker imports daphne (Twisted, autobahn) with the garbage collector off, then freezes
# what that made and turns the collector on again: 0.17 s of its start, which a restart's clients
# wait for. chatproject/application.py does the same around the application's own imports.
DAPHNE_IMPORT = "import gc, sys; gc.disable(); import daphne.cli; gc.freeze(); gc.enable()"
# daphne's command line after that import (`daphne` in its usage and error messages).
DAPHNE_MAIN = f"{DAPHNE_IMPORT}; sys.argv[0] = 'daphne'; daphne.cli.CommandLineInterface.entrypoint()"


def daphne_command() -> list[str]:
    return [sys.executable, "-c", DAPHNE_MAIN]


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on host:port: a SO_REUSEPORT group, or one socket shared by all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET6:
        # Twisted adopts inherited descriptors as AF_INET only (daphne's --fd has no family option).
        raise SystemExit(f"serve: several workers need an IPv4 HOST, not {host!r}")
    reuseport = hasattr(socket, "SO_REUSEPORT")
    sockets = []
    for _ in range(count if reuseport else 1):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted does for its own ports
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            for s in sockets + [sock]:
                s.close()
            raise SystemExit(f"serve: cannot bind {host}:{port}: {error.strerror}")
        sock.listen(LISTEN_BACKLOG)
        sockets.append(sock)
    return sockets if reuseport else sockets * count


def _become_worker(launcher: int) -> None:
    """In a process just forked from the launcher: its own process group (a terminal's Ctrl-C
    reaches the launcher, which passes it on once); SIGTERM when the launcher dies, even by
    SIGKILL (Linux), and exit at once if it died before that could be asked; the name
    `daphne-worker` (what `ps -C`, `pgrep` and `top` show: its command line is the launcher's);
    the default handling of the stop signals until daphne installs its own."""
    os.setpgid(0, 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        libc.prctl(15, b"daphne-worker")  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
    if os.getppid() != launcher:
        os._exit(1)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def serve_without_wakeup_preemption() -> None:
    """Serve under SCHED_BATCH (Linux, sched(7)) unless the launcher was started under a policy of
    the operator's own (chrt, systemd's CPUSchedulingPolicy), which it keeps. Set on the launcher's
    one thread, it is inherited by every worker, forked or exec'd, and every thread they start.

    A worker's threads share one GIL and wake each other all the time: the event loop hands a pool
    thread a batch to commit or handshakes to authenticate, and the pool thread wakes the loop with
    the result. Under the default policy, on busy cores, the woken thread may preempt the one that
    woke it, which still holds the GIL, only to block on that GIL at once: two context switches for
    nothing, and the holder back in the run queue (a profile of a reconnect storm had 6 % of the
    workers' samples on the line of `ThreadPoolExecutor.submit` that wakes a pool thread). A woken
    SCHED_BATCH thread does not preempt: it runs when the running thread blocks (as the loop soon
    does) or has used its slice. The CPU share is unchanged (the same nice value, the same cgroup
    weight); the cost is that the workers' threads, woken by the network too, no longer preempt
    other processes either (docs/performance.md, the scheduling round). No privilege is needed;
    where the call is refused (a sandbox's filter, a libc without it), serve as before."""
    if not hasattr(os, "SCHED_BATCH"):
        return
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as error:
        log(f"scheduling policy left as it was: {error.strerror}")


def preload_application() -> None:
    """Import the application in the launcher, to fork the workers from (chatproject/application.py)."""
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    gc.disable()  # (the application freezes what its imports made and turns it on again)
    import chatproject.application  # noqa: F401

    if threading.active_count() != 1:  # a thread would not exist in the workers, whatever it holds
        raise SystemExit(f"serve: importing the application started threads: {threading.enumerate()}")
    from django.db import connections

    connections.close_all()  # the system checks may have opened one; each worker opens its own


def serve_forked(sock: socket.socket, sockets: list[socket.socket], daphne_args: list[str]) -> int:
    """In a worker just forked: daphne on `sock` (the other workers' sockets closed). Importing
    daphne's server makes this worker's event loop and installs Twisted's reactor on it."""
    for other in set(sockets) - {sock}:
        other.close()
    gc.disable()  # (chatproject/asgi.py freezes what daphne's imports made and turns it on again)
    import daphne.cli

    sys.argv = ["daphne", *daphne_args, "--fd", str(sock.fileno()), APPLICATION]
    daphne.cli.CommandLineInterface.entrypoint()
    return 0


class ForkedWorker:
    """A worker process forked by the launcher, with what it uses of subprocess.Popen's interface."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None  # as Popen's: -N when killed by signal N

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    def __init__(self, host: str, port: int, workers: int, daphne_args: list[str]) -> None:
        self.host, self.port, self.workers, self.daphne_args = host, port, workers, daphne_args
        self.children: list[ForkedWorker] = []
        self.stopping: int | None = None  # the stop signal, once one arrived
        self.to_forward: list[int] = []  # stop signals received and not yet passed on to the workers
        self.crashed: ForkedWorker | None = None
        self.metrics_dir: str | None = None

    def run(self) -> int:
        """Start the workers and supervise them; the launcher's exit status. In a worker (forked
        here), daphne's: a worker returns from here to exit as any Python program does (its exit
        hooks run), with nothing of the launcher's clean-up pending."""
        sockets = listening_sockets(self.host, self.port, self.workers)
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip():
            self.metrics_dir = tempfile.mkdtemp(prefix="chat-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir  # before the application reads it
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.stop_signalled)
        worker_socket = None  # in a worker: the socket it serves
        try:
            preload_application()
            for sock in sockets:
                if self.stopping is not None:  # signalled while starting: start no more
                    break
                if not self.fork():
                    worker_socket = sock
                    break
        except BaseException:
            self.clean_up()
            raise
        if worker_socket is not None:
            return serve_forked(worker_socket, sockets, self.daphne_args)
        if not self.children:
            log("stopped before any worker started")
            self.clean_up()
            return 0
        log(f"{self.workers} daphne workers on {self.host}:{self.port} (pids "
            f"{', '.join(str(c.pid) for c in self.children)}), metrics in {os.environ['PROMETHEUS_MULTIPROC_DIR']}")
        for sock in set(sockets):  # the workers hold them now
            sock.close()
        try:
            return self.supervise()
        finally:
            self.clean_up()

    def fork(self) -> bool:
        """Fork a worker: True in the launcher (the worker is in `children`), False in the worker.
        A stop signal that arrives meanwhile waits until the worker has daphne's handling (the
        default until daphne installs its own); the launcher passes it on from `supervise`."""
        launcher = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    _become_worker(launcher)
                except BaseException:  # never into the launcher's clean-up, which would stop the others
                    traceback.print_exc()
                    os._exit(1)
                return False
            self.children.append(ForkedWorker(pid))
            return True
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def clean_up(self) -> None:
        self.kill_remaining()
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def stop_signalled(self, signum: int, _frame) -> None:
        """The handler of SIGTERM and SIGINT: noted here, passed on by `supervise` (a handler
        that reaped and signalled workers itself could run in the middle of the loop's own
        waitpid)."""
        self.stopping = signum
        self.to_forward.append(signum)

    def signal_workers(self, signum: int) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def supervise(self) -> int:
        stop_deadline = None
        while True:
            while self.to_forward:
                self.signal_workers(self.to_forward.pop(0))
            live = [c for c in self.children if c.poll() is None]
            if not live:
                break
            if self.crashed is None and self.stopping is None:
                gone = next((c for c in self.children if c.returncode is not None), None)
                if gone is not None:
                    self.crashed = gone
                    log(f"worker {gone.pid} exited with status {gone.returncode}; stopping the others")
                    self.stopping = signal.SIGTERM
                    self.signal_workers(signal.SIGTERM)
            if self.stopping is not None and stop_deadline is None:
                stop_deadline = time.monotonic() + STOP_TIMEOUT
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                log(f"workers {[c.pid for c in live]} still running {STOP_TIMEOUT:.0f} s after the signal: SIGKILL")
                self.kill_remaining()
                break
            time.sleep(0.1)
        if self.crashed is not None:
            code = self.crashed.returncode
            return code if code and code > 0 else 1  # killed by a signal (negative) or exited 0 unasked
        return 0

    def kill_remaining(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
                child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve chatproject.asgi with N daphne processes on one port.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", default="",
                        help="daphne processes (default: usable cores with REDIS_URL, else 1)")
    parser.add_argument("daphne_args", nargs="*", help="more daphne options for every worker (after --)")
    args = parser.parse_args(argv)
    args.daphne_args = DAPHNE_ARGS + args.daphne_args
    try:
        workers = int(args.workers) if str(args.workers).strip() else default_workers()
    except ValueError:
        parser.error(f"--workers must be an integer, not {args.workers!r}")
    if workers < 1:
        parser.error("--workers must be at least 1")
    if workers > 1 and not redis_configured():
        print(f"serve: WORKERS={workers} needs REDIS_URL: without it each process has its own in-process "
              "channel layer and a message sent through one worker never reaches sockets held by another. "
              "Set REDIS_URL (e.g. redis://127.0.0.1:6379/0) or use WORKERS=1.", file=sys.stderr)
        return 2
    serve_without_wakeup_preemption()
    if workers == 1:
        command = [*daphne_command(), *args.daphne_args, "-b", args.host, "-p", str(args.port), APPLICATION]
        os.chdir(ROOT)
        os.execv(command[0], command)
    return Launcher(args.host, args.port, workers, args.daphne_args).run()


if __name__ == "__main__":
    sys.exit(main())
