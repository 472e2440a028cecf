"""The benchmark: the chat service and two relay baselines, measured in one run by one generator.

    .venv/bin/python -m bench.run --out bench/results                  # full run, Cassandra + Redis
    .venv/bin/python -m bench.run --smoke --out /tmp/bench-smoke       # every scenario tiny, SQL store
    options: --store sql|cassandra  --scenarios fanout,ramp,idle,persist,stream  --no-baseline  --profile
             --redis redis://127.0.0.1:6379/13  --gen-procs N  --service-env NAME=VALUE  --workers N

The service runs as `make run` runs it: scripts/serve.py with --workers N daphne processes on one
port (default: the usable cores, the launcher's default with REDIS_URL); its CPU and RSS are the
sums over the workers. The floors: the raw relay (bench/baseline_relay.py: websockets + Redis
pub/sub, nothing kept) and, with --store cassandra, the durable relay (the same + one Cassandra
write per message at the service's consistency level, awaited before the ack and the publish).

Writes results.json, results.md and latency.png under --out. Exits 1 when any scenario shows a
gap, a duplicate, a lost message or a broken harness (the smoke's pass criterion; missed
performance targets are reported, not failed). Loopback only; every phase is bounded in time.

Scenarios (same generator, same clients, against every target unless noted):
  fanout   conversations of 10, an open-loop send rate (full: 500 clients, 200 msg/s = 2,000
           deliveries/s for 30 s after a 5 s warm-up): send->deliver latency, deliveries/s, gaps,
           duplicates, lost, server CPU (and per acked message) and RSS.
  ramp     the same clients, rising send rates in steps; saturation = the highest step with
           p99 < 100 ms, everything acked and delivered, no gap or duplicate. Each step reports the
           server's CPU per message: server cores / acked msg/s, in ms.
  idle     (service and raw relay; full: 2,000) authenticated connections held open, opened in two
           halves: RSS per connection = the second half's RSS growth over its count (what one more
           connection costs, without what the first ones warm once: pools' database connections,
           caches, and with several workers each worker's start-up); the average over all of them
           is reported too. Server CPU while idle: a 30 s window (includes daphne's 20 s protocol
           pings and the 20 s presence refresh). Then the reconnect storm: with every connection
           open and messages flowing at a low rate, the server is restarted (SIGTERM, then started
           on the same port) and every client reconnects at once with after_seq = its last seq:
           time until all have `ready`, and every acked message delivered exactly once to every
           member (the raw relay cannot replay: timed only).
  persist  (service and durable relay) closed-loop senders in two-person conversations (one side
           connected): acked sends/s, ack latency; for the service through the whole send pipeline
           on the chosen store, with a read-back of every acked seq from the store, plus
           bench/store_persist.py's raw MessageStore.insert latency when that script is present.
  stream   (service and raw relay) a team chat: every user on one device in many conversations
           (full: 500 users, each in 20 conversations of 10; 100 msg/s = 1,000 deliveries/s for 20 s).
           The service holds one user stream per user, the raw relay one socket per user and
           conversation (all a client of it can do): server RSS per user, send->deliver latency,
           gaps, duplicates, lost (bench/stream_gen.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SERVE = ROOT / "scripts" / "serve.py"  # the launcher `make run` uses: the service runs the same way here

FULL = {
    "fanout": {"groups": 50, "size": 10, "rate": 200, "warmup": 5, "duration": 30},
    "ramp": {"groups": 50, "size": 10, "step": 6,
             "rates": [5, 10, 15, 25, 50, 100, 150, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000, 2500, 3000, 4000]},
    "idle": {"groups": 200, "size": 10, "window": 30, "settle": 5},
    "persist": {"pairs": 20, "duration": 15, "store_count": 500},
    # after the idle window, on its connections: 20 msg/s for 3 s, restart, all reconnect, 3 s more
    "storm": {"rate": 20, "lead": 3, "after": 3, "timeout": 120, "drain": 15},
    # a team chat: 500 people, each on one device in 20 conversations of 10 (1,000 conversations)
    "stream": {"users": 500, "per_user": 20, "size": 10, "rate": 100, "duration": 20, "settle": 3},
    "profile_seconds": 20,
    "profile_rate": 40,
}
SMOKE = {
    "fanout": {"groups": 2, "size": 10, "rate": 20, "warmup": 1, "duration": 2},
    "ramp": {"groups": 2, "size": 10, "step": 1.5, "rates": [20, 60]},
    "idle": {"groups": 4, "size": 10, "window": 2, "settle": 1},
    "persist": {"pairs": 4, "duration": 2, "store_count": 0},
    "storm": {"rate": 10, "lead": 1, "after": 1, "timeout": 60, "drain": 10},
    "stream": {"users": 20, "per_user": 4, "size": 5, "rate": 10, "duration": 2, "settle": 1},
    "profile_seconds": 3,
    "profile_rate": 20,
}
TARGETS = {"fanout_p99_ms": 50.0, "fanout_p99_vs_baseline": 3.0, "saturation_vs_baseline": 1 / 3,
           "idle_rss_vs_baseline": 3.0, "idle_cpu_cores": 0.05, "p99_saturation_ms": 100.0}


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(sorted_values: list, fraction: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def latency_summary(samples_us: list[int]) -> dict:
    values = sorted(samples_us)
    ms = lambda v: None if v is None else round(v / 1000, 3)  # noqa: E731
    return {"count": len(values), "p50_ms": ms(percentile(values, 0.50)), "p95_ms": ms(percentile(values, 0.95)),
            "p99_ms": ms(percentile(values, 0.99)), "max_ms": ms(values[-1] if values else None),
            "mean_ms": ms(sum(values) / len(values) if values else None)}


# --- processes ---------------------------------------------------------------------------------
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def connection_holder(processes: list[psutil.Process], client_address: tuple) -> psutil.Process | None:
    """The process holding the server side of a loopback connection from `client_address`."""
    for process in processes:
        try:
            for conn in process.net_connections("tcp"):
                if conn.raddr and (conn.raddr.ip, conn.raddr.port) == tuple(client_address[:2]):
                    return process
        except psutil.Error:
            pass
    return None


class Server:
    """A server on 127.0.0.1: the service through scripts/serve.py (one daphne per worker, the
    launcher itself `exec`s daphne for one), or a baseline relay. `procs` are the processes that
    serve (the workers, not the launcher), whose CPU and RSS are summed."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path, ws_path: str, workers: int = 1,
                 probe_path: str = "/metrics") -> None:
        self.name, self.argv, self.env, self.log_path, self.ws_path = name, argv, env, log_path, ws_path
        self.workers, self.probe_path = workers, probe_path
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.procs: list[psutil.Process] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.ws_path}"

    def start(self, timeout: float = 30) -> "Server":
        self.log = open(self.log_path, "ab")
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        self.process = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            if self.workers == 1:
                self.procs = [psutil.Process(self.process.pid)]
                return self
            if self._workers_answer(deadline):
                return self
        self.stop()
        raise RuntimeError(f"{self.name} did not serve within {timeout} s; see {self.log_path}")

    def _workers_answer(self, deadline: float) -> bool:
        """Several workers: the launcher binds the port before they start, so a connection proves
        nothing; wait until each worker has answered an HTTP request itself."""
        launcher = psutil.Process(self.process.pid)
        while len(launcher.children()) < self.workers:
            if time.monotonic() > deadline or self.process.poll() is not None:
                return False
            time.sleep(0.05)
        self.procs = launcher.children()
        answered: set[int] = set()
        while answered != {p.pid for p in self.procs}:
            if time.monotonic() > deadline or self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    sock.sendall(f"GET {self.probe_path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                    if sock.recv(12).startswith(b"HTTP/1.1"):
                        holder = connection_holder(self.procs, sock.getsockname())
                        if holder is not None:
                            answered.add(holder.pid)
            except OSError:
                time.sleep(0.05)
        return True

    def restart(self, timeout: float = 60) -> tuple[float, float, float]:
        """SIGTERM, wait for every process to exit, start again on the same port. Wall-clock times
        (time.time) of the signal, of the new launch, and of the new server answering."""
        stopped_at = time.time()
        self.stop()
        launched_at = time.time()
        self.start(timeout)
        return stopped_at, launched_at, time.time()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(45)  # the launcher gives its workers 30 s
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Usage:
    """CPU and RSS of a set of processes over a window (psutil)."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self.processes = processes
        self.peak_rss = 0
        self._stop = threading.Event()

    def _cpu(self) -> float:
        total = 0.0
        for p in self.processes:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def rss(self) -> int:
        total = 0
        for p in self.processes:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.peak_rss = max(self.peak_rss, self.rss())

    @staticmethod
    def machine_busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def __enter__(self) -> "Usage":
        self.machine0 = self.machine_busy()
        self.cpu0, self.t0 = self._cpu(), time.monotonic()
        self.peak_rss = self.rss()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self.seconds = time.monotonic() - self.t0
        self.cpu_seconds = self._cpu() - self.cpu0
        self.cores = self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0
        # everything on the machine (server, generator, Redis, Cassandra, and anyone else's work)
        self.machine_cores = (self.machine_busy() - self.machine0) / self.seconds if self.seconds > 0 else 0.0
        self.end_rss = self.rss()


def service_processes() -> dict[str, list[psutil.Process]]:
    """Redis and Cassandra on this machine (shared services; their CPU is reported, not targeted)."""
    found: dict[str, list[psutil.Process]] = {"redis": [], "cassandra": []}
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if (p.info["name"] or "").startswith("redis-server"):
                found["redis"].append(p)
            elif "java" in (p.info["name"] or "") and "cassandra" in cmd.lower():
                found["cassandra"].append(p)
        except psutil.Error:
            pass
    return found


class Generators:
    """N load generator processes (bench/loadgen.py) sharing the clients by conversation."""

    def __init__(self, url: str, clients: list[list[str]], procs: int, workdir: Path, concurrency: int) -> None:
        by_conv: dict[str, list] = {}
        for c in clients:
            by_conv.setdefault(c[0], []).append(c)
        shares: list[list] = [[] for _ in range(procs)]
        for i, members in enumerate(by_conv.values()):
            shares[i % procs].extend(members)
        self.procs = []
        self.client_count = len(clients)
        for i, share in enumerate(s for s in shares if s):
            config = workdir / f"loadgen-{uuid.uuid4().hex[:6]}-{i}.json"
            config.write_text(json.dumps({"url": url, "clients": share, "connect_concurrency": concurrency}))
            self.procs.append(subprocess.Popen([PY, "-m", "bench.loadgen", str(config)], cwd=ROOT, stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, text=True, bufsize=1))
        self.ps = [psutil.Process(p.pid) for p in self.procs]

    def command(self, cmd: dict, timeout: float) -> list[dict]:
        self.send(cmd)
        return self.collect(cmd, timeout)

    def send(self, cmd: dict) -> None:
        for p in self.procs:
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()

    def collect(self, cmd: dict, timeout: float) -> list[dict]:
        answers = []
        deadline = time.monotonic() + timeout
        for p in self.procs:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, remaining))
            line = p.stdout.readline() if ready else ""
            if not line:
                raise RuntimeError(f"load generator gave no answer to {cmd['cmd']} within {timeout} s")
            answers.append(json.loads(line))
        return answers

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write('{"cmd": "quit"}\n')
                p.stdin.flush()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> "Generators":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge(answers: list[dict]) -> dict:
    merged: dict = {"errors": {}}
    for a in answers:
        for key, value in a.items():
            if key == "errors":
                for code, n in value.items():
                    merged["errors"][code] = merged["errors"].get(code, 0) + n
            elif isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            elif isinstance(value, bool):
                merged[key] = merged.get(key, True) and value
            elif isinstance(value, (int, float)):
                merged[key] = merged.get(key, 0) + value
            else:
                merged[key] = value
    merged["seconds"] = max((a.get("seconds", 0) for a in answers), default=0)
    return merged


# --- the benchmark -------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale = SMOKE if args.smoke else FULL
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="chat-bench-"))
        self.samples: dict[str, list[int]] = {}
        self.phase = 0
        self.failures: list[str] = []
        self.results: dict = {"scenarios": {}}
        # The launcher's default with Redis (the bench always has it): one worker per usable core.
        self.workers = args.workers or usable_cores()

    # environment and fixtures
    def service_env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DJANGO_", "CHAT_", "REDIS_URL", "DATABASE_URL", "CASSANDRA_", "PROMETHEUS_"))}
        env.update(
            DJANGO_SETTINGS_MODULE="chatproject.settings",
            DJANGO_SECRET_KEY="bench-secret-key-not-for-production",
            DATABASE_URL=self.args.database_url or f"sqlite:///{self.work / 'bench.sqlite3'}",
            DATABASE_CONN_MAX_AGE=str(self.args.conn_max_age),
            REDIS_URL=self.args.redis,
            CHAT_MESSAGE_STORE=self.args.store,
            CASSANDRA_KEYSPACE=self.args.keyspace,
            CHAT_SEND_RATE="1000000/min",
            CHAT_MAX_CONNECTIONS="100000",
            CHAT_MAX_CONNECTIONS_PER_USER="1000",
            LOG_LEVEL="WARNING",
        )
        env.update(item.split("=", 1) for item in self.args.service_env)
        return env

    def prepare(self) -> None:
        env = self.service_env()
        log(f"migrating {'the relational database' if self.args.database_url else 'a temporary SQLite database'}")
        subprocess.run([PY, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
        # As `make run` does (its PACKAGES): the workers start without compiling the project.
        subprocess.run([PY, "-m", "compileall", "-q", "accounts", "chat", "chatproject", "core", "notifications", "webclient"],
                       cwd=ROOT, check=True)
        if self.args.store == "cassandra":
            log(f"cassandra_schema --keyspace {self.args.keyspace}")
            subprocess.run([PY, "manage.py", "cassandra_schema", "--keyspace", self.args.keyspace], cwd=ROOT, env=env,
                           check=True, timeout=120, stdout=subprocess.DEVNULL)
        groups = max(self.scale[s]["groups"] for s in ("fanout", "ramp", "idle"))
        size = self.scale["idle"]["size"]
        fixture = self.work / "fixture.json"
        log(f"seeding {groups} groups of {size} + {self.scale['persist']['pairs']} pairs")
        stream = self.scale["stream"] if "stream" in self.args.scenarios.split(",") else {"users": 0, "per_user": 0, "size": 1}
        subprocess.run([PY, "-m", "bench.seed", "--groups", str(groups), "--size", str(size), "--pairs",
                        str(self.scale["persist"]["pairs"]), "--stream-users", str(stream["users"]),
                        "--stream-per-user", str(stream["per_user"]), "--stream-size", str(stream["size"]),
                        "--out", str(fixture)], cwd=ROOT, env=env, check=True)
        self.fixture = json.loads(fixture.read_text())

    def clients(self, groups: int, baseline: bool) -> list[list[str]]:
        picked = self.fixture["groups"][:groups]
        if baseline:  # fresh conversation ids: the relays' seq counters start at 0 for each run
            picked = [[f"{uuid.uuid4()}", members] for _, members in picked]
        return [[conv, user, token] for conv, members in picked for user, token in members]

    def ours(self) -> Server:
        return Server(f"chat ({self.workers} daphne)",
                      [PY, str(SERVE), "--host", "127.0.0.1", "--port", "{port}", "--workers", str(self.workers)],
                      self.service_env(), self.out / "server-chat.log", "/ws/chat/", workers=self.workers)

    def baseline(self) -> Server:
        return Server("baseline relay", [PY, "-m", "bench.baseline_relay", "--port", "{port}", "--redis", self.args.redis],
                      dict(os.environ), self.out / "server-baseline.log", "/")

    def durable(self) -> Server:
        """The relay + one Cassandra write per message; the service's environment, so the same
        contact points, keyspace and consistency level (bench/baseline_relay.py reads the settings)."""
        return Server("durable relay", [PY, "-m", "bench.baseline_relay", "--port", "{port}", "--redis", self.args.redis,
                                        "--durable"],
                      self.service_env(), self.out / "server-durable.log", "/")

    def next_phase(self) -> int:
        self.phase += 1
        return self.phase

    def check(self, label: str, r: dict) -> None:
        """Harness failures: a gap, a duplicate or a lost message. A server too slow to deliver
        everything before the drain deadline is a performance result (saturated), not a failure,
        except in the smoke, whose rates are far below any saturation."""
        problems = [f"{k}={r[k]}" for k in ("gaps", "dups", "lost") if r.get(k)]
        if r.get("drained") is False and self.args.smoke:
            problems.append("not drained")
        # Every send is answered: acked, or refused with `unavailable` by the service's load
        # shedding (the client is told; it retries). Anything else went missing.
        shed = r.get("errors", {}).get("unavailable", 0)
        if r.get("drained") and r.get("acked") is not None and r["acked"] + shed != r.get("sent"):
            problems.append(f"acked {r['acked']} (and {shed} shed) of {r['sent']}")
        if problems:
            self.failures.append(f"{label}: {', '.join(problems)}")

    def open_phase(self, gens: Generators, server: Server, rate: float, duration: float, drain: float = 30) -> dict:
        phase = self.next_phase()
        cmd = {"cmd": "open", "phase": phase, "rate": rate / len(gens.procs), "duration": duration,
               "start_at": time.time() + 0.3, "drain": drain}
        with Usage(server.procs) as use, Usage(gens.ps) as gen_use:
            answer = merge(gens.command(cmd, timeout=duration + drain + 60))
        return self.summarise(answer, use, gen_use, rate)

    def summarise(self, answer: dict, use: Usage, gen_use: Usage, rate: float | None) -> dict:
        latencies = answer.pop("latency_us", [])
        acks = answer.pop("ack_latency_us", [])
        seconds = max(answer["seconds"], 1e-9)
        result = {
            "offered_msgs_per_s": rate, "sent_msgs_per_s": round(answer["sent"] / seconds, 1),
            "deliveries_per_s": round(answer["received"] / seconds, 1),
            "latency": latency_summary(latencies), "ack_latency": latency_summary(acks),
            **{k: answer.get(k) for k in ("sent", "acked", "received", "gaps", "dups", "lost", "undelivered", "unanswered", "errors", "drained",
                                          "late_sends", "closed")},
            "server_cpu_cores": round(use.cores, 3), "server_rss_mib": round(use.end_rss / 2**20, 1),
            "server_peak_rss_mib": round(use.peak_rss / 2**20, 1), "generator_cpu_cores": round(gen_use.cores, 3),
            "machine_cpu_cores": round(use.machine_cores, 3),
            # Server CPU per acknowledged message (with its deliveries): cores / acked msg/s, in ms.
            "server_cpu_ms_per_msg": (round(1000 * use.cores * seconds / answer["acked"], 3)
                                      if answer.get("acked") else None),
        }
        result["_samples"] = latencies
        return result

    # scenarios
    def fanout(self, which: str, make_server) -> dict:
        s = self.scale["fanout"]
        clients = self.clients(s["groups"], which != "ours")
        with make_server().start() as server, Generators(server.url, clients, self.args.gen_procs, self.work, 50) as gens:
            connect = merge(gens.command({"cmd": "connect"}, timeout=300))
            log(f"{which} fanout: {connect['connected']}/{len(clients)} connected in {connect['seconds']} s")
            self.open_phase(gens, server, s["rate"] / 4, s["warmup"])  # warm-up at a quarter rate, not reported
            result = self.open_phase(gens, server, s["rate"], s["duration"])
            if which == "ours" and self.args.profile:
                result["profile"] = self.profile(gens, server, self.scale["profile_rate"])
        result["connect"] = connect
        self.samples[f"fanout/{which}"] = result.pop("_samples")
        self.check(f"fanout/{which}", result)
        if connect["connected"] != len(clients):
            self.failures.append(f"fanout/{which}: {connect['connected']}/{len(clients)} connected")
        log(f"{which} fanout: p50 {result['latency']['p50_ms']} p99 {result['latency']['p99_ms']} ms, "
            f"{result['deliveries_per_s']} deliveries/s, server {result['server_cpu_cores']} cores")
        return result

    def profile(self, gens: Generators, server: Server, rate: float) -> dict:
        """py-spy on the server during an extra fan-out phase (not the measured one), at a rate the
        server sustains (an overloaded one profiles its queues). Only samples that hold the GIL:
        where the process's Python CPU goes, not where its threads wait."""
        seconds = self.scale["profile_seconds"]
        raw = self.out / "profile-fanout.txt"
        pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(pyspy).exists():
            return {"error": "py-spy not installed"}
        spy = subprocess.Popen([pyspy, "record", "--pid", str(server.process.pid), "--subprocesses", "--rate", "100", "--duration",
                                str(int(seconds)), "--nonblocking", "--gil", "--format", "raw", "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        self.open_phase(gens, server, rate, seconds)
        spy.wait(60)
        if not raw.exists():
            return {"error": "py-spy wrote no profile (ptrace not permitted?)"}
        summary = summarise_profile(raw)
        (self.out / "profile-fanout.json").write_text(json.dumps(summary, indent=1))
        return {"raw": raw.name, "summary": "profile-fanout.json", "samples": summary["samples"]}

    def ramp(self, which: str, make_server) -> dict:
        s = self.scale["ramp"]
        clients = self.clients(s["groups"], which != "ours")
        steps, best = [], None
        with make_server().start() as server, Generators(server.url, clients, self.args.gen_procs, self.work, 50) as gens:
            gens.command({"cmd": "connect"}, timeout=300)
            self.open_phase(gens, server, s["rates"][0], 2 if not self.args.smoke else 0.5)
            for rate in s["rates"]:
                for attempt in (1, 2):  # a missed step is run once more: other work on the machine spikes p99
                    r = self.open_phase(gens, server, rate, s["step"], drain=15)
                    r.pop("_samples")
                    ok = (r["latency"]["p99_ms"] is not None and r["latency"]["p99_ms"] < TARGETS["p99_saturation_ms"]
                          and r["acked"] == r["sent"] and r["drained"] and not (r["gaps"] or r["dups"] or r["lost"])
                          and r["sent_msgs_per_s"] >= 0.95 * rate)
                    r["ok"], r["attempt"] = ok, attempt
                    if ok or not r["drained"] or self.args.smoke or attempt == 2:
                        break
                    steps.append(r)
                steps.append(r)
                log(f"{which} ramp {rate} msg/s: p99 {r['latency']['p99_ms']} ms, {r['deliveries_per_s']} deliveries/s,"
                    f" server {r['server_cpu_cores']} cores ({r['server_cpu_ms_per_msg']} ms/msg)"
                    f" gen {r['generator_cpu_cores']} cores -> {'ok' if ok else 'over'}")
                if r["gaps"] or r["dups"] or r["lost"]:
                    self.check(f"ramp/{which}@{rate}", r)
                if not ok:
                    break
                best = r
                time.sleep(1)
        return {"steps": steps, "saturation_msgs_per_s": best["offered_msgs_per_s"] if best else 0,
                "saturation_deliveries_per_s": best["deliveries_per_s"] if best else 0,
                "saturation_p99_ms": best["latency"]["p99_ms"] if best else None,
                "limited_by_ladder": bool(steps) and steps[-1]["ok"]}

    def idle(self, which: str, make_server) -> dict:
        s = self.scale["idle"]
        clients = self.clients(s["groups"], which != "ours")
        with make_server().start() as server:
            # one connection first (warms imports, pools and caches), then the RSS before
            with Generators(server.url, clients[:1], 1, self.work, 1) as warm:
                warm.command({"cmd": "connect"}, timeout=60)
                time.sleep(1)
                rss_before = Usage(server.procs).rss()
                # In two halves: the second half's growth is what one more connection costs, without
                # what the first connections warm once (thread pools' database connections and
                # caches, interned strings, allocator arenas).
                half = 1 + (len(clients) - 1) // 2
                with Generators(server.url, clients[1:half], self.args.gen_procs, self.work, 50) as first, \
                        Generators(server.url, clients[half:], self.args.gen_procs, self.work, 50) as gens:
                    with Usage(server.procs) as connecting_first:
                        connect_first = first.command({"cmd": "connect"}, timeout=600)
                    time.sleep(s["settle"])
                    rss_half = Usage(server.procs).rss()
                    with Usage(server.procs) as connecting_second:
                        connect_second = gens.command({"cmd": "connect"}, timeout=600)
                    connect = merge(connect_first + connect_second)
                    connect["seconds"] = round(merge(connect_first)["seconds"] + merge(connect_second)["seconds"], 3)
                    log(f"{which} idle: {connect['connected']}/{len(clients) - 1} connected in {connect['seconds']} s")
                    time.sleep(s["settle"])
                    with Usage(server.procs) as use, Usage(first.ps + gens.ps) as gen_use:
                        idle = {"cmd": "idle", "duration": s["window"]}
                        first.send(idle)
                        gens.send(idle)
                        answer = merge(first.collect(idle, s["window"] + 30) + gens.collect(idle, s["window"] + 30))
                    storm = self.storm(which, server, [warm, first, gens], len(clients))
        n = connect["connected"]
        second_half = len(clients) - half
        result = {
            "connections": n + 1, "connect_seconds": connect["seconds"], "connect_failed": connect["failed"],
            # the server's CPU while the sockets connected, per handshake: steadier than the time
            # on a machine whose other tenants vary
            "connect_cpu_ms_per_handshake": round(
                1000 * (connecting_first.cpu_seconds + connecting_second.cpu_seconds) / max(n, 1), 3),
            "rss_before_mib": round(rss_before / 2**20, 1), "rss_half_mib": round(rss_half / 2**20, 1),
            "rss_after_mib": round(use.end_rss / 2**20, 1),
            "rss_per_connection_kib": round((use.end_rss - rss_half) / max(second_half, 1) / 1024, 1),
            "rss_per_connection_average_kib": round((use.end_rss - rss_before) / max(n, 1) / 1024, 1),
            "idle_cpu_cores": round(use.cores, 4), "window_seconds": round(use.seconds, 1),
            "generator_cpu_cores": round(gen_use.cores, 4), "machine_cpu_cores": round(use.machine_cores, 3),
            "closed": answer.get("closed"), "errors": answer["errors"], "storm": storm,
        }
        if n != len(clients) - 1 or answer.get("closed"):
            self.failures.append(f"idle/{which}: {n}/{len(clients) - 1} connected, {answer.get('closed')} closed")
        log(f"{which} idle: {result['rss_per_connection_kib']} KiB/connection, {result['idle_cpu_cores']} cores")
        return result

    def stream(self, which: str, make_server) -> dict:
        """Every user on one device in many conversations: the service with one user stream per
        user, the raw relay with what its clients must hold instead, one socket per user and
        conversation. Server memory per user (RSS growth from connecting them all, over their
        count) and send->deliver latency at an open-loop rate, with the usual gap/dup/lost checks."""
        s = self.scale["stream"]
        fixture = self.fixture["stream"]
        conversations = fixture["conversations"]
        if which != "ours":  # fresh ids: the relay's seq counters start at 0 for each run
            conversations = [[str(uuid.uuid4()), members] for _, members in conversations]
        mode = "stream" if which == "ours" else "sockets"
        config = self.work / f"stream-{which}.json"
        with make_server().start() as server:
            time.sleep(s["settle"])
            rss_before = Usage(server.procs).rss()
            config.write_text(json.dumps({"url": server.url, "mode": mode, "users": fixture["users"],
                                          "conversations": conversations}))
            gen = subprocess.Popen([PY, "-m", "bench.stream_gen", str(config)], cwd=ROOT, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, bufsize=1)
            gens = Generators.__new__(Generators)  # its command plumbing, over this one process
            gens.procs, gens.ps, gens.client_count = [gen], [psutil.Process(gen.pid)], len(fixture["users"])
            try:
                connect = gens.command({"cmd": "connect"}, timeout=600)[0]
                time.sleep(s["settle"])
                rss_connected = Usage(server.procs).rss()
                phase = self.next_phase()
                with Usage(server.procs) as use:
                    answer = gens.command({"cmd": "open", "phase": phase, "rate": s["rate"], "duration": s["duration"],
                                           "drain": 30}, timeout=s["duration"] + 120)[0]
            finally:
                gens.close()
        users = connect["connected_users"]
        result = {
            "mode": mode, "users": users, "sockets": connect["sockets"], "connect_seconds": connect["seconds"],
            "connect_failed": connect["failed"],
            "conversations": len(conversations), "per_user": s["per_user"], "size": s["size"],
            "rss_before_mib": round(rss_before / 2**20, 1), "rss_connected_mib": round(rss_connected / 2**20, 1),
            "rss_per_user_kib": round((rss_connected - rss_before) / max(users, 1) / 1024, 1),
            "offered_msgs_per_s": s["rate"], "server_cpu_cores": round(use.cores, 3),
            **{k: answer[k] for k in ("sent", "acked", "expected_deliveries", "received", "gaps", "dups", "lost",
                                      "errors", "latency")},
        }
        self.check(f"stream/{which}", {**answer, "drained": answer["lost"] == 0})
        if users != len(fixture["users"]):
            self.failures.append(f"stream/{which}: {users}/{len(fixture['users'])} users connected")
        log(f"{which} stream: {result['rss_per_user_kib']} KiB/user over {connect['sockets']} sockets, "
            f"p99 {answer['latency']['p99_ms']} ms, lost {answer['lost']}, gaps {answer['gaps']}, dups {answer['dups']}")
        return result

    def storm(self, which: str, server: Server, groups: list[Generators], total: int) -> dict:
        """The reconnect storm: with every idle connection open and messages flowing at a low rate,
        the server is restarted (SIGTERM to every process, then started again on the same port) and
        every client reconnects at once with `after_seq` = the last seq it saw. Measures the time
        until all have their `ready`, and checks every acked message reached every member exactly
        once (the raw relay cannot replay: it is timed only)."""
        s = self.scale["storm"]
        replay = which == "ours"
        phase = self.next_phase()
        cmd = {"cmd": "storm", "phase": phase, "after": s["after"], "timeout": s["timeout"], "drain": s["drain"],
               "replay": replay}
        for gen in groups:
            gen.send({**cmd, "rate": s["rate"] * gen.client_count / total / len(gen.procs)})
        time.sleep(s["lead"])  # messages flowing before the restart
        stopped_at, launched_at, serving_at = server.restart(timeout=s["timeout"])
        answers = [a for gen in groups for a in gen.collect(cmd, s["timeout"] + s["drain"] + 60)]
        ready = sorted(t for a in answers for t in a.pop("ready_at"))
        acked_max: dict[str, int] = {}
        for a in answers:
            for conv, seq in a.pop("acked_max").items():
                acked_max[conv] = max(acked_max.get(conv, 0), seq)
        # Behind at the end of the drain, over every generator's acks (a conversation's members may
        # sit in two generators): an acked message a member never got.
        missing = sum(max(0, acked_max.get(conv, 0) - last) for a in answers for conv, lasts in a.pop("last_seqs").items()
                      for last in lasts)
        failures: dict[str, int] = {}
        for a in answers:
            a.pop("down_at", None)
            for kind, n in a.pop("reconnect_failures").items():
                failures[kind] = failures.get(kind, 0) + n
        merged = merge(answers)
        merged.pop("latency_us", None)
        merged.pop("ack_latency_us", None)
        reconnected = merged.get("reconnected", 0)
        since = lambda t0: [round(t - t0, 3) for t in ready]  # noqa: E731
        after_launch = since(launched_at)
        result = {
            "connections": total, "reconnected": reconnected, "replay": replay, "rate_msgs_per_s": s["rate"],
            "server_stop_seconds": round(launched_at - stopped_at, 3),
            "server_start_seconds": round(serving_at - launched_at, 3),
            # from the new server's launch: what a restart costs the clients (includes its start-up)
            "all_ready_after_launch_s": round(ready[-1] - launched_at, 3) if ready else None,
            "p50_ready_after_launch_s": percentile(after_launch, 0.5),
            # how many were ready within 1 s, 2 s, ... of the launch: where a storm's time goes
            "ready_by_second_after_launch": [sum(t <= second for t in after_launch)
                                             for second in range(1, int(after_launch[-1]) + 2)] if ready else [],
            # from the SIGTERM: how long a client is without a connection, at worst
            "all_ready_after_sigterm_s": round(ready[-1] - stopped_at, 3) if ready else None,
            "sent": merged.get("sent"), "acked": merged.get("acked"), "received": merged.get("received"),
            "unanswered_at_restart": merged.get("unanswered_at_restart"),
            "gaps": merged.get("gaps") if replay else None, "dups": merged.get("dups") if replay else None,
            "lost": missing if replay else None, "drained": merged.get("drained"),
            "refused_attempts": failures, "errors": merged.get("errors"),
        }
        # How many come back, and how fast, is the capacity under test (a target, reported): only
        # what the reconnected clients received can be wrong (gaps, duplicates, losses).
        if replay and (result["gaps"] or result["dups"] or result["lost"]):
            self.failures.append(f"storm/{which}: gaps={result['gaps']} dups={result['dups']} lost={result['lost']}")
        log(f"{which} storm: {reconnected}/{total} ready {result['all_ready_after_launch_s']} s after the launch "
            f"({result['all_ready_after_sigterm_s']} s after SIGTERM), gaps/dups/lost "
            f"{result['gaps']}/{result['dups']}/{result['lost']}")
        return result

    def persist(self, which: str, make_server) -> dict:
        s = self.scale["persist"]
        clients = [[conv if which == "ours" else str(uuid.uuid4()), *members[0]]
                   for conv, members in self.fixture["pairs"][: s["pairs"]]]
        with make_server().start() as server, Generators(server.url, clients, 1, self.work, 20) as gens:
            gens.command({"cmd": "connect"}, timeout=120)
            phase = self.next_phase()
            cmd = {"cmd": "closed", "phase": phase, "duration": s["duration"], "start_at": time.time() + 0.3, "drain": 15}
            usage = service_processes()
            with Usage(server.procs) as use, Usage(gens.ps) as gen_use, Usage(usage["cassandra"]) as cass, \
                    Usage(usage["redis"]) as red:
                answer = merge(gens.command(cmd, timeout=s["duration"] + 60))
            result = self.summarise(answer, use, gen_use, None)
            result.pop("_samples")
            result["persisted_msgs_per_s"] = round(answer["acked"] / max(answer["seconds"], 1e-9), 1)
            result["cassandra_cpu_cores"] = round(cass.cores, 3) if usage["cassandra"] else None
            result["redis_cpu_cores"] = round(red.cores, 3) if usage["redis"] else None
            result["senders"] = len(clients)
            if which == "ours":
                result["read_back"] = self.read_back(server, clients)
        self.check(f"persist/{which}", result)
        if which == "ours" and not result["read_back"]["complete"]:
            self.failures.append(f"persist/ours: read-back {result['read_back']}")
        log(f"{which} persist ({self.args.store}): {result['persisted_msgs_per_s']} acked sends/s, "
            f"ack p99 {result['ack_latency']['p99_ms']} ms")
        script = ROOT / "bench" / "store_persist.py"
        if which == "ours" and s["store_count"] and script.exists():
            try:
                out = subprocess.run([PY, str(script), "--backend", self.args.store, "--count", str(s["store_count"])],
                                     cwd=ROOT, env=self.service_env(), capture_output=True, text=True, timeout=300)
                result["store_insert"] = (json.JSONDecoder().raw_decode(out.stdout[out.stdout.index("{"):])[0]
                                          if out.returncode == 0 else {"error": out.stderr[-500:]})
            except Exception as exc:  # someone else's script: report, never fail the run
                result["store_insert"] = {"error": f"{type(exc).__name__}: {exc}"}
        return result

    def read_back(self, server: Server, clients: list) -> dict:
        """Every conversation's messages from the store (REST history), seq 1..n without a hole."""
        expected = found = 0
        holes = 0
        for conv, _user, token in clients:
            seqs: list[int] = []
            after = 0
            while True:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{server.port}/api/v1/conversations/{conv}/messages/?after_seq={after}&limit=200",
                    headers={"Authorization": f"Token {token}", "Accept": "application/json"})
                with urllib.request.urlopen(request, timeout=20) as response:
                    page = json.loads(response.read())
                seqs.extend(m["seq"] for m in page["results"])
                if not page.get("has_more") or not page["results"]:
                    break
                after = seqs[-1]
            found += len(seqs)
            expected += max(seqs, default=0)
            holes += max(seqs, default=0) - len(set(seqs))
        return {"messages": found, "highest_seqs_total": expected, "holes": holes, "complete": holes == 0}

    # the whole run
    def run(self) -> int:
        started = time.time()
        scenarios = self.args.scenarios.split(",")
        self.prepare()
        machine = {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                   "python": sys.version.split()[0], "platform": sys.platform,
                   "cpu_model": _cpu_model()}
        self.results.update(machine=machine, store=self.args.store, smoke=self.args.smoke, redis=self.args.redis,
                            scale={k: v for k, v in self.scale.items() if k in scenarios}, targets=TARGETS,
                            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)))
        self.results["workers"] = self.workers
        durable = not self.args.no_baseline and self.args.store == "cassandra"
        if not self.args.no_baseline and not durable:
            log("no durable baseline: it writes to Cassandra, the service's store here is sql")
        makers = {"ours": self.ours, "baseline": self.baseline, "durable": self.durable}
        for scenario in scenarios:
            entry = self.results["scenarios"].setdefault(scenario, {})
            # The floors first (the raw relay, then the durable one), then the service. The durable
            # relay is measured where Cassandra's cost shows: fan-out, ramp, closed-loop persist.
            targets = [] if self.args.no_baseline else ["baseline"]
            if durable and scenario in ("fanout", "ramp", "persist"):
                targets.append("durable")
            if scenario == "persist":
                targets = [t for t in targets if t != "baseline"]
            for which in targets + ["ours"]:
                entry[which] = self._guard(f"{scenario}/{which}", getattr(self, scenario), which, makers[which])
        self.results["seconds"] = round(time.time() - started, 1)
        self.results["verdicts"] = verdicts(self.results)
        self.results["failures"] = self.failures
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "results.md").write_text(markdown(self.results))
        plot(self.samples, self.results, self.out / "latency.png")
        print(markdown(self.results))
        shutil.rmtree(self.work, ignore_errors=True)
        if self.failures:
            log("FAILED: " + "; ".join(self.failures))
            return 1
        log(f"done in {self.results['seconds']} s: {self.out}")
        return 0

    def _guard(self, label: str, fn, *args) -> dict:
        try:
            return fn(*args)
        except Exception as exc:
            log(f"{label}: harness error: {type(exc).__name__}: {exc}")
            self.failures.append(f"{label}: harness error {type(exc).__name__}: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# --- profile, verdicts, reports ---------------------------------------------------------------
def summarise_profile(raw: Path, top: int = 25) -> dict:
    """py-spy raw (collapsed) stacks -> self and inclusive share per function, and per area."""
    self_counts: dict[str, int] = {}
    incl: dict[str, int] = {}
    areas: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        # frames look like "func (path/file.py:123)"; keep "func (file.py)"
        names = []
        for f in frames:
            func, _, where = f.partition(" (")
            path = where.rsplit(":", 1)[0]
            names.append(f"{func} ({_short(path)})")
        self_counts[names[-1]] = self_counts.get(names[-1], 0) + n
        for name in set(names):
            incl[name] = incl.get(name, 0) + n
        area = _area(frames)
        areas[area] = areas.get(area, 0) + n
    pct = lambda c: round(100 * c / total, 1) if total else 0  # noqa: E731
    return {
        "samples": total,
        "areas_pct": {k: pct(v) for k, v in sorted(areas.items(), key=lambda kv: -kv[1])},
        "self_pct": [[k, pct(v)] for k, v in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]],
        "inclusive_pct": [[k, pct(v)] for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:top * 2]],
    }


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


