"""The chaos run's schedule and checker (chaos/run.py) on made-up records: each check flags what it
is there to flag, so a clean `make chaos` means something."""
from pathlib import Path

from chaos.run import (
    FAULT_KINDS,
    MembershipPeriod,
    Run,
    SendRecord,
    SocketLog,
    check_history,
    check_membership,
    check_sockets,
    check_statuses,
    fault_schedule,
)


def message(seq: int, key: str) -> dict:
    return {"seq": seq, "message_id": f"id-{key}", "content": key}


def acked(key: str, seq: int) -> SendRecord:
    return SendRecord(user=0, conversation="A", key=key, responses=[(1.0, 1.1, 201)], message=message(seq, key))


def run_with(*sends: SendRecord, windows=()) -> Run:
    run = Run(seed=1, seconds=300, directory=Path("."))
    run.sends = list(sends)
    run.windows = list(windows)
    return run


def test_the_seed_fixes_the_schedule_and_a_full_run_has_every_kind_twice():
    assert fault_schedule(7, 300) == fault_schedule(7, 300) != fault_schedule(8, 300)
    kinds = [fault.kind for fault in fault_schedule(7, 300)]
    assert all(kinds.count(kind) >= 2 for kind in FAULT_KINDS)
    moments = [fault.at for fault in fault_schedule(7, 300)]
    assert moments == sorted(moments) and all(b - a >= 15 for a, b in zip(moments, moments[1:]))


def test_a_clean_history_passes():
    run = run_with(acked("k1", 1), acked("k2", 2))
    assert check_history(run, {"A": [message(1, "k1"), message(2, "k2")]}) == []


def test_history_flags_a_hole_a_duplicate_key_and_a_lost_acknowledged_send():
    run = run_with(acked("k1", 1), acked("k2", 2), acked("k3", 3))
    violations = check_history(run, {"A": [message(1, "k1"), message(3, "k1")]})
    assert any("holes [2]" in v for v in violations)
    assert any("key k1 produced 2 messages" in v for v in violations)
    assert any("k2" in v and "not in history" in v for v in violations)
    assert any("k3" in v and "not in history" in v for v in violations)  # there as seq 3, but with k1's content


def test_sockets_flag_a_missed_a_repeated_and_a_reordered_message():
    history = {"A": [message(1, "a"), message(2, "b"), message(3, "c")]}
    run = run_with()
    run.sockets = {(0, "A"): SocketLog(seqs=[1, 2, 3]), (1, "A"): SocketLog(seqs=[1, 3]),
                   (2, "A"): SocketLog(seqs=[1, 2, 2, 3]), (3, "A"): SocketLog(seqs=[2, 1, 3])}
    violations = check_sockets(run, history)
    assert len(violations) == 3 and not any(v.startswith("user 0 ") for v in violations)


def test_statuses_accept_a_503_only_inside_a_cassandra_window_and_nothing_but_success_with_redis_down():
    inside = SendRecord(0, "A", "in", responses=[(12.0, 14.0, 503), (14.5, 14.6, 201)], message=message(1, "in"))
    outside = SendRecord(0, "A", "out", responses=[(40.0, 40.1, 503), (41.0, 41.1, 201)], message=message(2, "out"))
    redis = SendRecord(0, "A", "redis", responses=[(60.5, 60.6, 500), (61.0, 61.1, 201)], message=message(3, "redis"))
    lost = SendRecord(0, "A", "lost", responses=[(70.0, 80.0, "ServerDisconnectedError")])
    windows = [("cassandra_pause", 10.0, 20.0), ("redis_restart", 60.0, 62.0)]
    violations, counts = check_statuses(run_with(inside, outside, redis, lost, windows=windows))
    assert not any("send in " in v for v in violations)
    assert any("send out " in v for v in violations)
    assert any("send redis " in v and "Redis down" in v for v in violations)
    assert any("send lost was never acknowledged" in v for v in violations)
    assert counts[503] == 2 and counts[201] == 3


def test_membership_flags_a_slow_close_a_message_after_removal_and_a_gap():
    run = run_with(windows=[("redis_restart", 100.0, 102.0)])
    run.periods = [
        MembershipPeriod(added_at=10, removed_at=20, closed_at=20.5, ready_last_seq=4, seqs=[5, 6, 7]),  # clean
        MembershipPeriod(added_at=30, removed_at=40, closed_at=50, ready_last_seq=7, seqs=[8]),  # slow
        MembershipPeriod(added_at=90, removed_at=101, closed_at=120, ready_last_seq=9, seqs=[10]),  # Redis down: 30 s recheck
        MembershipPeriod(added_at=60, removed_at=70, closed_at=None, ready_last_seq=8, seqs=[9, 11], late=[11]),
    ]
    violations = check_membership(run)
    assert not any("period 0 " in v or "period 2 " in v for v in violations)
    assert any("period 1 " in v and "closed 10.0 s after" in v for v in violations)
    assert any("period 3 " in v and "did not close" in v for v in violations)
    assert any("period 3 " in v and "sent after the removal" in v for v in violations)
    assert any("period 3 " in v and "not one each" in v for v in violations)
