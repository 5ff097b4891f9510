"""The MQTT outbox: what keeps results through a broker outage, a crash and a full disk budget."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from appliance.reporting.outbox import Outbox


class FakeClock:
    """A settable wall clock for the age bound (a plain value, not a mock of the outbox)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def put_results(box: Outbox, n: int, start: int = 0) -> list[int]:
    return [box.put(f"t/result/{i}", f'{{"n": {i}}}', 1, "result") for i in range(start, start + n)]


def test_pending_lists_messages_oldest_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    ids = put_results(box, 5)
    assert ids == sorted(ids) and len(set(ids)) == 5
    pending = box.pending(10)
    assert [m.id for m in pending] == ids
    assert [m.payload for m in pending] == [f'{{"n": {i}}}' for i in range(5)]
    assert pending[0].topic == "t/result/0" and pending[0].qos == 1 and pending[0].kind == "result"
    assert [m.id for m in box.pending(2)] == ids[:2]
    assert box.depth() == 5


def test_ack_deletes_the_message(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    ids = put_results(box, 3)
    assert box.ack(ids[1]) is True
    assert box.ack(ids[1]) is False  # a duplicate acknowledgement is harmless
    assert [m.id for m in box.pending(10)] == [ids[0], ids[2]]
    assert box.depth() == 2


def test_in_flight_is_not_listed_again_until_released(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    ids = put_results(box, 4)
    # given the first two handed to the client
    box.mark_in_flight(ids[:2])
    assert [m.id for m in box.pending(10)] == ids[2:]
    assert [m.id for m in box.pending(1)] == [ids[2]]
    assert box.depth() == 4 and box.in_flight_count() == 2
    # when the connection drops, then they are pending again, in their original order
    assert box.release_in_flight() == 2
    assert [m.id for m in box.pending(10)] == ids


def test_restart_keeps_order_and_in_flight_returns_to_pending(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    ids = put_results(box, 6)
    box.mark_in_flight(ids[:3])
    box.ack(ids[0])
    # when the process dies without closing (the first object is simply abandoned) and a new one opens the file
    reopened = Outbox(path)
    # then every unacknowledged message is pending again, in order, and new ids continue after the old ones
    assert [m.id for m in reopened.pending(10)] == ids[1:]
    assert reopened.depth() == 5
    assert put_results(reopened, 1, start=6)[0] > ids[-1]
    box.close()
    reopened.close()


def test_ids_are_never_reused_after_the_newest_is_acked(tmp_path: Path) -> None:
    # AUTOINCREMENT: a reused id could be mistaken for an old message by the publisher's bookkeeping
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    (first,) = put_results(box, 1)
    box.ack(first)
    box.close()
    box = Outbox(path)
    assert put_results(box, 1)[0] > first
    box.close()


def test_shedding_drops_heartbeats_first_then_oldest_results(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_messages=5)
    r = put_results(box, 2)
    h1 = box.put("t/health", "{}", 0, "health")
    r += put_results(box, 1, start=2)
    h2 = box.put("t/health", "{}", 0, "health")
    assert box.take_shed_counts() == {}
    # when two more results arrive past the bound, then both heartbeats go and no result does
    r += put_results(box, 2, start=3)
    assert [m.id for m in box.pending(10)] == r
    assert h1 not in {m.id for m in box.pending(10)} and h2 not in {m.id for m in box.pending(10)}
    assert box.take_shed_counts() == {"health": 2}
    assert box.take_shed_counts() == {}  # taken means reset
    # when more arrive with no heartbeat left, then the oldest results go
    r += put_results(box, 2, start=5)
    assert [m.id for m in box.pending(10)] == r[2:]
    assert box.depth() == 5
    assert box.take_shed_counts() == {"result": 2}


def test_shed_in_flight_message_is_forgotten(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_messages=2)
    ids = put_results(box, 2)
    box.mark_in_flight([ids[0]])
    put_results(box, 1, start=2)
    assert box.in_flight_count() == 0
    assert box.ack(ids[0]) is False


def test_age_bound_drops_old_messages_of_every_kind(tmp_path: Path) -> None:
    clock = FakeClock()
    box = Outbox(tmp_path / "outbox.db", max_age_s=3600, clock=clock)
    box.put("t/health", "{}", 0, "health")
    put_results(box, 2)
    clock.now += 1800
    assert box.oldest_age_s() == pytest.approx(1800)
    kept = put_results(box, 1, start=2)
    # when the next message is put after the first ones passed the age bound
    clock.now += 1801
    kept += put_results(box, 1, start=3)
    # then they are gone and counted, and the younger ones stay
    assert [m.id for m in box.pending(10)] == kept
    assert box.take_shed_counts() == {"health": 1, "result": 2}
    assert box.oldest_age_s() == pytest.approx(1801)


def test_age_bound_applies_on_open(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    clock = FakeClock()
    put_results(Outbox(path, clock=clock), 3)
    # given a station switched off for longer than the age bound
    clock.now += 8 * 86400
    box = Outbox(path, clock=clock)
    assert box.depth() == 0 and box.oldest_age_s() is None
    assert box.take_shed_counts() == {"result": 3}


def test_invalid_qos_and_bounds_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_messages"):
        Outbox(tmp_path / "a.db", max_messages=0)
    box = Outbox(tmp_path / "b.db")
    with pytest.raises(ValueError, match="QoS"):
        box.put("t", "{}", 3, "result")
    assert box.depth() == 0


def test_concurrent_puts_from_four_threads_keep_every_message(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    ids: list[list[int]] = [[] for _ in range(4)]

    def worker(k: int) -> None:
        ids[k] = [box.put(f"t/{k}", f'{{"k": {k}, "i": {i}}}', 1, "result") for i in range(500)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for chunk in ids for i in chunk]
    assert len(every) == len(set(every)) == 2000
    assert box.depth() == 2000
    pending = box.pending(5000)
    assert [m.id for m in pending] == sorted(every)
    # each thread's messages stay in the order that thread put them
    for k in range(4):
        assert [m.payload for m in pending if m.topic == f"t/{k}"] == [f'{{"k": {k}, "i": {i}}}' for i in range(500)]


def test_ack_many_deletes_in_one_go_and_ignores_unknown_ids(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    ids = put_results(box, 1200)  # more than one 500-id chunk
    box.mark_in_flight(ids[:1100])
    assert box.ack_many([*ids[:1100], 10**9]) == 1100
    assert box.depth() == 100 and box.in_flight_count() == 0
    assert [m.id for m in box.pending(200)] == ids[1100:]
    assert box.ack_many([]) == 0


def test_counter_persists_across_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    assert [box.next_counter("bd_seq") for _ in range(3)] == [0, 1, 2]
    assert box.next_counter("other") == 0
    box.close()
    assert Outbox(tmp_path / "outbox.db").next_counter("bd_seq") == 3