AREA_RULES = [  # first match from the innermost frame outwards
    ("cassandra/", "cassandra driver"), ("django_cassandra_engine", "cassandra driver"),
    ("chat/store/cassandra", "chat store (cassandra)"),
    ("django/db/", "django ORM / sqlite"), ("sqlite3", "django ORM / sqlite"),
    ("channels_redis", "channels_redis layer"), ("redis/", "redis client"),
    ("prometheus_client", "prometheus metrics"), ("django_prometheus", "prometheus metrics"),
    ("json/", "json"), ("autobahn", "daphne/autobahn websocket"), ("daphne/", "daphne/autobahn websocket"),
    ("twisted", "twisted reactor / IO"), ("asgiref", "asgiref sync_to_async"), ("channels/", "channels consumer"),
    ("chat/", "chat app code"), ("notifications/", "notifications"), ("django/", "django other"),
    ("asyncio", "asyncio loop"), ("threading", "threads"),
]


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        for needle, area in AREA_RULES:
            if needle in frame:
                return area
    return "other"


def verdicts(results: dict) -> list[dict]:
    sc = results["scenarios"]
    out = []

    def get(*path):
        node = sc
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def add(name, ours, limit, passed, detail):
        out.append({"target": name, "measured": ours, "limit": limit,
                    "pass": None if passed is None else bool(passed), "detail": detail})

    p99, base_p99 = get("fanout", "ours", "latency", "p99_ms"), get("fanout", "baseline", "latency", "p99_ms")
    if p99 is not None:
        add("fan-out p99 <= 50 ms", p99, 50, p99 <= 50, "ms")
        if base_p99:
            add("fan-out p99 <= 3x baseline p99", p99, round(3 * base_p99, 2), p99 <= 3 * base_p99,
                f"baseline p99 {base_p99} ms")
    sat, base_sat = get("ramp", "ours", "saturation_deliveries_per_s"), get("ramp", "baseline", "saturation_deliveries_per_s")
    if sat is not None and base_sat:
        add("saturation >= 1/3 of baseline", sat, round(base_sat / 3, 1), sat >= base_sat / 3,
            f"deliveries/s (p99 < 100 ms); baseline {base_sat}")
    rss, base_rss = get("idle", "ours", "rss_per_connection_kib"), get("idle", "baseline", "rss_per_connection_kib")
    if rss is not None and base_rss:
        add("idle RSS/connection <= 3x baseline", rss, round(3 * base_rss, 1), rss <= 3 * base_rss,
            f"KiB; baseline {base_rss}")
    connect, base_connect = get("idle", "ours", "connect_seconds"), get("idle", "baseline", "connect_seconds")
    if connect is not None and base_connect:
        add("connecting the idle sockets <= 3x baseline", connect, round(3 * base_connect, 2),
            connect <= 3 * base_connect, f"s; baseline {base_connect}")
    storm, base_storm = get("idle", "ours", "storm"), get("idle", "baseline", "storm")
    if isinstance(storm, dict) and isinstance(base_storm, dict):
        back, total = storm.get("reconnected"), storm.get("connections")
        took, base_took = storm.get("all_ready_after_launch_s"), base_storm.get("all_ready_after_launch_s")
        passed = back == total and took is not None and base_took is not None and took <= 3 * base_took
        add("reconnect storm: all back within 3x baseline", f"{back}/{total} in {took} s",
            None if base_took is None else round(3 * base_took, 2), passed,
            f"s after the new server's launch; baseline {base_storm.get('reconnected')}/{base_storm.get('connections')} in {base_took} s")
    cpu, conns = get("idle", "ours", "idle_cpu_cores"), get("idle", "ours", "connections")
    if cpu is not None:
        add(f"{conns} idle connections < 5% of a core", round(100 * cpu, 2), 5, cpu < 0.05, "% of one core")
    bad = []
    for name, entry in sc.items():
        for which, r in entry.items():
            storm = [r["storm"]] if isinstance(r, dict) and isinstance(r.get("storm"), dict) else []
            for step in ([r] + r.get("steps", []) + storm) if isinstance(r, dict) else []:
                if any(step.get(k) for k in ("gaps", "dups", "lost")):
                    bad.append(f"{name}/{which}")
    add("zero gaps and duplicates, every scenario", len(bad), 0, not bad, ", ".join(sorted(set(bad))) or "none")
    return out


