"""`make run`'s launcher (scripts/serve.py): several daphne workers on one port, sharing Redis.

Which worker holds a connection is read from the kernel: psutil lists each worker's TCP sockets, and
the server side of a client's connection is the one whose remote address is the client's local one.
"""
import asyncio
import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from websockets.asyncio.client import connect

from tests.live import ROOT, LiveServer, free_port, migrate, server_env
from tests.services import REDIS_URL, redis_available, require

pytestmark = pytest.mark.live_server_process

SERVE = ROOT / "scripts" / "serve.py"
CREATED = ("chat_message_created_total", 'is_encrypted="false",message_type="text"')


def load_serve_module():
    spec = importlib.util.spec_from_file_location("serve_launcher", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Launched(LiveServer):
    """scripts/serve.py with --workers N on 127.0.0.1 (HTTP helpers from LiveServer)."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int) -> None:
        super().__init__(env, log_path)
        self.workers = workers

    def start(self, timeout: float = 60) -> "Launched":
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(SERVE), "--port", str(self.port), "--workers", str(self.workers)],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while len(self.worker_pids()) < self.workers:
            assert self.process.poll() is None, f"launcher exited with {self.process.returncode}; see {self.log_path}"
            assert time.monotonic() < deadline, "workers not started"
            time.sleep(0.05)
        self.serving: set[int] = set()
        while self.serving != set(self.worker_pids()):  # every worker has answered a request
            assert time.monotonic() < deadline, f"workers {self.worker_pids()} never all answered; see {self.log_path}"
            self.serving.add(self.http_get("/metrics")[0])
        return self

    def worker_pids(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.process.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def holder(self, client_address: tuple) -> int | None:
        """The worker whose socket is the server side of the client's connection from this address."""
        for pid in self.worker_pids():
            for conn in psutil.Process(pid).net_connections("tcp"):
                if conn.raddr and (conn.raddr.ip, conn.raddr.port) == tuple(client_address[:2]):
                    return pid
        return None

    def http_get(self, path: str) -> tuple[int, str]:
        """(pid of the worker that answered, body) of a GET on a fresh keep-alive connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", path)
            body = connection.getresponse().read().decode()
            return self.holder(connection.sock.getsockname()), body
        finally:
            connection.close()

    def metric_from(self, pid: int, name: str, labels: str) -> float:
        """A sample of /metrics as answered by worker `pid` (tries fresh connections until it answers)."""
        for _ in range(200):
            holder, text = self.http_get("/metrics")
            if holder == pid:
                line = next((l for l in text.splitlines() if l.startswith(f"{name}{{{labels}}} ")), None)
                return float(line.rsplit(" ", 1)[1]) if line else 0.0
        raise AssertionError(f"worker {pid} never answered")


@pytest.fixture(scope="module")
def redis_url():
    require("Redis", redis_available())
    return REDIS_URL


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    directory = tmp_path_factory.mktemp("workers")
    env = server_env(directory / "db.sqlite3")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    migrate(env)
    return directory, env


def launch(database, redis_url, name: str, workers: int = 2) -> Launched:
    directory, env = database
    return Launched({**env, "REDIS_URL": redis_url}, directory / f"{name}.log", workers).start()


@pytest.fixture(scope="module")
def two_workers(database, redis_url):
    server = launch(database, redis_url, "two-workers")
    yield server
    server.stop()


async def open_sockets(server: Launched, conversation: str, token: str, count: int) -> list:
    sockets = []
    for _ in range(count):
        socket = await connect(f"{server.ws}/ws/chat/?conversation_id={conversation}",
                               additional_headers={"Authorization": f"Token {token}"})
        assert json.loads(await socket.recv())["type"] == "ready"
        sockets.append(socket)
    return sockets


async def next_message(socket, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(await asyncio.wait_for(socket.recv(), max(deadline - time.monotonic(), 0.01)))
        if frame["type"] == "message.new":
            return frame["message"]


async def test_both_workers_accept_on_one_port_and_deliver_to_each_other(two_workers):
    server = two_workers
    pids = server.worker_pids()
    assert len(pids) == 2 and server.serving == set(pids)
    alice_id, alice = server.signup("alice")
    bob_id, bob = server.signup("bob")
    status, conversation, _ = server.request(
        "POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": [bob_id]}, token=alice)
    assert status == 201
    conversation = conversation["id"]
    # The kernel spreads connections over the workers' sockets by address hash: 16 hit both.
    alice_sockets = await open_sockets(server, conversation, alice, 8)
    bob_sockets = await open_sockets(server, conversation, bob, 8)
    try:
        held_by = {s: server.holder(s.local_address) for s in alice_sockets + bob_sockets}
        assert set(held_by.values()) == set(pids), held_by
        sender = alice_sockets[0]
        receiver = next(s for s in bob_sockets + alice_sockets[1:] if held_by[s] != held_by[sender])
        before = [server.metric_from(pid, *CREATED) for pid in pids]
        await sender.send(json.dumps({"type": "message.send", "client_message_id": "w1", "content": "across"}))
        delivered = await next_message(receiver)
        assert delivered["content"] == "across" and delivered["conversation_id"] == conversation
        # Every socket of the conversation gets it, on either worker.
        for socket in alice_sockets + bob_sockets:
            if socket is not receiver:
                assert (await next_message(socket))["message_id"] == delivered["message_id"]
        # One metrics directory: each worker's /metrics counts the message the other created.
        after = [server.metric_from(pid, *CREATED) for pid in pids]
        assert before[0] == before[1] and after == [before[0] + 1] * 2
    finally:
        await asyncio.gather(*(s.close() for s in alice_sockets + bob_sockets))


def test_sigterm_stops_every_worker(database, redis_url):
    server = launch(database, redis_url, "sigterm")
    workers = [psutil.Process(pid) for pid in server.worker_pids()]
    metrics_dir = Path(re.search(r"metrics in (\S+)", server.log_path.read_text()).group(1))
    # Every worker has answered a request, and counted it in the launcher's directory.
    written = {int(m.group(1)) for f in metrics_dir.iterdir() if (m := re.search(r"_(\d+)\.db$", f.name))}
    assert {w.pid for w in workers} <= written
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(40) == 0
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert alive == []
    assert not metrics_dir.exists()
    server.stop()


def test_a_crashed_worker_stops_the_launcher_with_an_error(database, redis_url):
    server = launch(database, redis_url, "crash")
    victim, survivor = (psutil.Process(pid) for pid in server.worker_pids())
    victim.kill()
    assert server.process.wait(40) != 0
    assert psutil.wait_procs([survivor], timeout=5)[1] == []
    server.stop()
    assert f"worker {victim.pid} exited" in server.log_path.read_text()


def test_a_bad_setting_stops_the_launcher_once_before_any_worker(database, redis_url):
    """The launcher imports the application before it forks the workers: a bad setting is
    reported once, naming the variable, and no worker ever starts."""
    _, env = database
    result = subprocess.run([sys.executable, str(SERVE), "--workers", "2", "--port", str(free_port())], cwd=ROOT,
                            env={**env, "REDIS_URL": redis_url, "CHAT_SEND_RATE": "lots"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("CHAT_SEND_RATE='lots'") == 1
    assert "Traceback" not in result.stderr and "daphne workers on" not in result.stderr


def test_importing_the_application_leaves_a_process_that_can_fork_workers():
    """What the launcher imports before it forks starts no thread and installs no Twisted reactor
    (daphne's server makes an event loop for it at import): each worker makes its own after the
    fork (chatproject/application.py). daphne's runserver is still the project's."""
    probe = (
        "import sys, threading, chatproject.application\n"
        "from django.core.management import get_commands\n"
        "print(threading.active_count(), 'twisted.internet.reactor' in sys.modules, 'daphne.server' in sys.modules,"
        " get_commands()['runserver'])\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DJANGO_SETTINGS_MODULE": "chatproject.settings"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "False", "False", "daphne"]


def listening_sockets_of(pid: int) -> int:
    return sum(1 for conn in psutil.Process(pid).net_connections("tcp") if conn.status == psutil.CONN_LISTEN)


def test_each_forked_worker_holds_only_its_own_listening_socket(two_workers):
    """A worker closes its siblings' sockets: one it held would queue connections that nobody
    accepts once their own worker is gone."""
    assert [listening_sockets_of(pid) for pid in two_workers.worker_pids()] == [1, 1]
    assert listening_sockets_of(two_workers.process.pid) == 0


def scheduling_policies(pid: int) -> set[int]:
    """The scheduling policy of each of the process's threads (a thread gone meanwhile is skipped)."""
    policies = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            policies.add(os.sched_getscheduler(int(tid)))
        except ProcessLookupError:
            pass
    return policies


def launcher_sets_batch() -> bool:
    """Whether the launcher, started from here, would switch to SCHED_BATCH: this process runs
    under the default policy (the launcher keeps any other), and the system allows the switch
    (tried in a throwaway process: a libc or sandbox may refuse it)."""
    if not hasattr(os, "SCHED_BATCH") or os.sched_getscheduler(0) != os.SCHED_OTHER:
        return False
    trial = "import os; os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))"
    return subprocess.run([sys.executable, "-c", trial], capture_output=True).returncode == 0


def test_every_thread_of_every_worker_runs_without_wakeup_preemption(two_workers):
    """SCHED_BATCH (scripts/serve.py, serve_without_wakeup_preemption): a thread woken by the one
    holding the GIL does not preempt it. Checked once each worker has answered a request, so the
    threads it started to serve it are there too."""
    if not launcher_sets_batch():
        pytest.skip("this system, or this process's own policy, leaves the launcher's policy as it is")
    for pid in two_workers.worker_pids():
        assert len(os.listdir(f"/proc/{pid}/task")) > 1
        assert scheduling_policies(pid) == {os.SCHED_BATCH}


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's scheduling policies")
def test_the_launcher_keeps_a_policy_the_operator_chose():
    """Started under another policy than the default (chrt, systemd's CPUSchedulingPolicy), the
    launcher keeps it. SCHED_IDLE, which any process may take, stands for the operator's choice."""
    script = (
        "import importlib.util, os, sys\n"
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        f"spec = importlib.util.spec_from_file_location('serve_launcher', {str(SERVE)!r})\n"
        "serve = importlib.util.module_from_spec(spec); spec.loader.exec_module(serve)\n"
        "serve.serve_without_wakeup_preemption()\n"
        "print(os.sched_getscheduler(0))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == os.SCHED_IDLE


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux's scheduling policies")
def test_a_refused_policy_is_said_and_the_launcher_serves_on(monkeypatch, capsys):
    serve = load_serve_module()

    def refused(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(serve.os, "sched_getscheduler", lambda pid: os.SCHED_OTHER)
    monkeypatch.setattr(serve.os, "sched_setscheduler", refused)
    serve.serve_without_wakeup_preemption()
    assert "scheduling policy left as it was: Operation not permitted" in capsys.readouterr().err


def test_a_stop_signal_while_the_workers_start_stops_them_all_at_once(database, redis_url):
    """SIGTERM as soon as the first worker exists reaches every worker, the ones forked after it
    included, well within the launcher's 30 s before SIGKILL."""
    directory, env = database
    log_path = directory / "early-stop.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, str(SERVE), "--port", str(free_port()), "--workers", "2"],
            cwd=ROOT, env={**env, "REDIS_URL": redis_url}, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not psutil.Process(process.pid).children():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        workers = psutil.Process(process.pid).children()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert time.monotonic() - started < 10
        assert psutil.wait_procs(workers, timeout=5)[1] == []
        assert "SIGKILL" not in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()


def test_workers_stop_when_their_launcher_is_killed(database, redis_url):
    """A launcher killed outright (SIGKILL, no forwarding) takes its workers with it: none serves on
    alone in the port's socket group, beside the next launcher's."""
    server = launch(database, redis_url, "launcher-killed")
    workers = [psutil.Process(pid) for pid in server.worker_pids()]
    try:
        assert {w.name() for w in workers} == {"daphne-worker"}
        server.process.kill()
        assert psutil.wait_procs(workers, timeout=40)[1] == []
    finally:
        server.stop()


def test_forked_workers_take_their_live_gauges_with_them(database, redis_url, tmp_path):
    """With an operator's own metrics directory (kept across restarts), a worker that stops
    removes its live gauges (open connections), as the exec'd workers did: the workers are forked
    from a launcher that loaded the application, and each marks its own pid dead at exit."""
    directory, env = database
    server = Launched({**env, "REDIS_URL": redis_url, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
                      directory / "gauges.log", 2).start()
    pids = set(server.worker_pids())

    def live_gauge_pids() -> set[int]:
        return {int(m.group(1)) for f in tmp_path.iterdir() if (m := re.fullmatch(r"gauge_live\w*_(\d+)\.db", f.name))}

    try:
        assert pids <= live_gauge_pids()  # each worker's connections gauge, written when it answered
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(40) == 0
        assert not pids & live_gauge_pids()
    finally:
        server.stop()


def test_several_workers_without_redis_are_refused(database):
    _, env = database
    env = {k: v for k, v in env.items() if k != "REDIS_URL"}
    result = subprocess.run([sys.executable, str(SERVE), "--workers", "2", "--port", "1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "WORKERS=2 needs REDIS_URL" in result.stderr


def test_default_workers_are_the_cores_with_redis_and_one_without(monkeypatch):
    serve = load_serve_module()
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert serve.default_workers() == 1
    monkeypatch.setenv("REDIS_URL", "  ")
    assert serve.default_workers() == 1
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    assert serve.default_workers() == len(os.sched_getaffinity(0))


def test_a_worker_imports_daphne_with_the_collector_off_and_leaves_it_on():
    """The launcher's worker command turns the garbage collector off for daphne's imports, freezes
    what they made and turns it on again before daphne starts (then chatproject/application.py does
    the same around the application's imports): a worker never runs with the collector off."""
    serve = load_serve_module()
    probe = "import gc; print(gc.isenabled(), gc.get_freeze_count())"
    result = subprocess.run([sys.executable, "-c", f"{serve.DAPHNE_IMPORT}; {probe}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    enabled, frozen = result.stdout.split()
    assert enabled == "True" and int(frozen) > 10_000
    assert serve.daphne_command()[-1].startswith(serve.DAPHNE_IMPORT)


def test_one_worker_is_daphne_itself(database):
    """One worker: the launcher execs daphne (no launcher process stays), which serves HTTP."""
    _, env = database
    env = {k: v for k, v in env.items() if k != "REDIS_URL"}
    port = free_port()
    process = subprocess.Popen([sys.executable, str(SERVE), "--workers", "1", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/metrics")
                status = connection.getresponse().status
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "the worker did not serve"
                time.sleep(0.1)
        assert status == 200
        assert "daphne.cli" in " ".join(psutil.Process(process.pid).cmdline())  # exec'd: the same pid
        if launcher_sets_batch():  # the launcher's policy, kept across the exec
            assert scheduling_policies(process.pid) == {os.SCHED_BATCH}
    finally:
        process.terminate()
        process.wait(timeout=30)
