"""The switch-over planner, tested directly: no bus, no threads, a simulated clock.

Most tests drive :class:`PreCopyPlan` with :class:`FakeBackend`, a model of a
back-end in pre-copy: a state of ``size`` bytes that changes at
``dirty_rate`` (distinct bytes per second, at most the whole state), sent
through its own channel of ``bandwidth`` stream bytes per second, compressed
to ``ratio`` stream bytes per state byte.  It writes its initial data, then
round after round of what changed meanwhile, and on StopCopy what is left.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from dbus_vmstate2.errors import MigrationAborted
from dbus_vmstate2.vmm.precopy import (
    AwaitStopCopy,
    Backlog,
    Continue,
    Counters,
    Finished,
    GiveUp,
    GiveUpReason,
    Observation,
    PendingReply,
    Phase,
    PreCopyConfig,
    PreCopyPlan,
    SwitchOver,
    SwitchReason,
)

MiB = 1 << 20
TICK = 0.1


@dataclass
class FakeBackend:
    name: str
    size: int
    dirty_rate: float
    bandwidth: float
    ratio: float = 1.0
    round_gap: float = 0.01
    """Idle time between two rounds (a real back-end's per-round cost)."""

    def __post_init__(self) -> None:
        self.initial_left = float(self.size)
        self.round_left = 0.0
        self.dirty = 0.0
        self.gap_left = 0.0
        self.rounds = 0
        self.raw_written = 0.0
        self.stream_written = 0.0
        self.initial_sent = False
        self.quiesced = False
        self.finished_at: float | None = None
        self.clock = 0.0
        self.stuck = False
        """The channel stopped moving (a stall)."""

    def stop_copy(self) -> None:
        self.quiesced = True
        self.round_left += self.dirty
        self.dirty = 0.0

    def time_to_finish(self) -> float:
        if not self.quiesced or self.finished_at is not None or self.stuck:
            return math.inf
        return (self.initial_left + self.round_left) * self.ratio / self.bandwidth

    def advance(self, dt: float) -> None:
        end = self.clock + dt
        while self.clock < end - 1e-12 and self.finished_at is None:
            left = end - self.clock
            if self.stuck:
                self._changes(left)
                self.clock = end
                continue
            if self.initial_left > 0:
                budget = self.initial_left
            elif self.round_left > 0:
                budget = self.round_left
            elif self.quiesced:
                self.finished_at = self.clock
                break
            elif self.gap_left > 0:
                t = min(left, self.gap_left)
                self.gap_left -= t
                self._changes(t)
                self.clock += t
                continue
            elif self.dirty > 0:
                self.round_left, self.dirty = self.dirty, 0.0
                continue
            else:
                t = left if self.dirty_rate == 0 else min(left, 1e-3)
                self._changes(t)
                self.clock += t
                continue
            raw_rate = self.bandwidth / self.ratio
            t = min(left, budget / raw_rate)
            sent = budget if t == budget / raw_rate else raw_rate * t
            if self.initial_left > 0:
                self.initial_left -= sent
                if self.initial_left <= 1e-6:
                    self.initial_left = 0.0
                    self.initial_sent = True
            else:
                self.round_left -= sent
                if self.round_left <= 1e-6:
                    self.round_left = 0.0
                    if not self.quiesced:
                        self.rounds += 1
                        self.gap_left = self.round_gap
            self.raw_written += sent
            self.stream_written += sent * self.ratio
            self._changes(t)
            self.clock += t

    def _changes(self, t: float) -> None:
        if not self.quiesced:
            self.dirty = min(float(self.size), self.dirty + self.dirty_rate * t)

    def observe(self, counters: bool = True) -> Observation:
        dirty = math.ceil(self.dirty + self.round_left)
        initial = math.ceil(self.initial_left)
        return Observation(
            self.name,
            received=int(self.stream_written),
            pending=PendingReply(initial, dirty, initial + dirty, self.rounds),
            initial_data_sent=self.initial_sent,
            written=Counters(int(self.raw_written), int(self.stream_written)) if counters else None,
        )


@dataclass
class Run:
    plan: PreCopyPlan
    decisions: list[tuple[float, object]]
    switch: SwitchOver | None
    final: object
    switched_initial: dict[str, bool] | None = None


def simulate(
    fakes: list[FakeBackend], config: PreCopyConfig, *, until: float = 120.0, tell_at: float | None = None,
) -> Run:
    """Drive ``fakes`` and a plan on one simulated clock; the adapter's part, done by hand."""
    plan = PreCopyPlan([f.name for f in fakes], 0.0, config)
    decisions: list[tuple[float, object]] = []
    switch = None
    switched_initial = None
    now = 0.0
    k = 0
    while now < until:
        next_tick = (k + 1) * TICK
        # a stop-copy ending before the next tick is reported at its own time
        ends = sorted((now + f.time_to_finish(), f.name) for f in fakes)
        if switch is not None and ends and ends[0][0] < next_tick:
            at, name = ends[0]
            for f in fakes:
                f.advance(at - now)
            now = at
            f = next(f for f in fakes if f.name == name)
            f.finished_at = at
            d = plan.stop_copy_finished(name, at, received=int(f.stream_written), counters=f.observe().written)
            decisions.append((now, d))
            if isinstance(d, (Finished, GiveUp)):
                return Run(plan, decisions, switch, d, switched_initial)
            continue
        for f in fakes:
            f.advance(next_tick - now)
        k += 1
        now = next_tick
        if tell_at is not None and switch is None and now >= tell_at:
            d = plan.switch_over_now(now)
        else:
            d = plan.tick(now, [f.observe() for f in fakes])
        decisions.append((now, d))
        if isinstance(d, SwitchOver):
            switch = d
            switched_initial = {f.name: f.initial_sent for f in fakes}
            for f in fakes:
                f.stop_copy()
        if isinstance(d, (Finished, GiveUp)):
            return Run(plan, decisions, switch, d, switched_initial)
    raise AssertionError(f"no outcome by {until} s: {decisions[-3:]}")


# -- simulations --------------------------------------------------------------


def test_a_converging_backend_switches_over_within_the_limit():
    fake = FakeBackend("fs0", 64 * MiB, dirty_rate=8 * MiB, bandwidth=128 * MiB)
    run = simulate([fake], PreCopyConfig())
    assert run.switch is not None and run.switch.reason is SwitchReason.CONVERGED
    assert run.switch.at >= 1.0  # not before the rate window is full
    assert run.switch.expected_downtime <= 0.3
    assert isinstance(run.final, Finished)
    summary = run.final.summary
    assert summary.phase is Phase.DONE and summary.switch_reason is SwitchReason.CONVERGED
    assert 0 < summary.downtime <= 0.3
    assert summary.stream_bytes == int(fake.stream_written) >= 64 * MiB
    assert summary.rounds == fake.rounds > 0
    assert all(isinstance(d, Continue) for _, d in run.decisions[: run.decisions.index((run.switch.at, run.switch))])


def test_a_non_converging_backend_gives_up_after_max_rounds_with_the_figures():
    fake = FakeBackend("fs0", 32 * MiB, dirty_rate=256 * MiB, bandwidth=64 * MiB, round_gap=0)
    run = simulate([fake], PreCopyConfig())
    assert run.switch is None
    give_up = run.final
    assert isinstance(give_up, GiveUp) and give_up.reason is GiveUpReason.NOT_CONVERGING
    assert give_up.backends == ("fs0",)
    assert fake.rounds == 30
    message = give_up.message
    assert "faster than it can be sent" in message
    assert "64.0 MiB/s gets through" in message  # the measured bandwidth
    assert re.search(r"changes at [\d.]+ MiB/s at least", message)  # the dirty rate
    assert give_up.expected_downtime == pytest.approx(0.5)  # 32 MiB of state at 64 MiB/s
    assert "after 30 rounds, 32.0 MiB is still pending ('fs0' 32.0 MiB)" in message
    assert "stop-copy would take about 500 ms" in message
    assert "over the 300 ms downtime limit" in message
    assert "force" in message
    assert isinstance(give_up.error(), MigrationAborted) and str(give_up.error()) == message
    # sticky
    assert run.plan.tick(give_up.at + 1, [fake.observe()]) is give_up
    assert run.plan.switch_over_now(give_up.at + 1) is give_up
    assert run.plan.next_deadline() is None
    assert run.plan.summary().give_up_reason is GiveUpReason.NOT_CONVERGING


def test_force_switches_over_at_max_rounds_and_accepts_the_downtime():
    fake = FakeBackend("fs0", 32 * MiB, dirty_rate=256 * MiB, bandwidth=64 * MiB, round_gap=0)
    run = simulate([fake], PreCopyConfig(force=True, max_rounds=5))
    assert run.switch.reason is SwitchReason.FORCED
    assert run.switch.expected_downtime > 0.3
    summary = run.final.summary
    assert summary.switch_reason is SwitchReason.FORCED
    assert summary.downtime > 0.3
    # the expectation was right to within a tick's worth of change
    assert summary.downtime == pytest.approx(run.switch.expected_downtime, rel=0.25)


def test_several_backends_wait_for_the_slow_one_and_all_fit_the_limit():
    fast = FakeBackend("fast", 64 * MiB, dirty_rate=4 * MiB, bandwidth=256 * MiB)
    slow = FakeBackend("slow", 16 * MiB, dirty_rate=MiB // 2, bandwidth=4 * MiB)
    run = simulate([fast, slow], PreCopyConfig())
    assert run.switch.reason is SwitchReason.CONVERGED
    assert run.switched_initial == {"fast": True, "slow": True}
    assert run.switch.at >= 4.0  # the slow one's initial data takes 4 s
    summary = run.final.summary
    assert summary.downtime <= 0.3
    by_name = {b.backend: b for b in summary.backends}
    assert by_name["slow"].stop_copy_time == pytest.approx(summary.downtime)
    assert by_name["fast"].stop_copy_time < by_name["slow"].stop_copy_time
    assert summary.stream_bytes == by_name["fast"].stream_bytes + by_name["slow"].stream_bytes
    assert summary.raw_bytes == by_name["fast"].raw_bytes + by_name["slow"].raw_bytes


def test_compression_lets_a_state_converge_that_would_not_raw():
    # 40 MiB of state over 128 MiB/s: 312 ms raw, 78 ms compressed 4:1.
    config = PreCopyConfig(max_rounds=10)
    raw = simulate([FakeBackend("fs0", 40 * MiB, dirty_rate=512 * MiB, bandwidth=128 * MiB, round_gap=0)], config)
    assert isinstance(raw.final, GiveUp)
    packed = simulate(
        [FakeBackend("fs0", 40 * MiB, dirty_rate=512 * MiB, bandwidth=128 * MiB, ratio=0.25, round_gap=0)], config,
    )
    assert packed.switch.reason is SwitchReason.CONVERGED
    assert packed.final.summary.downtime <= 0.3


def test_told_to_switch_over_before_anything_is_measured():
    fake = FakeBackend("fs0", 64 * MiB, dirty_rate=8 * MiB, bandwidth=128 * MiB)
    run = simulate([fake], PreCopyConfig(), tell_at=0.3)
    assert run.switch.reason is SwitchReason.REQUESTED
    assert run.switch.at == pytest.approx(0.3)
    assert run.switch.expected_downtime is None  # no rate yet: the user's call
    assert run.switched_initial == {"fs0": False}
    summary = run.final.summary
    assert summary.switch_reason is SwitchReason.REQUESTED
    assert summary.precopy_time == pytest.approx(0.3)
    assert summary.downtime == pytest.approx(summary.total_time - 0.3)


# -- the rules, one at a time ---------------------------------------------------


def obs(name: str, received: int, initial: int = 0, dirty: int = 0, rounds: int = 0, *, sent: bool | None = None,
        stop_copy: int = 0, written: Counters | None = None) -> Observation:
    return Observation(
        name, received, PendingReply(initial, dirty, stop_copy, rounds),
        initial_data_sent=(initial == 0) if sent is None else sent, written=written,
    )


def steady(plan: PreCopyPlan, until: float, rates: dict[str, int], origin: float = 0.0, **pending) -> object:
    """Tick every 100 ms until ``until``, each back-end receiving at its rate since ``origin``."""
    d = None
    t = plan.now
    while t < until - 1e-9:
        t = round(t + TICK, 6)
        d = plan.tick(t, [obs(n, int(r * (t - origin)), **pending.get(n, {})) for n, r in rates.items()])
        if not isinstance(d, Continue):
            return d
    return d


def test_the_rate_is_unknown_until_the_window_is_full_then_follows_it():
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(rate_window=1.0))
    for i in range(1, 10):
        plan.tick(i * TICK, [obs("a", i * 100, dirty=50)])
        assert plan.status(i * TICK).rate is None
    plan.tick(1.0, [obs("a", 1000, dirty=50)])
    assert plan.status(1.0).rate == pytest.approx(1000)
    # a burst, then nothing: the back-end's rate shows the burst for one window only
    plan.tick(1.1, [obs("a", 11000, dirty=50)])
    assert plan.status(1.1).backends[0].rate == pytest.approx((11000 - 100) / 1.0)
    assert plan.status(1.1).rate == pytest.approx((11000 - 100) / 1.0)  # nothing queued: the window's
    for i in range(12, 22):
        plan.tick(i * TICK, [obs("a", 11000)])
    assert plan.status(2.1).backends[0].rate == pytest.approx(0)


def test_the_channel_rate_is_the_lowest_of_the_last_windows_it_was_the_limit():
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(timeout=None))
    received, queued = 0, 1

    def run(until: float, rate: int) -> None:
        nonlocal received
        t = plan.now
        while t < until - 1e-9:
            t = round(t + TICK, 6)
            received += int(rate * TICK)
            plan.tick(t, [obs("a", received, dirty=MiB)], Backlog(queued if until <= 3.0 else 0))

    run(2.0, 10 * MiB)
    assert plan.status(2.0).rate == pytest.approx(10 * MiB)
    run(3.0, 5 * MiB)  # the channel slows for a second, then recovers:
    run(4.0, 10 * MiB)  # that second counts for RATE_HISTORY windows
    assert plan.status(4.0).backends[0].rate == pytest.approx(10 * MiB)
    assert plan.status(4.0).rate == pytest.approx(5 * MiB)
    assert plan.status(4.0).expected_downtime == pytest.approx(0.2)
    run(7.1, 10 * MiB)  # every window of the last three seconds is past the slow one
    assert plan.status(7.1).rate == pytest.approx(10 * MiB)