def _dig(node, *path):
    for k in path:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def markdown(results: dict) -> str:
    sc = results["scenarios"]
    m = results["machine"]
    lines = [f"# Benchmark results ({'smoke' if results['smoke'] else 'full'} run, store={results['store']})", "",
             f"{results['started']}, {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}; "
             f"Redis {results['redis']}; run took {results.get('seconds')} s.", ""]

    def v(x, unit=""):
        return "—" if x is None else f"{x}{unit}"

    names = {"ours": "chat service", "baseline": "raw relay", "durable": "durable relay"}

    def table(entry: dict, rows: list, which=("ours", "baseline", "durable")) -> list[str]:
        present = [w for w in which if isinstance(entry.get(w), dict)]
        out = ["| | " + " | ".join(names[w] for w in present) + " |", "|---" * (len(present) + 1) + "|"]
        for label, get in rows:
            out.append(f"| {label} | " + " | ".join(v(get(entry[w])) for w in present) + " |")
        return out + [""]

    def key(name):
        return lambda r: r.get(name)

    def lat(kind, label):
        return lambda r: (r.get(kind) or {}).get(label)

    def ratio(a, b, digits=3):
        return None if a is None or not b else round(a / b, digits)

    if "fanout" in sc:
        lines += [f"## Fan-out (the service: {results.get('workers')} daphne workers)", ""]
        rows = [(f"latency {label.replace('_ms', '')} (ms)", lat("latency", label)) for label in ("p50_ms", "p95_ms", "p99_ms", "max_ms")]
        rows += [("ack latency p99 (ms)", lat("ack_latency", "p99_ms")), ("offered msg/s", key("offered_msgs_per_s")),
                 ("deliveries/s", key("deliveries_per_s")), ("server CPU (cores)", key("server_cpu_cores")),
                 ("server CPU per acked message (ms)", key("server_cpu_ms_per_msg")),
                 ("server RSS (MiB)", key("server_rss_mib")), ("generator CPU (cores)", key("generator_cpu_cores")),
                 ("whole machine CPU (cores)", key("machine_cpu_cores")), ("errors", key("errors")),
                 ("gaps / dups / lost", lambda r: f"{r.get('gaps')} / {r.get('dups')} / {r.get('lost')}")]
        lines += table(sc["fanout"], rows)
    if "ramp" in sc:
        lines += ["## Saturation ramp (highest step with p99 < 100 ms, all delivered)", ""]
        lines += table(sc["ramp"], [("saturation msg/s", key("saturation_msgs_per_s")),
                                    ("saturation deliveries/s", key("saturation_deliveries_per_s")),
                                    ("p99 at saturation (ms)", key("saturation_p99_ms")),
                                    ("ladder exhausted", key("limited_by_ladder"))])
        lines += ["Server CPU per message = server cores / acked msg/s, in ms (each message with its deliveries); "
                  "the service's is summed over its workers.", "",
                  "| target | rate msg/s | deliveries/s | p50 ms | p99 ms | server cores | server CPU ms/msg "
                  "| generator cores | machine cores | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
        for which in ("ours", "baseline", "durable"):
            for st in (sc["ramp"].get(which) or {}).get("steps", []):
                lines.append(f"| {names[which]} | {st['offered_msgs_per_s']} | {st['deliveries_per_s']} | "
                             f"{st['latency']['p50_ms']} | {st['latency']['p99_ms']} | {st['server_cpu_cores']} | "
                             f"{v(st.get('server_cpu_ms_per_msg'))} | {st['generator_cpu_cores']} | "
                             f"{st.get('machine_cpu_cores')} | {'yes' if st['ok'] else 'no'} |")
        lines.append("")
    comparisons = []
    for floor in ("baseline", "durable"):
        comparisons.append((floor, {
            "fan-out p99 (service / floor)": ratio(_dig(sc, "fanout", "ours", "latency", "p99_ms"),
                                                   _dig(sc, "fanout", floor, "latency", "p99_ms"), 1),
            "fan-out deliveries/s (service / floor)": ratio(_dig(sc, "fanout", "ours", "deliveries_per_s"),
                                                            _dig(sc, "fanout", floor, "deliveries_per_s")),
            "saturation deliveries/s (service / floor)": ratio(_dig(sc, "ramp", "ours", "saturation_deliveries_per_s"),
                                                               _dig(sc, "ramp", floor, "saturation_deliveries_per_s")),
            "closed-loop acked sends/s (service / floor)": ratio(_dig(sc, "persist", "ours", "persisted_msgs_per_s"),
                                                                 _dig(sc, "persist", floor, "persisted_msgs_per_s")),
        }))
    if any(val is not None for _, c in comparisons for val in c.values()):
        lines += ["## The service against each floor", "", "| ratio | vs raw relay | vs durable relay |", "|---|---|---|"]
        for label in comparisons[0][1]:
            lines.append(f"| {label} | {v(comparisons[0][1][label])} | {v(comparisons[1][1][label])} |")
        lines.append("")
    if "idle" in sc:
        lines += ["## Idle connections", ""]
        lines += table(sc["idle"], [
            ("connections", key("connections")), ("connect time (s)", key("connect_seconds")),
            ("server CPU per handshake (ms)", key("connect_cpu_ms_per_handshake")),
            ("RSS with 1 connection (MiB)", key("rss_before_mib")),
            ("RSS with half the connections (MiB)", key("rss_half_mib")), ("RSS with all (MiB)", key("rss_after_mib")),
            ("RSS per connection, second half (KiB)", key("rss_per_connection_kib")),
            ("RSS per connection, average over all (KiB)", key("rss_per_connection_average_kib")),
            ("idle CPU (cores)", key("idle_cpu_cores")), ("window (s)", key("window_seconds")),
            ("whole machine CPU (cores)", key("machine_cpu_cores"))], which=("ours", "baseline"))
        storm = {w: r["storm"] for w, r in sc["idle"].items() if isinstance(r, dict) and isinstance(r.get("storm"), dict)}
        if storm:
            lines += ["### Reconnect storm (server restarted under the idle connections, all reconnect at once)", ""]
            lines += table(storm, [
                ("connections", key("connections")), ("reconnected", key("reconnected")),
                ("resume with after_seq (replay)", key("replay")), ("messages/s during the storm", key("rate_msgs_per_s")),
                ("server stop: SIGTERM to exited (s)", key("server_stop_seconds")),
                ("server start: launch to every worker answering (s)", key("server_start_seconds")),
                ("all ready, from the launch (s)", key("all_ready_after_launch_s")),
                ("p50 ready, from the launch (s)", key("p50_ready_after_launch_s")),
                ("all ready, from the SIGTERM (s)", key("all_ready_after_sigterm_s")),
                ("refused connection attempts", key("refused_attempts")),
                ("sent / acked", lambda r: f"{r.get('sent')} / {r.get('acked')}"),
                ("unanswered at the restart", key("unanswered_at_restart")),
                ("gaps / dups / lost", lambda r: f"{r.get('gaps')} / {r.get('dups')} / {r.get('lost')}")],
                which=("ours", "baseline"))
            if "baseline" in storm:
                lines += ["The raw relay keeps nothing, so it cannot replay: it is timed only (its gaps/dups/lost are "
                          "not checked).", ""]
    if "stream" in sc:
        first = next((r for r in sc["stream"].values() if isinstance(r, dict) and "users" in r), {})
        lines += ["## User stream: every user on one device in many conversations", "",
                  f"{first.get('users')} users, each in {first.get('per_user')} conversations of {first.get('size')} "
                  f"({first.get('conversations')} conversations), {first.get('offered_msgs_per_s')} msg/s offered. "
                  "The service: one user stream per user; the raw relay: one socket per user and conversation.", ""]
        lines += table(sc["stream"], [
            ("sockets held", key("sockets")), ("connect all (s)", key("connect_seconds")),
            ("server RSS per user (KiB)", key("rss_per_user_kib")),
            ("latency p50 (ms)", lat("latency", "p50_ms")), ("latency p99 (ms)", lat("latency", "p99_ms")),
            ("deliveries", key("received")), ("gaps / dups / lost", lambda r: f"{r.get('gaps')} / {r.get('dups')} / {r.get('lost')}"),
            ("server CPU (cores)", key("server_cpu_cores")),
        ])
    if "persist" in sc and isinstance(sc["persist"].get("durable"), dict):
        d = sc["persist"]["durable"]
        lines += ["## Closed-loop acked sends/s, durable relay (same senders)", "", "| metric | value |", "|---|---|",
                  f"| acked sends/s | {v(d.get('persisted_msgs_per_s'))} |",
                  f"| server CPU (cores) | {v(d.get('server_cpu_cores'))} |",
                  f"| ack latency p99 (ms) | {v(d.get('ack_latency', {}).get('p99_ms'))} |", ""]
    if "persist" in sc:
        o = sc["persist"].get("ours", {})
        lines += [f"## Persist throughput (store={results['store']}, closed loop, {o.get('senders')} senders)", "",
                  "| metric | value |", "|---|---|"]
        for label, key in (("acked sends/s", "persisted_msgs_per_s"), ("server CPU (cores)", "server_cpu_cores"),
                           ("whole machine CPU (cores, of 2)", "machine_cpu_cores"), ("errors", "errors"),
                           ("cassandra CPU (cores)", "cassandra_cpu_cores"), ("redis CPU (cores)", "redis_cpu_cores")):
            lines.append(f"| {label} | {v(o.get(key))} |")
        for label in ("p50_ms", "p95_ms", "p99_ms"):
            lines.append(f"| ack latency {label.replace('_ms', '')} (ms) | {v(o.get('ack_latency', {}).get(label))} |")
        lines.append(f"| read back from the store | {o.get('read_back')} |")
        if o.get("store_insert"):
            lines.append(f"| bench/store_persist.py (raw insert) | `{json.dumps(o['store_insert'])[:300]}` |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | limit | result |", "|---|---|---|---|"]
    for t in results.get("verdicts", []):
        lines.append(f"| {t['target']} | {t['measured']} ({t['detail']}) | {t['limit']} | "
                     f"{'PASS' if t['pass'] else 'FAIL'} |")
    if results.get("failures"):
        lines += ["", "Harness failures: " + "; ".join(results["failures"])]
    return "\n".join(lines) + "\n"


def plot(samples: dict[str, list[int]], results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    labels = {"ours": "chat service", "baseline": "raw relay", "durable": "durable relay"}
    for key, color in (("fanout/ours", "tab:red"), ("fanout/baseline", "tab:blue"), ("fanout/durable", "tab:green")):
        values = sorted(samples.get(key, []))
        if not values:
            continue
        ms = [x / 1000 for x in values]
        ys = [(i + 1) / len(ms) for i in range(len(ms))]
        label = labels[key.split("/")[1]]
        ax.plot(ms, ys, color=color, label=f"{label} (p99 {percentile(values, 0.99) / 1000:.1f} ms)")
    ax.axvline(50, color="grey", linestyle="--", linewidth=1, label="50 ms target")
    ax.set_xscale("log")
    ax.set_xlabel("send -> deliver latency (ms, log)")
    ax.set_ylabel("fraction of deliveries")
    fo = results["scale"].get("fanout", {})
    ax.set_title(f"Fan-out latency CDF ({fo.get('groups', 0) * fo.get('size', 0)} clients, {fo.get('rate')} msg/s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax = axes[1]
    for which, color, label in (("ours", "tab:red", "chat service"), ("baseline", "tab:blue", "raw relay"),
                                ("durable", "tab:green", "durable relay")):
        steps = results["scenarios"].get("ramp", {}).get(which, {}).get("steps", [])
        steps = list({st["offered_msgs_per_s"]: st for st in steps}.values())  # the last attempt per rate
        pts = [(s["deliveries_per_s"], s["latency"]["p99_ms"]) for s in steps if s["latency"]["p99_ms"] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{label} p99")
            p50 = [(s["deliveries_per_s"], s["latency"]["p50_ms"]) for s in steps if s["latency"]["p50_ms"] is not None]
            ax.plot([p[0] for p in p50], [p[1] for p in p50], "x:", color=color, label=f"{label} p50")
    ax.axhline(100, color="grey", linestyle="--", linewidth=1, label="100 ms (saturation)")
    ax.set_yscale("log")
    ax.set_xlabel("delivered messages/s")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title("Saturation ramp")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--smoke", action="store_true", help="every scenario tiny; for CI")
    parser.add_argument("--store", choices=["sql", "cassandra"], default=None,
                        help="message store of the service (default: cassandra, or sql with --smoke)")
    parser.add_argument("--keyspace", default="chat_bench", help="Cassandra keyspace (created if missing)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13", help="Redis for both servers (not db 0/14/15)")
    parser.add_argument("--scenarios", default="fanout,ramp,idle,persist,stream")
    parser.add_argument("--no-baseline", action="store_true", help="the service only (neither relay)")
    parser.add_argument("--workers", type=int, default=0,
                        help="daphne workers of the service (scripts/serve.py); default: the usable cores, "
                        "as `make run` with REDIS_URL")
    parser.add_argument("--profile", action="store_true", help="py-spy the service during an extra fan-out phase")
    parser.add_argument("--gen-procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--database-url", default="",
                        help="relational database of the service (default: a temporary SQLite file); "
                        "an empty PostgreSQL database for the production configuration")
    parser.add_argument("--conn-max-age", type=int, default=60, help="DATABASE_CONN_MAX_AGE of the service")
    parser.add_argument("--service-env", action="append", default=[], metavar="NAME=VALUE",
                        help="one more environment variable for the service (repeatable), e.g. CHAT_WORKER_THREADS=4")
    args = parser.parse_args()
    if args.store is None:
        args.store = "sql" if args.smoke else "cassandra"
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
