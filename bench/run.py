"""The benchmark: the chat service and a raw relay baseline, measured in one run by one generator.

    .venv/bin/python -m bench.run --out bench/results                  # full run, Cassandra + Redis (~12 min)
    .venv/bin/python -m bench.run --smoke --out /tmp/bench-smoke       # every scenario tiny (<60 s), SQL store
    options: --store sql|cassandra  --scenarios fanout,ramp,idle,persist  --no-baseline  --profile
             --redis redis://127.0.0.1:6379/13  --gen-procs N  --service-env NAME=VALUE

Writes results.json, results.md and latency.png under --out. Exits 1 when any scenario shows a
gap, a duplicate, a lost message or a broken harness (the smoke's pass criterion; missed
performance targets are reported, not failed). Loopback only; every phase is bounded in time.

Scenarios (same generator, same clients, against both servers unless noted):
  fanout   conversations of 10, an open-loop send rate (full: 500 clients, 200 msg/s = 2,000
           deliveries/s for 30 s after a 5 s warm-up): send->deliver latency, deliveries/s, gaps,
           duplicates, lost, server CPU and RSS.
  ramp     the same clients, rising send rates in steps; saturation = the highest step with
           p99 < 100 ms, everything acked and delivered, no gap or duplicate.
  idle     (full: 2,000) authenticated connections held open, opened in two halves: RSS per
           connection = the second half's RSS growth over its count (what one more connection
           costs, without what the first ones warm once: pools' database connections, caches);
           the average over all of them is reported too. Server CPU while idle: a 30 s window
           (includes daphne's 20 s protocol pings and the 20 s presence refresh).
  persist  (the service only) closed-loop senders in two-person conversations (one side
           connected): acked sends/s through the whole send pipeline on the chosen store, ack
           latency, and a read-back of every acked seq from the store; plus bench/store_persist.py's
           raw MessageStore.insert latency when that script is present.
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
DAPHNE_ARGS = ["--websocket-max-message-size", "2097152", "--websocket-max-frame-size", "2097152"]

FULL = {
    "fanout": {"groups": 50, "size": 10, "rate": 200, "warmup": 5, "duration": 30},
    "ramp": {"groups": 50, "size": 10, "step": 6,
             "rates": [5, 10, 15, 25, 50, 100, 150, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000, 2500, 3000, 4000]},
    "idle": {"groups": 200, "size": 10, "window": 30, "settle": 5},
    "persist": {"pairs": 20, "duration": 15, "store_count": 500},
    "profile_seconds": 20,
    "profile_rate": 40,
}
SMOKE = {
    "fanout": {"groups": 2, "size": 10, "rate": 20, "warmup": 1, "duration": 2},
    "ramp": {"groups": 2, "size": 10, "step": 1.5, "rates": [20, 60]},
    "idle": {"groups": 4, "size": 10, "window": 2, "settle": 1},
    "persist": {"pairs": 4, "duration": 2, "store_count": 0},
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
class Server:
    """A server process on 127.0.0.1 (daphne + the service, or the baseline relay)."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path, ws_path: str) -> None:
        self.name, self.argv, self.env, self.log_path, self.ws_path = name, argv, env, log_path, ws_path
        self.port = free_port()
        self.process: subprocess.Popen | None = None

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
                    self.ps = psutil.Process(self.process.pid)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
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
        self.cores = (self._cpu() - self.cpu0) / self.seconds if self.seconds > 0 else 0.0
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
        if self.args.store == "cassandra":
            log(f"cassandra_schema --keyspace {self.args.keyspace}")
            subprocess.run([PY, "manage.py", "cassandra_schema", "--keyspace", self.args.keyspace], cwd=ROOT, env=env,
                           check=True, timeout=120, stdout=subprocess.DEVNULL)
        groups = max(self.scale[s]["groups"] for s in ("fanout", "ramp", "idle"))
        size = self.scale["idle"]["size"]
        fixture = self.work / "fixture.json"
        log(f"seeding {groups} groups of {size} + {self.scale['persist']['pairs']} pairs")
        subprocess.run([PY, "-m", "bench.seed", "--groups", str(groups), "--size", str(size), "--pairs",
                        str(self.scale["persist"]["pairs"]), "--out", str(fixture)], cwd=ROOT, env=env, check=True)
        self.fixture = json.loads(fixture.read_text())

    def clients(self, groups: int, baseline: bool) -> list[list[str]]:
        picked = self.fixture["groups"][:groups]
        if baseline:  # fresh conversation ids: the relay's seq counters start at 0 for each run
            picked = [[f"{uuid.uuid4()}", members] for _, members in picked]
        return [[conv, user, token] for conv, members in picked for user, token in members]

    def ours(self) -> Server:
        return Server("chat (daphne)", [PY, "-m", "daphne", *DAPHNE_ARGS, "-b", "127.0.0.1", "-p", "{port}",
                                        "chatproject.asgi:application"],
                      self.service_env(), self.out / "server-chat.log", "/ws/chat/")

    def baseline(self) -> Server:
        return Server("baseline relay", [PY, "-m", "bench.baseline_relay", "--port", "{port}", "--redis", self.args.redis],
                      dict(os.environ), self.out / "server-baseline.log", "/")

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
        with Usage([server.ps]) as use, Usage(gens.ps) as gen_use:
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
        }
        result["_samples"] = latencies
        return result

    # scenarios
    def fanout(self, which: str, make_server) -> dict:
        s = self.scale["fanout"]
        clients = self.clients(s["groups"], which == "baseline")
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
        spy = subprocess.Popen([pyspy, "record", "--pid", str(server.process.pid), "--rate", "100", "--duration",
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
        clients = self.clients(s["groups"], which == "baseline")
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
                    f" server {r['server_cpu_cores']} gen {r['generator_cpu_cores']} cores -> {'ok' if ok else 'over'}")
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
        clients = self.clients(s["groups"], which == "baseline")
        with make_server().start() as server:
            # one connection first (warms imports, pools and caches), then the RSS before
            with Generators(server.url, clients[:1], 1, self.work, 1) as warm:
                warm.command({"cmd": "connect"}, timeout=60)
                time.sleep(1)
                rss_before = Usage([server.ps]).rss()
                # In two halves: the second half's growth is what one more connection costs, without
                # what the first connections warm once (thread pools' database connections and
                # caches, interned strings, allocator arenas).
                half = 1 + (len(clients) - 1) // 2
                with Generators(server.url, clients[1:half], self.args.gen_procs, self.work, 50) as first, \
                        Generators(server.url, clients[half:], self.args.gen_procs, self.work, 50) as gens:
                    connect_first = first.command({"cmd": "connect"}, timeout=600)
                    time.sleep(s["settle"])
                    rss_half = Usage([server.ps]).rss()
                    connect_second = gens.command({"cmd": "connect"}, timeout=600)
                    connect = merge(connect_first + connect_second)
                    connect["seconds"] = round(merge(connect_first)["seconds"] + merge(connect_second)["seconds"], 3)
                    log(f"{which} idle: {connect['connected']}/{len(clients) - 1} connected in {connect['seconds']} s")
                    time.sleep(s["settle"])
                    with Usage([server.ps]) as use, Usage(first.ps + gens.ps) as gen_use:
                        idle = {"cmd": "idle", "duration": s["window"]}
                        first.send(idle)
                        gens.send(idle)
                        answer = merge(first.collect(idle, s["window"] + 30) + gens.collect(idle, s["window"] + 30))
        n = connect["connected"]
        second_half = len(clients) - half
        result = {
            "connections": n + 1, "connect_seconds": connect["seconds"], "connect_failed": connect["failed"],
            "rss_before_mib": round(rss_before / 2**20, 1), "rss_half_mib": round(rss_half / 2**20, 1),
            "rss_after_mib": round(use.end_rss / 2**20, 1),
            "rss_per_connection_kib": round((use.end_rss - rss_half) / max(second_half, 1) / 1024, 1),
            "rss_per_connection_average_kib": round((use.end_rss - rss_before) / max(n, 1) / 1024, 1),
            "idle_cpu_cores": round(use.cores, 4), "window_seconds": round(use.seconds, 1),
            "generator_cpu_cores": round(gen_use.cores, 4), "machine_cpu_cores": round(use.machine_cores, 3),
            "closed": answer.get("closed"), "errors": answer["errors"],
        }
        if n != len(clients) - 1 or answer.get("closed"):
            self.failures.append(f"idle/{which}: {n}/{len(clients) - 1} connected, {answer.get('closed')} closed")
        log(f"{which} idle: {result['rss_per_connection_kib']} KiB/connection, {result['idle_cpu_cores']} cores")
        return result

    def persist(self) -> dict:
        s = self.scale["persist"]
        clients = [[conv, *members[0]] for conv, members in self.fixture["pairs"][: s["pairs"]]]
        with self.ours().start() as server, Generators(server.url, clients, 1, self.work, 20) as gens:
            gens.command({"cmd": "connect"}, timeout=120)
            phase = self.next_phase()
            cmd = {"cmd": "closed", "phase": phase, "duration": s["duration"], "start_at": time.time() + 0.3, "drain": 15}
            usage = service_processes()
            with Usage([server.ps]) as use, Usage(gens.ps) as gen_use, Usage(usage["cassandra"]) as cass, \
                    Usage(usage["redis"]) as red:
                answer = merge(gens.command(cmd, timeout=s["duration"] + 60))
            result = self.summarise(answer, use, gen_use, None)
            result.pop("_samples")
            result["persisted_msgs_per_s"] = round(answer["acked"] / max(answer["seconds"], 1e-9), 1)
            result["cassandra_cpu_cores"] = round(cass.cores, 3) if usage["cassandra"] else None
            result["redis_cpu_cores"] = round(red.cores, 3) if usage["redis"] else None
            result["senders"] = len(clients)
            result["read_back"] = self.read_back(server, clients)
        self.check("persist/ours", result)
        if not result["read_back"]["complete"]:
            self.failures.append(f"persist/ours: read-back {result['read_back']}")
        log(f"persist ({self.args.store}): {result['persisted_msgs_per_s']} acked sends/s, "
            f"ack p99 {result['ack_latency']['p99_ms']} ms")
        script = ROOT / "bench" / "store_persist.py"
        if s["store_count"] and script.exists():
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
        targets = ["ours"] + ([] if self.args.no_baseline else ["baseline"])
        makers = {"ours": self.ours, "baseline": self.baseline}
        for scenario in scenarios:
            entry = self.results["scenarios"].setdefault(scenario, {})
            if scenario == "persist":
                entry["ours"] = self._guard("persist/ours", self.persist)
                continue
            for which in reversed(targets):  # baseline first: the machine's floor, then the service
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
    cpu, conns = get("idle", "ours", "idle_cpu_cores"), get("idle", "ours", "connections")
    if cpu is not None:
        add(f"{conns} idle connections < 5% of a core", round(100 * cpu, 2), 5, cpu < 0.05, "% of one core")
    bad = []
    for name, entry in sc.items():
        for which, r in entry.items():
            for step in ([r] + r.get("steps", [])) if isinstance(r, dict) else []:
                if any(step.get(k) for k in ("gaps", "dups", "lost")):
                    bad.append(f"{name}/{which}")
    add("zero gaps and duplicates, every scenario", len(bad), 0, not bad, ", ".join(sorted(set(bad))) or "none")
    return out


def markdown(results: dict) -> str:
    sc = results["scenarios"]
    m = results["machine"]
    lines = [f"# Benchmark results ({'smoke' if results['smoke'] else 'full'} run, store={results['store']})", "",
             f"{results['started']}, {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}; "
             f"Redis {results['redis']}; run took {results.get('seconds')} s.", ""]

    def v(x, unit=""):
        return "—" if x is None else f"{x}{unit}"

    if "fanout" in sc:
        lines += ["## Fan-out", "", "| | chat service | baseline relay |", "|---|---|---|"]
        o, b = sc["fanout"].get("ours", {}), sc["fanout"].get("baseline", {})
        rows = [("offered msg/s", "offered_msgs_per_s"), ("deliveries/s", "deliveries_per_s"),
                ("server CPU (cores)", "server_cpu_cores"), ("server RSS (MiB)", "server_rss_mib"),
                ("generator CPU (cores)", "generator_cpu_cores"),
                ("whole machine CPU (cores, of 2)", "machine_cpu_cores"), ("errors", "errors"), ("gaps / dups / lost", None)]
        for label in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
            lines.append(f"| latency {label.replace('_ms', '')} (ms) | {v(o.get('latency', {}).get(label))} | "
                         f"{v(b.get('latency', {}).get(label))} |")
        lines.append(f"| ack latency p99 (ms) | {v(o.get('ack_latency', {}).get('p99_ms'))} | "
                     f"{v(b.get('ack_latency', {}).get('p99_ms'))} |")
        for label, key in rows:
            if key is None:
                lines.append(f"| {label} | {o.get('gaps')} / {o.get('dups')} / {o.get('lost')} | "
                             f"{b.get('gaps')} / {b.get('dups')} / {b.get('lost')} |")
            else:
                lines.append(f"| {label} | {v(o.get(key))} | {v(b.get(key))} |")
        lines.append("")
    if "ramp" in sc:
        lines += ["## Saturation ramp (highest step with p99 < 100 ms, all delivered)", "",
                  "| | chat service | baseline relay |", "|---|---|---|"]
        o, b = sc["ramp"].get("ours", {}), sc["ramp"].get("baseline", {})
        for label, key in (("saturation msg/s", "saturation_msgs_per_s"),
                           ("saturation deliveries/s", "saturation_deliveries_per_s"),
                           ("p99 at saturation (ms)", "saturation_p99_ms"), ("ladder exhausted", "limited_by_ladder")):
            lines.append(f"| {label} | {v(o.get(key))} | {v(b.get(key))} |")
        lines += ["", "| target | rate msg/s | deliveries/s | p50 ms | p99 ms | server cores | generator cores "
                      "| machine cores | ok |", "|---|---|---|---|---|---|---|---|---|"]
        for which, r in (("chat", o), ("baseline", b)):
            for st in r.get("steps", []):
                lines.append(f"| {which} | {st['offered_msgs_per_s']} | {st['deliveries_per_s']} | "
                             f"{st['latency']['p50_ms']} | {st['latency']['p99_ms']} | {st['server_cpu_cores']} | "
                             f"{st['generator_cpu_cores']} | {st.get('machine_cpu_cores')} | {'yes' if st['ok'] else 'no'} |")
        lines.append("")
    if "idle" in sc:
        lines += ["## Idle connections", "", "| | chat service | baseline relay |", "|---|---|---|"]
        o, b = sc["idle"].get("ours", {}), sc["idle"].get("baseline", {})
        for label, key in (("connections", "connections"), ("connect time (s)", "connect_seconds"),
                           ("RSS with 1 connection (MiB)", "rss_before_mib"),
                           ("RSS with half the connections (MiB)", "rss_half_mib"),
                           ("RSS with all (MiB)", "rss_after_mib"),
                           ("RSS per connection, second half (KiB)", "rss_per_connection_kib"),
                           ("RSS per connection, average over all (KiB)", "rss_per_connection_average_kib"),
                           ("idle CPU (cores)", "idle_cpu_cores"), ("window (s)", "window_seconds"),
                           ("whole machine CPU (cores, of 2)", "machine_cpu_cores")):
            lines.append(f"| {label} | {v(o.get(key))} | {v(b.get(key))} |")
        lines.append("")
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
    for key, color in (("fanout/ours", "tab:red"), ("fanout/baseline", "tab:blue")):
        values = sorted(samples.get(key, []))
        if not values:
            continue
        ms = [x / 1000 for x in values]
        ys = [(i + 1) / len(ms) for i in range(len(ms))]
        label = "chat service" if key.endswith("ours") else "baseline relay"
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
    for which, color, label in (("ours", "tab:red", "chat service"), ("baseline", "tab:blue", "baseline relay")):
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
    parser.add_argument("--scenarios", default="fanout,ramp,idle,persist")
    parser.add_argument("--no-baseline", action="store_true")
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
