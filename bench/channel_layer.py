#!/usr/bin/env python
"""Channel-layer benchmark: channels_redis core RedisChannelLayer vs RedisPubSubChannelLayer.

Models this service's WebSocket fan-out: every WebSocket connection is a channel (from
``new_channel()``) added to its conversation's group ``conversation.<hex>``; a chat message is one
``group_send`` of a ~500-byte event dict to that group. Receivers live in 2 worker processes (like 2
daphne processes, each group's members split between them); the sender lives in the main process.

Scenarios (each bounded; the default run takes ~2.5 minutes on 2 cores):
  fan-out     G groups x M members, at a fixed target rate and at max rate (C concurrent senders):
              send->receive latency p50/p95/p99, deliveries/s, events lost, sender group_send cost
              (wall µs per call and sender-process CPU µs per call), Redis CPU per 1000 deliveries.
  slow        one channel stops calling receive() for 10 s while the others keep reading.
  stalled     one whole receiver process blocks its event loop for 10 s (a daphne process stuck in
              sync code / GC / CPU starvation), the other process keeps reading.
  idle        (core only) receive() on a channel with no traffic for 6 s: does it raise?
  outage      (only with --outage; stops and restarts the shared Redis with scripts/services.sh)
              group_send every 50 ms while Redis is stopped for ~4 s and started again: errors,
              how long group_send blocks, whether receivers get messages again without re-adding.

Usage:
  .venv/bin/python bench/channel_layer.py                 # fan-out + slow + stalled + idle
  .venv/bin/python bench/channel_layer.py --outage-only   # only the Redis outage test
  options: --redis redis://127.0.0.1:6379/14 --layers core,pubsub --json-out FILE --quick

Loopback only. Uses Redis DB 14 (FLUSHDB at start). Prints a JSON summary, then markdown tables.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
import uuid
from array import array

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.sysconf("SC_PAGE_SIZE")

# ------------------------------------------------------------------------------------------------
# layer construction


def make_layer(kind: str, cfg: dict):
    host = {"address": cfg["redis"]}
    if cfg.get("socket_timeout", "default") != "default":
        host["socket_timeout"] = cfg["socket_timeout"]
    if kind == "core":
        from channels_redis.core import RedisChannelLayer

        return RedisChannelLayer(
            hosts=[host],
            capacity=cfg["capacity"],
            expiry=cfg["expiry"],
            group_expiry=cfg["group_expiry"],
        )
    from channels_redis.pubsub import RedisPubSubChannelLayer

    return RedisPubSubChannelLayer(hosts=[host])


def make_event(seq: int, group: str) -> dict:
    """~500 bytes as JSON: the shape of chat.events.message_new."""
    return {
        "type": "message.new",
        "ts": time.time(),
        "seq": seq,
        "message": {
            "id": str(uuid.uuid4()),
            "conversation_id": group.split(".", 1)[1],
            "seq": seq,
            "sender_id": str(uuid.uuid4()),
            "client_id": str(uuid.uuid4()),
            "kind": "text",
            "body": "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
            "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud.",
            "created_at": "2025-01-01T12:00:00.000000+00:00",
            "edited_at": None,
            "deleted": False,
            "reply_to": None,
            "attachments": [],
        },
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def lat_summary(vals) -> dict:
    s = sorted(vals)
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {"n": len(s), "p50_ms": ms(pct(s, 50)), "p95_ms": ms(pct(s, 95)), "p99_ms": ms(pct(s, 99)),
            "max_ms": ms(s[-1] if s else None)}


# ------------------------------------------------------------------------------------------------
# receiver process


def receiver_main(kind, cfg, proc_index, groups, members, conn, fault):
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_receiver(kind, cfg, proc_index, groups, members, conn, fault))


async def _receiver(kind, cfg, proc_index, groups, members, conn, fault):
    layer = make_layer(kind, cfg)
    channels = []  # (channel, group)
    for g in groups:
        for _ in range(members):
            ch = await layer.new_channel()
            await layer.group_add(g, ch)
            channels.append((ch, g))
    slow_ch = channels[0][0] if fault and fault["kind"] == "slow" and proc_index == 0 else None
    stats = {ch: {"n": 0, "dup": 0, "last": {}} for ch, _ in channels}
    recv_t = array("d")  # receive time
    lat = array("d")  # latency
    is_slow = array("b")
    errors: dict[str, int] = {}
    error_log = []  # (t, type) first few
    seqs_after = {}  # outage mode: channel -> list of seqs
    state = {"go": None}
    rss = []
    qmax = {"slow_local_queue_max": 0}

    def local_qsize(ch):
        try:
            if kind == "core":
                q = layer.receive_buffer.get(ch)
                return q.qsize() if q is not None else 0
            return layer._get_layer().channels[ch].qsize()
        except Exception:
            return -1

    async def consume(ch, g):
        st = stats[ch]
        while True:
            if ch == slow_ch and state["go"] is not None:
                el = time.time() - state["go"]
                if fault["start"] <= el < fault["start"] + fault["duration"]:
                    await asyncio.sleep(fault["start"] + fault["duration"] - el)
                    continue
            try:
                msg = await layer.receive(ch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # in a Channels consumer this would end the consumer
                name = type(e).__module__ + "." + type(e).__name__
                errors[name] = errors.get(name, 0) + 1
                if len(error_log) < 20:
                    error_log.append((round(time.time(), 3), name, str(e)[:120]))
                await asyncio.sleep(0.05)
                continue
            now = time.time()
            st["n"] += 1
            recv_t.append(now)
            lat.append(now - msg["ts"])
            is_slow.append(1 if ch == slow_ch else 0)
            if fault and fault["kind"] == "outage":
                seqs_after.setdefault(ch, []).append(msg["seq"])

    async def sampler():
        while True:
            rss.append((round(time.time(), 3), rss_bytes()))
            if slow_ch:
                qmax["slow_local_queue_max"] = max(qmax["slow_local_queue_max"], local_qsize(slow_ch))
            await asyncio.sleep(0.25)

    tasks = [asyncio.ensure_future(consume(ch, g)) for ch, g in channels]
    tasks.append(asyncio.ensure_future(sampler()))
    prefix = getattr(layer, "client_prefix", None)
    conn.send(("ready", {"channels": len(channels), "client_prefix": prefix}))

    async def recv_cmd():
        while not conn.poll():
            await asyncio.sleep(0.02)
        return conn.recv()

    cmd = await recv_cmd()
    assert cmd[0] == "go"
    state["go"] = cmd[1]
    stall_task = None
    if fault and fault["kind"] == "stalled" and proc_index == 0:
        async def stall():
            await asyncio.sleep(max(0, state["go"] + fault["start"] - time.time()))
            time.sleep(fault["duration"])  # block the whole event loop
        stall_task = asyncio.ensure_future(stall())
    cmd = await recv_cmd()
    assert cmd[0] == "stop"
    expected = cmd[1]  # group -> count of successful group_send
    # drain: until everything expected arrived or 4 s without progress (max 15 s)
    t_end = time.time() + 15
    last_total, last_change = -1, time.time()
    while time.time() < t_end:
        total = sum(s["n"] for s in stats.values())
        if all(stats[ch]["n"] >= expected.get(g, 0) for ch, g in channels):
            break
        if total != last_total:
            last_total, last_change = total, time.time()
        elif time.time() - last_change > 4:
            break
        await asyncio.sleep(0.1)
    for t in tasks:
        t.cancel()
    if stall_task:
        stall_task.cancel()
    per_channel_lost = []
    for ch, g in channels:
        per_channel_lost.append((ch == slow_ch, max(0, expected.get(g, 0) - stats[ch]["n"]),
                                 max(0, stats[ch]["n"] - expected.get(g, 0))))
    conn.send(("result", {
        "received": sum(s["n"] for s in stats.values()),
        "expected": sum(expected.get(g, 0) for _, g in channels),
        "lost": sum(x[1] for x in per_channel_lost),
        "extra": sum(x[2] for x in per_channel_lost),
        "slow_lost": sum(x[1] for x in per_channel_lost if x[0]),
        "slow_received": stats[slow_ch]["n"] if slow_ch else None,
        "recv_t": recv_t.tobytes(), "lat": lat.tobytes(), "is_slow": is_slow.tobytes(),
        "errors": errors, "error_log": error_log, "rss": rss, **qmax,
        "seqs": {k: v for k, v in seqs_after.items()},
    }))
    try:
        await asyncio.wait_for(layer.flush(), 5)
    except Exception:
        pass


# ------------------------------------------------------------------------------------------------
# sender side


class OverCapacityCounter(logging.Handler):
    """channels_redis.core logs 'N of M channels over capacity' at INFO when group_send drops."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.dropped = 0
        self.events = 0

    def emit(self, record):
        if "over capacity" in record.getMessage():
            self.events += 1
            self.dropped += int(record.args[0])


