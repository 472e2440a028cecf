"""The chaos run's schedule and checker (chaos/run.py) on made-up records: each check flags what it
is there to flag, so a clean `make chaos` means something."""
import uuid
from pathlib import Path

from chaos.run import (
    FAULT_KINDS,
    ChangeRecord,
    MembershipPeriod,
    Run,
    SendRecord,
    SocketLog,
    check_change_log,
    check_deleted_content,
    check_history,
    check_membership,
    check_socket_changes,
    check_sockets,
    check_statuses,
    fault_schedule,
)


def message_id(key: str) -> str:
    """A message id, one per key, that does not spell the key (as a real one does not)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, key))


def message(seq: int, key: str, content: str | None = None) -> dict:
    return {"seq": seq, "message_id": message_id(key), "content": key if content is None else content}


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
    # Sent a moment before the pause, answered during it.
    just_before = SendRecord(0, "A", "before", responses=[(9.9, 11.0, 503), (11.5, 26.0, 201)], message=message(4, "before"))
    # Answered before the pause began.
    well_before = SendRecord(0, "A", "early", responses=[(8.0, 9.5, 503), (9.6, 9.7, 201)], message=message(5, "early"))
    outside = SendRecord(0, "A", "out", responses=[(40.0, 40.1, 503), (41.0, 41.1, 201)], message=message(2, "out"))
    redis = SendRecord(0, "A", "redis", responses=[(60.5, 60.6, 500), (61.0, 61.1, 201)], message=message(3, "redis"))
    lost = SendRecord(0, "A", "lost", responses=[(70.0, 80.0, "ServerDisconnectedError")])
    windows = [("cassandra_pause", 10.0, 20.0), ("redis_restart", 60.0, 62.0)]
    violations, counts = check_statuses(run_with(inside, just_before, well_before, outside, redis, lost, windows=windows))
    assert not any("send in " in v or "send before " in v for v in violations)
    assert any("send early at t=8.0s: HTTP 503 outside" in v for v in violations)
    assert any("send out " in v for v in violations)
    assert any("send redis " in v and "Redis down" in v for v in violations)
    assert any("send lost was never acknowledged" in v for v in violations)
    assert counts[503] == 4 and counts[201] == 5


def test_membership_flags_a_slow_close_a_message_after_removal_and_a_gap():
    run = run_with(windows=[("redis_restart", 100.0, 102.0)])
    run.periods = [
        MembershipPeriod(added_at=10, removed_at=20, removed_wall=1020, closed_at=20.5, ready_last_seq=4, ready_last_change=0, seqs=[5, 6, 7]),  # clean
        MembershipPeriod(added_at=30, removed_at=40, removed_wall=1040, closed_at=50, ready_last_seq=7, ready_last_change=0, seqs=[8]),  # slow
        # Redis down: the 30 s recheck
        MembershipPeriod(added_at=90, removed_at=101, removed_wall=1101, closed_at=120, ready_last_seq=9, ready_last_change=0, seqs=[10]),
        MembershipPeriod(added_at=60, removed_at=70, removed_wall=1070, closed_at=None, ready_last_seq=8, ready_last_change=0, seqs=[9, 11], late=[11]),
    ]
    violations = check_membership(run, {})
    assert not any("period 0 " in v or "period 2 " in v for v in violations)
    assert any("period 1 " in v and "closed 10.0 s after" in v for v in violations)
    assert any("period 3 " in v and "did not close" in v for v in violations)
    assert any("period 3 " in v and "sent after the removal" in v for v in violations)
    assert any("period 3 " in v and "not one each" in v for v in violations)


def at(seconds: float) -> str:
    """A change log's `at` for wall-clock second `seconds`."""
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def entry(change: int, kind: str, seq: int, when: float = 1000.0, **message) -> dict:
    found = {"change": change, "kind": kind, "seq": seq, "at": at(when)}
    if kind == "updated":
        found["message"] = {"seq": seq, "deleted": False, **message}
    return found


def edit(seq: int, content: str, change: int | None, acknowledged: bool = True) -> ChangeRecord:
    return ChangeRecord(0, "A", seq, "updated", content, [(1.0, 1.1, 200 if acknowledged else "ServerDisconnectedError")], change, acknowledged)


