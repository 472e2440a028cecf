"""CPU of the load shedding's loop-lag probe (chat.overload.LoopLag) on an idle event loop, printed as JSON.

    .venv/bin/python bench/loop_probe.py --seconds 10 --repeat 3

An idle worker's event loop runs nothing but its timers: the probe is one of them, and each of its
ticks wakes the process up. This runs an event loop for `--seconds` with nothing on it, then with
the probe, alternately `--repeat` times, and reports the process CPU per second of each (the
median), and the difference: what the probe costs every worker all the time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def cpu_per_second(seconds: float, probe: bool) -> float:
    from chat.overload import LoopLag

    if probe:
        LoopLag().start()
    started = time.process_time()
    await asyncio.sleep(seconds)
    return (time.process_time() - started) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    import django

    django.setup()
    runs: dict[str, list[float]] = {"idle loop": [], "with the probe": []}
    for _ in range(args.repeat):
        for name, probe in (("idle loop", False), ("with the probe", True)):
            runs[name].append(asyncio.run(cpu_per_second(args.seconds, probe)))
    median = {name: statistics.median(values) for name, values in runs.items()}
    print(json.dumps({
        **{f"{name} (ms CPU per s)": round(value * 1000, 3) for name, value in median.items()},
        "the probe (ms CPU per s)": round((median["with the probe"] - median["idle loop"]) * 1000, 3),
        "runs (ms CPU per s)": {name: [round(v * 1000, 3) for v in values] for name, values in runs.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