def redis_sync(url):
    import redis

    return redis.Redis.from_url(url)


def redis_cpu(r) -> float:
    i = r.info("cpu")
    return float(i["used_cpu_sys"]) + float(i["used_cpu_user"])


def start_receivers(kind, cfg, group_names, members, fault, nproc=2):
    ctx = mp.get_context("spawn")
    procs = []
    per_proc_members = [members // nproc + (1 if i < members % nproc else 0) for i in range(nproc)]
    for i in range(nproc):
        if per_proc_members[i] == 0:
            continue
        parent, child = ctx.Pipe()
        p = ctx.Process(target=receiver_main,
                        args=(kind, cfg, i, group_names, per_proc_members[i], child, fault), daemon=True)
        p.start()
        procs.append((p, parent))
    infos = []
    for p, c in procs:
        if not c.poll(60):
            raise RuntimeError("receiver did not get ready")
        infos.append(c.recv()[1])
    return procs, infos


def collect(procs, expected):
    for p, c in procs:
        c.send(("stop", expected))
    results = []
    for p, c in procs:
        if not c.poll(30):
            raise RuntimeError("receiver did not report")
        results.append(c.recv()[1])
        p.join(10)
    return results


async def run_sender(kind, cfg, group_names, mode, rate, count, duration, concurrency, t_go,
                     monitor=None, outage=None, hot=0.0):
    layer = make_layer(kind, cfg)
    sent_ok = {g: 0 for g in group_names}
    durs = array("d")
    errors: dict[str, int] = {}
    send_log = []  # outage mode: (t_start, dur, ok/err)
    seq = [0]
    # warm the connection(s)
    await layer.group_send("warmup.x", {"type": "x", "ts": time.time(), "seq": -1})
    await asyncio.sleep(max(0, t_go - time.time()))
    cpu0 = time.process_time()
    t0 = time.time()

    async def one(g):
        s = seq[0]
        seq[0] += 1
        ev = make_event(s, g)
        t = time.perf_counter()
        ts = time.time()
        try:
            if outage:
                await asyncio.wait_for(layer.group_send(g, ev), outage["send_timeout"])
            else:
                await layer.group_send(g, ev)
            ok = True
            sent_ok[g] += 1
        except Exception as e:
            ok = False
            name = type(e).__module__ + "." + type(e).__name__
            errors[name] = errors.get(name, 0) + 1
        d = time.perf_counter() - t
        durs.append(d)
        if outage is not None:
            send_log.append((ts, d, "ok" if ok else name, s))

    ng = len(group_names)
    if mode == "rate":
        i = 0
        while True:
            if count and i >= count:
                break
            if duration and time.time() - t0 >= duration:
                break
            target = t0 + i / rate
            delay = target - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if hot and (i % 10) < hot * 10:
                await one(group_names[0])  # the hot conversation (the slow consumer's)
            elif hot:
                await one(group_names[1 + i % (ng - 1)])
            else:
                await one(group_names[i % ng])
            i += 1
    else:  # max rate: `concurrency` tasks back to back for `duration` s
        async def worker(w):
            j = w
            while time.time() - t0 < duration:
                await one(group_names[j % ng])
                j += concurrency
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    t1 = time.time()
    cpu1 = time.process_time()
    try:
        await asyncio.wait_for(layer.flush() if kind == "pubsub" else layer.close_pools(), 5)
    except Exception:
        pass
    ds = sorted(durs)
    return {
        "sent_ok": sent_ok, "sends": len(durs), "send_errors": errors, "send_window_s": t1 - t0,
        "t0": t0, "t1": t1,
        "group_send_wall_us": {"mean": round(statistics.fmean(ds) * 1e6, 1) if ds else None,
                               "p50": round(pct(ds, 50) * 1e6, 1) if ds else None,
                               "p99": round(pct(ds, 99) * 1e6, 1) if ds else None,
                               "max": round(ds[-1] * 1e6, 1) if ds else None},
        "group_send_cpu_us": round((cpu1 - cpu0) / max(1, len(ds)) * 1e6, 1),
        "send_log": send_log,
    }


async def monitor_redis(url, stop_evt, samples, core_keys):
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        while not stop_evt.is_set():
            try:
                m = await r.info("memory")
                row = {"t": round(time.time(), 3), "used_memory": m["used_memory"],
                       "mem_clients_normal": m.get("mem_clients_normal")}
                if core_keys:
                    row["core_proc_keys_zcard"] = [await r.zcard(k) for k in core_keys]
                else:
                    cl = await r.client_list(_type="pubsub")
                    row["pubsub_omem_max"] = max([int(c.get("omem", 0)) for c in cl] or [0])
                samples.append(row)
            except Exception:
                pass
            await asyncio.sleep(0.25)
    finally:
        await r.aclose()


def run_scenario(kind, cfg, name, groups, members, mode, rate=None, count=None, duration=None,
                 concurrency=1, fault=None, monitor=False, hot=0.0):
    r = redis_sync(cfg["redis"])
    r.flushdb()
    group_names = [f"conversation.{uuid.uuid4().hex}" for _ in range(groups)]
    procs, infos = start_receivers(kind, cfg, group_names, members, fault)
    cap_counter = OverCapacityCounter()
    lg = logging.getLogger("channels_redis.core")
    lg.addHandler(cap_counter)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    mem0 = r.info("memory")["used_memory"]
    cpu0 = redis_cpu(r)
    t_go = time.time() + 0.3
    for p, c in procs:
        c.send(("go", t_go))
    core_keys = [f"{cfg['prefix']}specific.{i['client_prefix']}!" for i in infos] if kind == "core" else None

    async def main():
        stop_evt = asyncio.Event()
        samples = []
        mon = asyncio.ensure_future(monitor_redis(cfg["redis"], stop_evt, samples, core_keys)) if monitor else None
        res = await run_sender(kind, cfg, group_names, mode, rate, count, duration, concurrency, t_go, hot=hot)
        res["_stop"] = stop_evt
        res["_samples"] = samples
        res["_mon"] = mon
        return res

    async def main_all():
        res = await main()
        results = await asyncio.get_running_loop().run_in_executor(None, collect, procs, res["sent_ok"])
        res["_stop"].set()
        if res["_mon"]:
            await res["_mon"]
        return res, results

    sres, rres = asyncio.run(main_all())
    cpu1 = redis_cpu(r)
    lg.removeHandler(cap_counter)
    # aggregate
    lat = array("d")
    recv_t = array("d")
    slow = array("b")
    for x in rres:
        a = array("d"); a.frombytes(x["lat"]); lat.extend(a)
        b = array("d"); b.frombytes(x["recv_t"]); recv_t.extend(b)
        s = array("b"); s.frombytes(x["is_slow"]); slow.extend(s)
    received = sum(x["received"] for x in rres)
    expected = sum(x["expected"] for x in rres)
    last_recv = max(recv_t) if recv_t else sres["t1"]
    span = max(last_recv, sres["t1"]) - sres["t0"]
    out = {
        "layer": kind, "scenario": name, "groups": groups, "members": members, "mode": mode,
        "target_rate_msgs_s": rate, "concurrency": concurrency if mode == "max" else 1,
        "group_sends": sres["sends"], "send_errors": sres["send_errors"],
        "send_rate_msgs_s": round(sres["sends"] / sres["send_window_s"], 1),
        "deliveries_expected": expected, "deliveries": received,
        "deliveries_per_s": round(received / span, 1) if span > 0 else None,
        "lost": sum(x["lost"] for x in rres), "extra": sum(x["extra"] for x in rres),
        "core_over_capacity_drops_logged": cap_counter.dropped if kind == "core" else None,
        "latency": lat_summary([v for v, s in zip(lat, slow) if not s]),
        "group_send_wall_us": sres["group_send_wall_us"],
        "group_send_cpu_us": sres["group_send_cpu_us"],
        "redis_cpu_ms_per_1000_deliveries": round((cpu1 - cpu0) * 1e6 / max(1, received), 2),
        "redis_cpu_s": round(cpu1 - cpu0, 3),
        "redis_used_memory_delta_end": r.info("memory")["used_memory"] - mem0,
        "receiver_errors": {k: v for x in rres for k, v in x["errors"].items()},
        "receiver_rss_mb_max": [round(max(v for t, v in x["rss"]) / 2**20, 1) for x in rres],
    }
    if fault:
        fs = sres["t0"] - (sres["t0"] - t_go) + fault["start"]  # absolute pause start
        fe = fs + fault["duration"]
        others = [(t, v) for t, v, s in zip(recv_t, lat, slow) if not s]
        out["fault"] = fault
        # receiving process 0 is the one with the slow channel / the stalled loop
        out["others_latency_before"] = lat_summary([v for t, v in others if t < fs])
        out["others_latency_during"] = lat_summary([v for t, v in others if fs <= t < fe])
        out["others_latency_after"] = lat_summary([v for t, v in others if t >= fe])
        out["proc_latency"] = []
        for i, x in enumerate(rres):
            a = array("d"); a.frombytes(x["lat"])
            b = array("d"); b.frombytes(x["recv_t"])
            s = array("b"); s.frombytes(x["is_slow"])
            out["proc_latency"].append({
                "proc": i,
                "non_slow_before": lat_summary([v for t, v, z in zip(b, a, s) if not z and t < fs]),
                "non_slow_during": lat_summary([v for t, v, z in zip(b, a, s) if not z and fs <= t < fe]),
                "non_slow_after": lat_summary([v for t, v, z in zip(b, a, s) if not z and t >= fe]),
                "lost": x["lost"], "received": x["received"], "expected": x["expected"],
                "rss_mb_max": round(max(v for t, v in x["rss"]) / 2**20, 1),
            })
        if fault["kind"] == "slow":
            out["slow_channel_received"] = rres[0]["slow_received"]
            out["slow_channel_lost"] = rres[0]["slow_lost"]
            out["slow_channel_local_queue_max"] = rres[0]["slow_local_queue_max"]
            a = array("d"); a.frombytes(rres[0]["lat"]); s = array("b"); s.frombytes(rres[0]["is_slow"])
            out["slow_channel_latency"] = lat_summary([v for v, z in zip(a, s) if z])
        rss0 = [v for t, v in rres[0]["rss"] if t < fs]
        out["proc0_rss_mb_before"] = round((rss0[-1] if rss0 else rres[0]["rss"][0][1]) / 2**20, 1)
        out["proc0_rss_mb_max"] = round(max(v for t, v in rres[0]["rss"]) / 2**20, 1)
        smp = sres["_samples"]
        if smp:
            base = [s["used_memory"] for s in smp if s["t"] < fs] or [smp[0]["used_memory"]]
            out["redis_used_memory_mb_before"] = round(base[-1] / 2**20, 2)
            out["redis_used_memory_mb_max"] = round(max(s["used_memory"] for s in smp) / 2**20, 2)
            out["redis_mem_clients_normal_mb_max"] = round(
                max((s.get("mem_clients_normal") or 0) for s in smp) / 2**20, 2)
            if kind == "core":
                out["core_proc_key_backlog_max"] = [max(s["core_proc_keys_zcard"][i] for s in smp)
                                                    for i in range(len(core_keys))]
            else:
                out["pubsub_client_omem_mb_max"] = round(max(s["pubsub_omem_max"] for s in smp) / 2**20, 2)
    for p, c in procs:
        if p.is_alive():
            p.terminate()
    r.close()
    return out


# ------------------------------------------------------------------------------------------------
# idle receive (core): redis-py 8 default socket_timeout=5 vs channels_redis brpop_timeout=5


def idle_check(cfg, seconds=6.5):
    from channels_redis.core import RedisChannelLayer

    out = {}
    for label, host in (("default_hosts", {"address": cfg["redis"]}),
                        ("socket_timeout_10", {"address": cfg["redis"], "socket_timeout": 10})):
        async def main():
            layer = RedisChannelLayer(hosts=[host])
            ch = await layer.new_channel()
            t = time.perf_counter()
            try:
                await asyncio.wait_for(layer.receive(ch), seconds)
                res = "message?"
            except asyncio.TimeoutError:
                res = f"no error within {seconds}s (still waiting, as it should)"
            except Exception as e:
                res = f"{type(e).__module__}.{type(e).__name__}: {e} after {time.perf_counter() - t:.2f}s"
            try:
                await layer.close_pools()
            except Exception:
                pass
            return res
        out[label] = asyncio.run(main())
    return out


# ------------------------------------------------------------------------------------------------
# outage


def services(action):
    t = time.time()
    p = subprocess.run([os.path.join(REPO, "scripts", "services.sh"), action, "redis"],
                       capture_output=True, text=True)
    return {"action": action, "rc": p.returncode, "took_s": round(time.time() - t, 2),
            "stderr_tail": p.stderr.strip().splitlines()[-1:] if p.stderr else []}


def outage_run(kind, cfg, down_for=4.0, before=2.0, after=8.0, period=0.05):
    r = redis_sync(cfg["redis"])
    r.flushdb()
    group = f"conversation.{uuid.uuid4().hex}"
    fault = {"kind": "outage"}
    procs, infos = start_receivers(kind, cfg, [group], 4, fault, nproc=1)
    t_go = time.time() + 0.3
    for p, c in procs:
        c.send(("go", t_go))
    marks = {}

    async def main():
        layer = make_layer(kind, cfg)
        log = []
        ok_count = [0]
        stop = asyncio.Event()

        async def sender():
            seq = 0
            while not stop.is_set():
                ev = make_event(seq, group)
                ts = time.time()
                t = time.perf_counter()
                try:
                    await asyncio.wait_for(layer.group_send(group, ev), 10)
                    res = "ok"
                    ok_count[0] += 1
                except Exception as e:
                    res = type(e).__module__ + "." + type(e).__name__
                log.append((ts, time.perf_counter() - t, res, seq))
                seq += 1
                await asyncio.sleep(period)

        task = asyncio.ensure_future(sender())
        await asyncio.sleep(before)
        loop = asyncio.get_running_loop()
        marks["stop_called"] = time.time()
        marks["stop"] = await loop.run_in_executor(None, services, "stop")
        marks["down"] = time.time()
        await asyncio.sleep(down_for)
        marks["start_called"] = time.time()
        marks["start"] = await loop.run_in_executor(None, services, "start")
        marks["up"] = time.time()
        await asyncio.sleep(after)
        stop.set()
        await task
        try:
            await asyncio.wait_for(layer.flush() if kind == "pubsub" else layer.close_pools(), 5)
        except Exception:
            pass
        return log, ok_count[0]

    log, ok = asyncio.run(main())
    rres = collect(procs, {group: ok})[0]
    for p, c in procs:
        if p.is_alive():
            p.terminate()
    up = marks["up"]
    down = marks["stop_called"]
    before_ok = [x for x in log if x[0] < down]
    during = [x for x in log if down <= x[0] < up]
    after_l = [x for x in log if x[0] >= up]
    errs = {}
    for x in log:
        if x[2] != "ok":
            errs[x[2]] = errs.get(x[2], 0) + 1
    first_ok_after = next((x for x in after_l if x[2] == "ok"), None)
    sent_after = {x[3] for x in after_l if x[2] == "ok"}
    sent_before = {x[3] for x in before_ok if x[2] == "ok"}
    per_member_after = [len(set(v) & sent_after) for v in rres["seqs"].values()]
    per_member_before = [len(set(v) & sent_before) for v in rres["seqs"].values()]
    members = 4
    per_member_after += [0] * (members - len(per_member_after))
    per_member_before += [0] * (members - len(per_member_before))
    # first delivery after restart
    return {
        "layer": kind,
        "redis_stop": marks["stop"], "redis_start": marks["start"],
        "outage_s": round(up - down, 2),
        "group_sends": len(log),
        "send_results": {"before": _tally(before_ok), "during": _tally(during), "after": _tally(after_l)},
        "send_errors": errs,
        "group_send_max_block_s_during": round(max((x[1] for x in during), default=0), 3),
        "group_send_mean_ms_during": round(statistics.fmean([x[1] for x in during]) * 1000, 2) if during else None,
        "first_ok_send_after_restart_s": round(first_ok_after[0] - up, 3) if first_ok_after else None,
        "ok_sends_after_restart": len(sent_after),
        "delivered_per_member_of_ok_sends_before": per_member_before,
        "ok_sends_before": len(sent_before),
        "delivered_per_member_of_ok_sends_after_restart": per_member_after,
        "receiver_errors": rres["errors"],
        "receiver_error_log_first": rres["error_log"][:4],
    }


def _tally(rows):
    d = {}
    for x in rows:
        d[x[2]] = d.get(x[2], 0) + 1
    return d


# ------------------------------------------------------------------------------------------------


def markdown(results):
    lines = []
    fan = [r for r in results.get("fanout", [])]
    if fan:
        lines += ["| layer | groups x members | mode | group_send/s | deliveries/s | lost | p50 ms | p95 ms | p99 ms |"
                  " group_send wall µs (p50) | sender CPU µs/call | Redis CPU ms /1000 deliveries |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in fan:
            mode = f"{r['target_rate_msgs_s']}/s target" if r["mode"] == "rate" else f"max (c={r['concurrency']})"
            lat = r["latency"]
            lines.append(f"| {r['layer']} | {r['groups']}x{r['members']} | {mode} | {r['send_rate_msgs_s']} | "
                         f"{r['deliveries_per_s']} | {r['lost']} | {lat['p50_ms']} | {lat['p95_ms']} | {lat['p99_ms']} | "
                         f"{r['group_send_wall_us']['p50']} | {r['group_send_cpu_us']} | "
                         f"{r['redis_cpu_ms_per_1000_deliveries']} |")
    sl = results.get("faults", [])
    if sl:
        lines += ["", "| layer | fault (10 s) | faulty side: received / lost | slow channel local queue max |"
                  " other channels, same process: lost, p99 ms during | other process: lost, p99 ms during |"
                  " proc0 RSS MB before -> max | Redis used_memory MB before -> max | Redis-side backlog max |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sl:
            f = r["fault"]["kind"]
            p0, p1 = r["proc_latency"][0], r["proc_latency"][1]
            if f == "slow":
                faulty = f"slow channel: {r['slow_channel_received']} / {r['slow_channel_lost']}"
                qmax = r["slow_channel_local_queue_max"]
                same = f"{p0['lost'] - r['slow_channel_lost']}, {p0['non_slow_during']['p99_ms']}"
            else:
                faulty = f"stalled process 0 (all {r['members'] // 2 * r['groups']} channels): {p0['received']} / {p0['lost']}"
                qmax = "-"
                same = "(all stalled)"
            other = f"{p1['lost']}, {p1['non_slow_during']['p99_ms']}"
            bl = (f"process-key ZCARD {r.get('core_proc_key_backlog_max')}" if r["layer"] == "core"
                  else f"pubsub client omem {r.get('pubsub_client_omem_mb_max')} MB")
            lines.append(f"| {r['layer']} | {f} | {faulty} | {qmax} | {same} | {other} | "
                         f"{r['proc0_rss_mb_before']} -> {r['proc0_rss_mb_max']} | "
                         f"{r.get('redis_used_memory_mb_before')} -> {r.get('redis_used_memory_mb_max')} | {bl} |")
    out = results.get("outage", [])
    if out:
        lines += ["", "| layer | outage s | group_send errors | max block while down s | first ok send after restart s |"
                  " delivered per member (of ok sends after restart) | receiver errors |",
                  "|---|---|---|---|---|---|---|"]
        for r in out:
            lines.append(f"| {r['layer']} | {r['outage_s']} | {r['send_errors']} | {r['group_send_max_block_s_during']} | "
                         f"{r['first_ok_send_after_restart_s']} | {r['delivered_per_member_of_ok_sends_after_restart']} of "
                         f"{r['ok_sends_after_restart']} | {r['receiver_errors']} |")
    if results.get("idle_check"):
        lines += ["", "core receive() on an idle channel: " + json.dumps(results["idle_check"])]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--layers", default="core,pubsub")
    ap.add_argument("--capacity", type=int, default=1000, help="core capacity (the service uses 1000)")
    ap.add_argument("--expiry", type=int, default=60)
    ap.add_argument("--group-expiry", type=int, default=86400)
    ap.add_argument("--socket-timeout", default="10",
                    help="redis socket_timeout for both layers ('default' = redis-py's 5 s); see idle check")
    ap.add_argument("--outage", action="store_true", help="also run the Redis outage test")
    ap.add_argument("--outage-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    if "/0" == a.redis[-2:] or a.redis.endswith("/15"):
        sys.exit("refusing to use Redis DB 0 or 15")
    cfg = {"redis": a.redis, "capacity": a.capacity, "expiry": a.expiry, "group_expiry": a.group_expiry,
           "prefix": "asgi",
           "socket_timeout": "default" if a.socket_timeout == "default" else float(a.socket_timeout)}
    layers = a.layers.split(",")
    dur = 2.5 if a.quick else 4.0
    results = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
               "config": cfg, "fanout": [], "faults": [], "outage": []}
    import channels_redis
    import redis

    results["machine"]["redis_py"] = redis.__version__
    results["machine"]["channels_redis"] = getattr(channels_redis, "__version__", "?")
    r = redis_sync(a.redis)
    results["machine"]["redis_server"] = r.info("server")["redis_version"]
    r.flushdb()
    r.close()

    def log(msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if not a.outage_only:
        plan = [
            ("50x10 target", 50, 10, "rate", 200, dur, 1),     # 200 msgs/s -> 2000 deliveries/s
            ("50x10 max", 50, 10, "max", None, dur, 16),
            ("5x100 target", 5, 100, "rate", 20, dur, 1),      # 20 msgs/s -> 2000 deliveries/s
            ("5x100 max", 5, 100, "max", None, dur, 16),
        ]
        for kind in layers:
            for name, g, m, mode, rate, d, c in plan:
                log(f"{kind} fan-out {name}")
                results["fanout"].append(run_scenario(kind, cfg, name, g, m, mode, rate=rate, duration=d,
                                                      concurrency=c))
        pause = 10.0
        for kind in layers:
            for fk in ("slow", "stalled"):
                log(f"{kind} fault {fk}")
                # 10 groups x 10 members (5 per process), 200 msgs/s total, 60% of them (120/s) to the
                # slow consumer's conversation -> 1200 events for it during the 10 s pause (above the
                # service's capacity=1000); 2000 events for the stalled process' Redis key with core.
                fault = {"kind": fk, "start": 2.0, "duration": pause}
                results["faults"].append(run_scenario(kind, cfg, f"{fk} consumer", 10, 10, "rate", rate=200,
                                                      duration=2.0 + pause + 2.0, fault=fault, monitor=True,
                                                      hot=0.6))
        if "core" in layers:
            log("core idle check")
            results["idle_check"] = idle_check(cfg)
    if a.outage or a.outage_only:
        for kind in layers:
            log(f"{kind} outage")
            results["outage"].append(outage_run(kind, cfg))
        st = services("start")  # make sure it is running at the end
        results["redis_running_at_end"] = st["rc"] == 0
    print(json.dumps(results, indent=1, default=str))
    print()
    print(markdown(results))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