def delete(seq: int, change: int | None, acknowledged: bool = True) -> ChangeRecord:
    return ChangeRecord(0, "A", seq, "deleted", None, [(1.0, 1.1, 200 if acknowledged else "ServerDisconnectedError")], change, acknowledged)


def tombstone(seq: int, key: str) -> dict:
    return {"seq": seq, "message_id": message_id(key), "content": "", "deleted": True, "metadata": {}}


def test_a_clean_change_log_passes_with_an_unacknowledged_edit_and_a_delete_retried_after_a_lost_answer():
    run = run_with(acked("k1", 1), acked("k2", 2))
    run.changes = [edit(1, "k1~e1", None, acknowledged=False), edit(1, "k1~e2", 2), delete(2, None)]
    log = {"A": [entry(1, "updated", 1, content="k1~e2"), entry(2, "updated", 1, content="k1~e2"), entry(3, "deleted", 2)]}
    assert check_change_log(run, log) == []


def test_change_log_flags_a_lost_edit_a_wrong_number_a_hole_a_second_delete_and_an_unasked_change():
    run = run_with(acked("k1", 1), acked("k2", 2), acked("k3", 3))
    run.changes = [edit(1, "k1~e1", 1), edit(1, "k1~e2", 7), delete(2, 2), edit(3, "k3~e1", 3)]
    log = {"A": [entry(1, "updated", 1), entry(2, "deleted", 2), entry(4, "deleted", 2), entry(5, "deleted", 3)]}
    violations = check_change_log(run, log)
    assert any("not 1..4 in order" in v for v in violations)
    assert any("updated of seq 1 (change 7)" in v for v in violations)
    assert any("updated of seq 3 (change 3)" in v for v in violations)
    assert any("seq 2: deleted 2 times" in v for v in violations)
    assert any("change 5: deleted of seq 3, which nobody asked for" in v for v in violations)
    assert not any("(change 1)" in v for v in violations)


def test_history_reads_back_each_message_as_its_last_acknowledged_change_left_it():
    run = run_with(acked("k1", 1), acked("k2", 2), acked("k3", 3), acked("k4", 4))
    run.changes = [edit(1, "k1~e1", 1), delete(2, 2), edit(3, "k3~e1", 3), edit(4, "k4~e1", None, acknowledged=False)]
    clean = [message(1, "k1", "k1~e1"), tombstone(2, "k2"), message(3, "k3", "k3~e1"), message(4, "k4")]
    assert check_history(run, {"A": clean}) == []
    # The edit lost, the delete lost, the edit that was acknowledged kept, content nobody wrote.
    stale = [message(1, "k1"), message(2, "k2"), message(3, "k3", "k3~e1"), message(4, "k4", "k4~e9")]
    violations = check_history(run, {"A": stale})
    assert [v.split(":")[0] for v in violations] == ["A seq 1", "A seq 2", "A seq 4"]


def test_deleted_content_flags_a_missing_tombstone_and_content_left_in_the_history_or_the_change_log():
    run = run_with(acked("k1", 1), acked("k2", 2), acked("k3", 3))
    run.changes = [edit(1, "k1~e1", 1), delete(1, 2), delete(2, 3), delete(3, 4)]
    history = {"A": [tombstone(1, "k1"), tombstone(2, "k2"), tombstone(3, "k3")]}
    clean_log = {"A": [entry(1, "updated", 1, content="", deleted=True), entry(2, "deleted", 1), entry(3, "deleted", 2), entry(4, "deleted", 3)]}
    assert check_deleted_content(run, history, clean_log) == []
    history["A"][1] = {**tombstone(2, "k2"), "deleted": False, "content": "k2"}
    leaky_log = {"A": [entry(1, "updated", 1, content="k1~e1"), *clean_log["A"][1:]]}
    violations = check_deleted_content(run, history, leaky_log)
    assert any("seq 1: deleted, but its content k1 is still readable" in v for v in violations)  # the edit in the log
    assert any("seq 2: deleted, but history does not show a tombstone" in v for v in violations)
    assert any("seq 2: deleted, but its content k2" in v for v in violations)
    assert not any("seq 3" in v for v in violations)