def test_frequent_ticks_keep_the_window_small():
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(rate_window=1.0, timeout=None))
    for i in range(1, 20001):
        plan.tick(i * 1e-4, [obs("a", i * 10, dirty=10**9)])
    assert len(plan._samples) <= 40
    assert plan.status(2.0).rate == pytest.approx(100_000, rel=0.05)


def test_no_switch_over_before_the_rate_is_known_even_with_nothing_pending():
    plan = PreCopyPlan(["a"], 0.0)
    for i in range(1, 10):
        assert isinstance(plan.tick(i * TICK, [obs("a", 100)]), Continue)
    assert plan.tick(1.0, [obs("a", 100)]).reason is SwitchReason.CONVERGED


def test_expected_downtime_is_the_worse_of_the_total_and_the_slowest_backend():
    # fast: 100 MiB/s, nothing pending; slow: 1 MiB/s with 0.5 MiB pending.
    plan = PreCopyPlan(["fast", "slow"], 0.0)
    d = steady(plan, 1.0, {"fast": 100 * MiB, "slow": MiB}, slow={"dirty": MiB // 2})
    status = plan.status(1.0)
    assert status.rate == pytest.approx(101 * MiB)
    # the total alone would say 5 ms; the slow back-end needs 500 ms
    assert status.expected_downtime == pytest.approx(0.5)
    assert isinstance(d, Continue)


def test_stop_copy_bytes_counts_when_larger_than_what_is_dirty():
    plan = PreCopyPlan(["a"], 0.0)
    steady(plan, 1.0, {"a": 10 * MiB}, a={"dirty": MiB, "stop_copy": 5 * MiB})
    assert plan.status(1.0).pending_bytes == 5 * MiB
    assert plan.status(1.0).expected_downtime == pytest.approx(0.5)


def test_compression_ratio_and_bytes_in_flight_adjust_the_pending_bytes():
    def expected(written: Counters | None) -> float:
        plan = PreCopyPlan(["a"], 0.0)
        for i in range(1, 11):
            plan.tick(i * TICK, [obs("a", i * MiB, dirty=8 * MiB, written=written)])
        return plan.status(1.0).expected_downtime

    assert expected(None) == pytest.approx(8 * MiB / (10 * MiB))  # ratio unknown: 1.0
    # compressed 4:1, everything written received: a quarter of the bytes
    assert expected(Counters(40 * MiB, 10 * MiB)) == pytest.approx(2 * MiB / (10 * MiB))
    # 1 MiB more written than received: in flight, still to drain
    assert expected(Counters(44 * MiB, 11 * MiB)) == pytest.approx((8 * MiB * 0.25 + MiB) / (10 * MiB))


def test_the_destinations_backlog_goes_before_stop_copy_and_its_handover_after():
    def expected(backlog: Backlog | None, rates: dict[str, int], **pending) -> float:
        plan = PreCopyPlan(list(rates), 0.0)
        for i in range(1, 11):
            plan.tick(i * TICK, [obs(n, int(r * i * TICK), **pending.get(n, {})) for n, r in rates.items()], backlog)
        return plan.status(1.0).expected_downtime

    one = {"a": 10 * MiB}
    assert expected(None, one, a={"dirty": MiB}) == pytest.approx(0.1)
    # 2 MiB queued on the link drain first, through the same channel; then 50 ms of handover
    assert expected(Backlog(2 * MiB, 0.05), one, a={"dirty": MiB}) == pytest.approx(0.35)
    # nothing pending: what is queued and the handover remain
    assert expected(Backlog(MiB, 0.02), one) == pytest.approx(0.12)
    # the queue shares the total's channel, not a slow back-end's own
    two = {"fast": 100 * MiB, "slow": MiB}
    assert expected(Backlog(10 * MiB, 0.0), two, slow={"dirty": MiB // 2}) == pytest.approx(0.5)
    assert expected(Backlog(101 * MiB, 0.0), two, slow={"dirty": MiB // 2}) == pytest.approx(1.0 + 0.5 / 101)


def test_a_backlog_holds_the_switch_over_until_it_drains_and_is_kept_between_ticks():
    plan = PreCopyPlan(["a"], 0.0)  # 300 ms limit
    for i in range(1, 11):
        d = plan.tick(i * TICK, [obs("a", i * MiB, dirty=MiB // 2)], Backlog(3 * MiB, 0.04) if i == 1 else None)
    assert isinstance(d, Continue)  # 0.5 + 3 MiB at 10 MiB/s, plus 40 ms: 390 ms
    assert plan.status(1.0).expected_downtime == pytest.approx(0.39)
    d = plan.tick(1.1, [obs("a", 11 * MiB, dirty=MiB // 2)], Backlog(MiB, 0.04))
    assert isinstance(d, SwitchOver) and d.expected_downtime == pytest.approx(0.19)
    with pytest.raises(ValueError):
        Backlog(-1)
    with pytest.raises(ValueError):
        Backlog(0, math.nan)


def test_a_plan_that_gives_up_names_the_backlog_in_its_figures():
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(max_rounds=2))
    d = steady(plan, 2.0, {"a": 10 * MiB}, a={"dirty": 4 * MiB, "rounds": 2})
    assert isinstance(d, GiveUp) and "queued" not in d.message
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(max_rounds=2))
    plan.tick(TICK, [obs("a", MiB, dirty=4 * MiB, rounds=2)], Backlog(2 * MiB, 0.03))
    d = steady(plan, 2.0, {"a": 10 * MiB}, a={"dirty": 4 * MiB, "rounds": 2})
    assert isinstance(d, GiveUp)
    assert "with 2.0 MiB queued on the link and a handover of 30 ms" in d.message, d.message
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(max_rounds=2))
    plan.tick(TICK, [obs("a", MiB, rounds=2)], Backlog(0, 0.4))
    d = steady(plan, 2.0, {"a": 10 * MiB}, a={"rounds": 2})
    assert isinstance(d, GiveUp) and d.message.startswith("the handover alone ("), d.message
    assert "take 400 ms, over the 300 ms downtime limit" in d.message


def test_initial_data_blocks_the_switch_over_until_sent_or_zero():
    plan = PreCopyPlan(["a"], 0.0)
    for i in range(1, 21):
        d = plan.tick(i * TICK, [obs("a", i * MiB, initial=MiB, sent=False)])
        assert isinstance(d, Continue)
    assert plan.status(2.0).sending_initial == ("a",)
    # the signal counts before the Pending reply catches up
    d = plan.tick(2.1, [obs("a", 21 * MiB, initial=MiB, sent=True)])
    assert isinstance(d, SwitchOver) and d.reason is SwitchReason.CONVERGED


def test_rounds_count_only_the_backends_that_hold_up_the_switch_over():
    config = PreCopyConfig(max_rounds=3, downtime_limit=0.1)
    plan = PreCopyPlan(["busy", "idle"], 0.0, config)
    # idle has nothing pending and does no rounds; busy has 1 s of data pending
    d = steady(plan, 1.0, {"busy": MiB, "idle": 0}, busy={"dirty": MiB, "rounds": 2})
    assert isinstance(d, Continue) and plan.status(1.0).rounds == 2
    d = plan.tick(1.1, [obs("busy", int(1.1 * MiB), dirty=MiB, rounds=3), obs("idle", 0)])
    assert isinstance(d, GiveUp) and d.reason is GiveUpReason.NOT_CONVERGING
    assert d.backends == ("busy",)


def test_max_rounds_waits_for_the_rate():
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(max_rounds=1))
    assert isinstance(plan.tick(0.5, [obs("a", MiB, dirty=10 * MiB, rounds=5)]), Continue)
    assert isinstance(plan.tick(1.0, [obs("a", 2 * MiB, dirty=10 * MiB, rounds=9)]), GiveUp)


def test_a_stalled_backend_is_named_after_stall_timeout():
    config = PreCopyConfig(stall_timeout=2.0)
    plan = PreCopyPlan(["ok", "stuck"], 0.0, config)
    d = plan.tick(0.5, [obs("ok", MiB), obs("stuck", 4096, initial=MiB, sent=False)])
    assert isinstance(d, Continue) and plan.next_deadline() == pytest.approx(2.5)
    t = 0.5
    while isinstance(d, Continue):
        t = round(t + TICK, 6)
        d = plan.tick(t, [obs("ok", MiB + int(t * 100)), obs("stuck", 4096, initial=MiB, sent=False)])
        if isinstance(d, Continue):
            assert plan.next_deadline() == pytest.approx(2.5)  # stuck: silent since 0.5
    assert t == pytest.approx(2.5)
    assert d.reason is GiveUpReason.STALLED and d.backends == ("stuck",)
    assert "back-end 'stuck' sent no data for 2 s while it has 1.0 MiB left to send" in d.message


def test_a_backend_held_up_by_the_adapter_is_not_stalled():
    """Its pump waits for the sink (a stuck link): the link's timeout is the
    one to fire; once the hold ends, the stall clock starts again."""
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(stall_timeout=1.0))
    held = Observation("a", MiB, PendingReply(MiB, 0, 0, 0), held=True)
    for i in range(1, 50):
        assert isinstance(plan.tick(round(i * TICK, 6), [held]), Continue)
    assert plan.next_deadline() == pytest.approx(5.9)
    d = plan.tick(5.9, [replace(held, held=False)])
    assert d.reason is GiveUpReason.STALLED and d.backends == ("a",)


def test_a_backend_silent_with_nothing_pending_is_not_stalled():
    # "busy" keeps the plan in pre-copy (initial data) while "idle" sends nothing for 5 s
    plan = PreCopyPlan(["busy", "idle"], 0.0, PreCopyConfig(stall_timeout=1.0))
    for i in range(1, 50):
        d = plan.tick(i * TICK, [obs("busy", i * MiB, initial=MiB, sent=False), obs("idle", 100)])
        assert isinstance(d, Continue)
    # then "idle" gets changed data: its stall clock starts at the last tick it was fine
    d = plan.tick(5.0, [obs("busy", 50 * MiB, initial=MiB, sent=False), obs("idle", 100, dirty=10)])
    assert isinstance(d, Continue)
    assert plan.next_deadline() == pytest.approx(5.9)
    d = plan.tick(5.9, [obs("busy", 59 * MiB, initial=MiB, sent=False), obs("idle", 100, dirty=10)])
    assert d.reason is GiveUpReason.STALLED and d.backends == ("idle",)
    assert "10 B left to send" in d.message


def test_a_backend_that_never_answers_stalls_from_the_start():
    plan = PreCopyPlan(["a"], 10.0, PreCopyConfig(stall_timeout=3.0))
    assert plan.next_deadline() == pytest.approx(13.0)
    assert isinstance(plan.tick(12.9, [Observation("a", 0)]), Continue)
    d = plan.tick(13.0, [Observation("a", 0)])
    assert d.reason is GiveUpReason.STALLED and "an unknown amount" in d.message


def test_a_timeout_before_any_pending_reply_says_the_amount_is_unknown():
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(timeout=1.0))
    d = plan.tick(1.0, [Observation("a", 10)])
    assert d.reason is GiveUpReason.TIMEOUT
    assert "back-end 'a' still sending initial data (an unknown amount left)" in d.message


def test_the_overall_timeout_gives_up_naming_what_is_not_done():
    plan = PreCopyPlan(["big"], 0.0, PreCopyConfig(timeout=5.0))
    assert plan.next_deadline() == pytest.approx(5.0)
    d = steady(plan, 6.0, {"big": MiB}, big={"initial": 100 * MiB, "sent": False})
    assert d.reason is GiveUpReason.TIMEOUT and d.at == pytest.approx(5.0)
    assert d.backends == ("big",)
    assert "within the 5 s timeout" in d.message and "'big' still sending initial data (100.0 MiB left)" in d.message


def test_the_timeout_when_not_converging_gives_the_figures():
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(timeout=3.0))
    d = steady(plan, 4.0, {"a": 10 * MiB}, a={"dirty": 10 * MiB, "rounds": 2})
    assert d.reason is GiveUpReason.TIMEOUT
    assert "stop-copy would take about 1 s (10.0 MiB pending at 10.0 MiB/s)" in d.message
    assert "after 2 of 30 rounds" in d.message


def test_no_timeout_means_no_deadline_of_its_own():
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(timeout=None))
    plan.tick(0.1, [obs("a", 1)])
    assert plan.next_deadline() == pytest.approx(10.1)  # only the stall rule's


# -- after the switch-over -------------------------------------------------------


def test_the_summary_measures_the_downtime_from_the_switch_over_to_the_last_end():
    plan = PreCopyPlan(["a", "b"], 100.0, PreCopyConfig(downtime_limit=0.0))
    steady(plan, 101.0, {"a": MiB, "b": 2 * MiB}, 100.0, a={"dirty": 1000}, b={"dirty": 1000})
    d = plan.switch_over_now(101.0)
    assert isinstance(d, SwitchOver) and d.reason is SwitchReason.REQUESTED
    assert d.expected_downtime == pytest.approx(1000 / MiB, rel=0.01)  # a: 1000 B at 1 MiB/s
    assert plan.switch_over_now(101.0) == AwaitStopCopy(("a", "b"), 111.0)  # once only
    d = plan.tick(101.05, [obs("a", MiB + 500), obs("b", 2 * MiB)])
    assert d == AwaitStopCopy(("a", "b"), 111.0)  # b has not moved since the switch
    d = plan.stop_copy_finished("a", 101.08, received=MiB + 1000, counters=Counters(5 * MiB, MiB + 1000))
    assert d.waiting == ("b",)
    assert plan.stop_copy_finished("a", 101.1) == AwaitStopCopy(("b",), 111.0)  # repeated: the first end is kept
    d = plan.stop_copy_finished("b", 101.2, received=2 * MiB + 1000, counters=Counters(7 * MiB, 2 * MiB + 1000))
    assert isinstance(d, Finished)
    s = d.summary
    assert s.downtime == pytest.approx(0.2)
    assert s.precopy_time == pytest.approx(1.0)
    assert s.total_time == pytest.approx(1.2)
    assert [b.stop_copy_time for b in s.backends] == [pytest.approx(0.08), pytest.approx(0.2)]
    assert s.stream_bytes == 3 * MiB + 2000
    assert s.raw_bytes == 12 * MiB
    assert s.expected_downtime == pytest.approx(1000 / MiB, rel=0.01)  # a: 1000 B at 1 MiB/s
    encoded = json.loads(json.dumps(s.as_dict()))
    assert encoded["switch_reason"] == "requested" and encoded["phase"] == "done"
    assert encoded["backends"][1]["raw_bytes"] == 7 * MiB
    assert plan.tick(102.0, []) is d and plan.failed("a", 102.0, "late") is d


def test_the_summary_keeps_the_rounds_a_backend_reported_before_its_stop_copy_ended():
    # A back-end out of pre-copy and stop-copy reports 0 rounds (Pending):
    # a last look after its stop-copy ended must not wipe the count.
    plan = PreCopyPlan(["a"], 100.0, PreCopyConfig(downtime_limit=0.0))
    steady(plan, 101.0, {"a": MiB}, 100.0, a={"dirty": 1000, "rounds": 4})
    plan.switch_over_now(101.0)
    plan.tick(101.05, [obs("a", MiB + 500, rounds=0)])
    d = plan.stop_copy_finished("a", 101.1, received=MiB + 1000, counters=Counters(2 * MiB, MiB + 1000))
    assert isinstance(d, Finished) and d.summary.rounds == 4


def test_an_infinite_expectation_is_null_in_json():
    plan = PreCopyPlan(["a"], 0.0)
    steady(plan, 1.0, {"a": 0}, a={"dirty": 10})
    d = plan.switch_over_now(1.0)
    assert d.expected_downtime == math.inf
    assert plan.summary().as_dict()["expected_downtime"] is None


def test_a_stop_copy_that_goes_silent_gives_up():
    plan = PreCopyPlan(["a", "b"], 0.0, PreCopyConfig(stall_timeout=1.0))
    plan.switch_over_now(0.5)
    plan.stop_copy_finished("a", 0.6)
    assert plan.next_deadline() == pytest.approx(1.5)
    assert isinstance(plan.tick(1.4, [obs("a", 0), obs("b", 0)]), AwaitStopCopy)
    d = plan.tick(1.5, [obs("a", 0), obs("b", 0)])
    assert d.reason is GiveUpReason.STALLED and d.backends == ("b",) and "during stop-copy" in d.message
    s = plan.summary()
    assert s.phase is Phase.GAVE_UP and s.downtime is None and s.switch_reason is SwitchReason.REQUESTED


def test_the_stop_copy_timeout():
    plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(stop_copy_timeout=2.0, stall_timeout=10.0))
    plan.switch_over_now(1.0)
    assert plan.next_deadline() == pytest.approx(3.0)
    t = 1.0
    d = None
    while not isinstance(d, GiveUp):
        t = round(t + TICK, 6)
        d = plan.tick(t, [obs("a", int(t * 1000))])
    assert t == pytest.approx(3.0) and d.reason is GiveUpReason.STOP_COPY_TIMEOUT


def test_a_backend_failure_gives_up_at_once():
    plan = PreCopyPlan(["a", "b"], 0.0)
    d = plan.failed("b", 0.3, "org.qemu.VMState2.Error.Failed: its save raised")
    assert d.reason is GiveUpReason.BACKEND_FAILED and d.backends == ("b",)
    assert d.message == "back-end 'b' failed during pre-copy: org.qemu.VMState2.Error.Failed: its save raised"


def test_the_plan_imports_no_bus_code():
    # logging pulls in threading; the plan itself starts no thread and needs no bus
    code = (
        "import sys, dbus_vmstate2.vmm.precopy;"
        "bad = [m for m in sys.modules if m.startswith(('dbus_fast', 'asyncio', 'dbus_vmstate2.backend',"
        " 'dbus_vmstate2.vmm.discovery', 'dbus_vmstate2.vmm.transfers'))];"
        "print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- misuse ------------------------------------------------------------------------


def test_misuse_raises_and_changes_nothing():
    plan = PreCopyPlan(["a", "b"], 1.0)
    assert isinstance(plan.tick(2.0, [obs("a", 10, dirty=MiB), obs("b", 10, dirty=MiB)]), Continue)
    with pytest.raises(ValueError, match="missing"):
        plan.tick(2.1, [obs("a", 10)])
    with pytest.raises(ValueError, match="unknown back-end 'c'"):
        plan.tick(2.1, [obs("a", 10), obs("c", 10)])
    with pytest.raises(ValueError, match="missing"):
        plan.tick(2.1, [obs("a", 10), obs("a", 10)])
    with pytest.raises(ValueError, match="went back"):
        plan.tick(2.1, [obs("a", 9), obs("b", 10)])
    with pytest.raises(ValueError, match="backwards"):
        plan.tick(1.9, [obs("a", 10), obs("b", 10)])
    with pytest.raises(ValueError, match="before the switch-over"):
        plan.stop_copy_finished("a", 2.1)
    assert plan.now == 2.0 and plan.phase is Phase.PRE_COPY
    with pytest.raises(ValueError):
        PendingReply(-1, 0, 0, 0)
    with pytest.raises(ValueError):
        Observation("a", -5)
    with pytest.raises(ValueError):
        PreCopyConfig(max_rounds=0)
    with pytest.raises(ValueError):
        PreCopyConfig(downtime_limit=-1)
    with pytest.raises(ValueError):
        PreCopyPlan(["a", "a"], 0.0)


def test_status_for_a_status_line():
    plan = PreCopyPlan(["a", "b"], 0.0)
    steady(plan, 1.0, {"a": MiB, "b": MiB}, a={"dirty": MiB, "rounds": 4}, b={"initial": MiB, "sent": False})
    s = plan.status(1.5)
    assert s.phase is Phase.PRE_COPY and s.elapsed == 1.5
    assert s.rounds == 0 and s.max_rounds == 30  # b, still in its initial data, has done none
    assert s.sending_initial == ("b",)
    assert s.pending_bytes == 2 * MiB and s.rate == pytest.approx(2 * MiB)
    assert s.expected_downtime == pytest.approx(1.0) and not s.converged
    assert [b.backend for b in s.backends] == ["a", "b"]
    assert s.backends[0].rate == pytest.approx(MiB) and not s.backends[0].finished


# -- a property ----------------------------------------------------------------------


@st.composite
def scenarios(draw):
    """Random ticks: bytes, Pending replies (possibly stale), signals, requests."""
    n = draw(st.integers(1, 3))
    backend_step = st.tuples(
        st.integers(0, 4 * MiB),  # more bytes received
        st.sampled_from([0, 0, 1, MiB]),  # initial_bytes in the Pending reply
        st.integers(0, 8 * MiB),  # dirty_bytes
        st.booleans(),  # InitialDataSent arrives now
        st.integers(0, 3),  # more rounds
    )
    steps = draw(st.lists(
        st.tuples(st.floats(0.01, 0.7), st.lists(backend_step, min_size=n, max_size=n), st.integers(0, 19)),
        min_size=1, max_size=60,
    ))
    config = PreCopyConfig(
        downtime_limit=draw(st.sampled_from([0.0, 0.3, 5.0])), max_rounds=draw(st.integers(1, 5)),
        force=draw(st.booleans()), timeout=draw(st.sampled_from([None, 3.0])), stall_timeout=2.0,
        wait_for_trigger=draw(st.booleans()),
    )
    return n, steps, config


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_never_switches_over_with_initial_data_left_unless_told(scenario):
    n, steps, config = scenario
    names = [f"b{i}" for i in range(n)]
    plan = PreCopyPlan(names, 0.0, config)
    received = [0] * n
    rounds = [0] * n
    signalled = [False] * n
    now = 0.0
    for dt, backends, tell in steps:
        now += dt
        observations = []
        for i, (more, initial, dirty, signal, more_rounds) in enumerate(backends):
            received[i] += more
            rounds[i] += more_rounds
            signalled[i] = signalled[i] or signal
            observations.append(
                Observation(names[i], received[i], PendingReply(initial, dirty, 0, rounds[i]), signalled[i]),
            )
        initial_left = any(o.pending.initial_bytes > 0 and not signalled[i] for i, o in enumerate(observations))
        deadline = plan.next_deadline()
        told = tell == 0
        d = plan.switch_over_now(now) if told else plan.tick(now, observations)
        if isinstance(d, SwitchOver):
            event(f"switch over: {d.reason}")
            assert told or not initial_left
            assert (d.reason is SwitchReason.REQUESTED) == told
            assert told or not config.wait_for_trigger
            if d.reason is SwitchReason.CONVERGED:
                assert d.expected_downtime <= config.downtime_limit
            if d.reason is SwitchReason.FORCED:
                assert config.force and d.expected_downtime > config.downtime_limit
        if isinstance(d, GiveUp):
            event(f"give up: {d.reason}")
            assert not (config.wait_for_trigger and d.reason is GiveUpReason.NOT_CONVERGING)
            if d.reason in (GiveUpReason.STALLED, GiveUpReason.TIMEOUT):
                assert deadline is not None and now >= deadline
            assert plan.tick(now, observations) is d and plan.next_deadline() is None
            return
        if config.timeout is not None and plan.phase is Phase.PRE_COPY:
            assert now < config.timeout


# -- waiting for a trigger (QEMU's pre-switchover) ------------------------------------


def test_waiting_for_a_trigger_never_switches_over_alone_then_switches_when_told():
    fake = FakeBackend("fs0", 16 * MiB, dirty_rate=MiB, bandwidth=128 * MiB)
    run = simulate([fake], PreCopyConfig(wait_for_trigger=True), tell_at=5.0)
    told = [d for _, d in run.decisions if not isinstance(d, Continue)][0]
    assert told is run.switch and run.switch.reason is SwitchReason.REQUESTED and run.switch.at >= 5.0
    # it had converged long before, and said so, but waited
    assert run.plan.summary().switch_reason is SwitchReason.REQUESTED
    assert isinstance(run.final, Finished) and run.final.summary.downtime <= 0.3


def test_waiting_for_a_trigger_keeps_sending_a_state_that_does_not_converge():
    fake = FakeBackend("fs0", 32 * MiB, dirty_rate=256 * MiB, bandwidth=64 * MiB, round_gap=0)
    run = simulate([fake], PreCopyConfig(wait_for_trigger=True, max_rounds=3), tell_at=20.0)
    assert fake.rounds > 3  # not given up at max rounds: the trigger decides
    assert run.switch.reason is SwitchReason.REQUESTED
    assert isinstance(run.final, Finished)


def test_waiting_for_a_trigger_reports_convergence_in_the_status():
    fake = FakeBackend("fs0", 16 * MiB, dirty_rate=MiB, bandwidth=128 * MiB)
    plan = PreCopyPlan(["fs0"], 0.0, PreCopyConfig(wait_for_trigger=True))
    now = 0.0
    while now < 3.0:
        fake.advance(TICK)
        now += TICK
        assert isinstance(plan.tick(now, [fake.observe()]), Continue)
    assert plan.status(now).converged


def test_waiting_for_a_trigger_still_times_out_and_says_for_what():
    fake = FakeBackend("fs0", 16 * MiB, dirty_rate=MiB, bandwidth=128 * MiB)
    run = simulate([fake], PreCopyConfig(wait_for_trigger=True, timeout=4.0))
    assert run.switch is None and run.final.reason is GiveUpReason.TIMEOUT
    assert "not told to switch over within the 4 s timeout" in run.final.message
    assert "pre-switchover" in run.final.message


def test_the_destinations_rate_is_the_channels_where_it_is_lower():
    def expected(delivered_rate: float | None) -> tuple[float, float]:
        plan = PreCopyPlan(["a"], 0.0, PreCopyConfig(downtime_limit=0.1))
        for i in range(1, 21):  # the window starts at the plan's start, before any count: 2 s
            t = i * TICK
            delivered = None if delivered_rate is None else int(delivered_rate * t)
            plan.tick(t, [obs("a", int(20 * MiB * t), dirty=2 * MiB)], Backlog(MiB, 0.0, delivered))
        status = plan.status(2.0)
        return status.rate, status.expected_downtime

    assert expected(None) == pytest.approx((20 * MiB, 3 / 20))
    # the pipes give 20 MiB/s while 10 MiB/s gets through (buffers filling): the 3 MiB take 300 ms
    assert expected(10 * MiB) == pytest.approx((10 * MiB, 3 / 10))
    # a destination faster than the back-ends changes nothing
    assert expected(40 * MiB) == pytest.approx((20 * MiB, 3 / 20))
    with pytest.raises(ValueError):
        Backlog(0, 0.0, -1)