def test_socket_changes_flag_a_missed_a_repeated_a_reordered_and_an_early_change():
    log = {"A": [entry(1, "updated", 1), entry(2, "deleted", 2), entry(3, "updated", 1)]}
    run = run_with()
    clean = [(1, 1, 1), (2, 2, 2), (3, 1, 2)]
    run.sockets = {
        (0, "A"): SocketLog(seqs=[1, 2], changes=clean),
        (1, "A"): SocketLog(seqs=[1, 2], changes=[(1, 1, 1), (3, 1, 2)]),  # missed 2
        (2, "A"): SocketLog(seqs=[1, 2], changes=[*clean, (3, 1, 2)]),  # 3 twice
        (3, "A"): SocketLog(seqs=[1, 2], changes=[(2, 2, 2), (1, 1, 2), (3, 1, 2)]),  # out of order
        (4, "A"): SocketLog(seqs=[1, 2], changes=[(1, 1, 0), (2, 2, 2), (3, 1, 2)]),  # change of seq 1 before seq 1
        (5, "A"): SocketLog(seqs=[1, 2], changes=[(1, 1, 1), (2, 1, 2), (3, 1, 2)]),  # change 2 for the wrong seq
    }
    violations = check_socket_changes(run, log)
    assert sorted({v.split(" in ")[0] for v in violations}) == ["user 1", "user 2", "user 3", "user 4", "user 5"]
    assert any(v.startswith("user 4 ") and "came before the message" in v for v in violations)
    assert any(v.startswith("user 5 ") and "the log has seq 2" in v for v in violations)


def test_membership_flags_a_change_after_a_ban_and_a_gap_in_the_changes():
    run = run_with()
    log = {"A": [entry(1, "updated", 1, when=1010), entry(2, "deleted", 2, when=1015), entry(3, "updated", 1, when=1030)]}
    run.periods = [
        MembershipPeriod(added_at=5, how="banned", removed_at=20, removed_wall=1020, closed_at=20.4,
                         ready_last_seq=0, ready_last_change=0, changes=[1, 2]),  # clean
        MembershipPeriod(added_at=5, how="banned", removed_at=20, removed_wall=1020, closed_at=20.4,
                         ready_last_seq=0, ready_last_change=0, changes=[1, 2, 3]),  # 3 came after the ban
        MembershipPeriod(added_at=5, how="removed", removed_at=20, removed_wall=1020, closed_at=20.4,
                         ready_last_seq=0, ready_last_change=0, changes=[2]),  # missed 1
    ]
    violations = check_membership(run, log)
    assert not any("period 0 " in v for v in violations)
    assert any("period 1 " in v and "banned t=20.0s" in v and "changes [3] made after the removal" in v for v in violations)
    assert any("period 2 " in v and "not one each of those after 0" in v for v in violations)


def test_statuses_hold_edits_and_deletes_to_the_same_rules_as_sends():
    inside = ChangeRecord(0, "A", 1, "updated", "k1~e1", [(12.0, 14.0, 503), (14.5, 14.6, 200)], 1, True)
    outside = ChangeRecord(0, "A", 2, "deleted", None, [(40.0, 40.1, 503), (41.0, 41.1, 200)], 2, True)
    refused = ChangeRecord(0, "A", 3, "updated", "k3~e1", [(50.0, 50.1, 400)])
    lost = ChangeRecord(0, "A", 4, "deleted", None, [(70.0, 80.0, "ServerDisconnectedError")])
    run = run_with(windows=[("cassandra_pause", 10.0, 20.0)])
    run.changes = [inside, outside, refused, lost]
    violations, counts = check_statuses(run)
    assert not any("updated of A seq 1 " in v for v in violations)
    assert any("deleted of A seq 2 at t=40.0s: HTTP 503 outside" in v for v in violations)
    assert any("updated of A seq 3 at t=50.0s: HTTP 400" in v for v in violations)
    assert any("deleted of A seq 4 was never acknowledged" in v for v in violations)
    assert counts[200] == 2
