"""The init's progress bar: its estimate of the time left weighs each step by its measured cost."""

from __future__ import annotations

import pytest

from lora_da_ref.torch import progress as P


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_left_weighs_batches_by_positions_and_solves_by_their_measured_scale(monkeypatch):
    """Two passes over batches of 10, 30 and 20 positions at 0.5 s a position, the first batch
    paying 4 s more (one-time costs); solves predicted at 1 s and 3 s that really take 2× that.
    After the first batch the rate is that batch's own; from the second on it leaves the first
    batch out; after the first solve the remaining solves are scaled by measured/predicted.
    Catches equal steps (a batch and a solve as one step each), a rate that keeps the first
    batch's one-time cost, and solves that are never rescaled."""
    clock = Clock()
    monkeypatch.setattr(P.time, "perf_counter", clock)
    bar = P.RunProgress.for_init([10, 30, 20], 2, {"a": 1.0, "b": 3.0}, enabled=False)
    assert bar.remaining_seconds() is None  # nothing measured yet
    clock.now += 4 + 5  # the first batch: 10 positions and the one-time cost
    bar.step()
    rate = 9 / 10
    assert bar.remaining_seconds() == pytest.approx(rate * (30 + 20 + 60) + 4)
    clock.now += 15  # 30 positions at 0.5 s
    bar.step()
    assert bar.remaining_seconds() == pytest.approx(0.5 * (20 + 60) + 4)
    for positions in (20, 10, 30, 20):
        clock.now += 0.5 * positions
        bar.step()
    assert bar.remaining_seconds() == pytest.approx(4.0)  # the solves, as predicted
    clock.now += 2 * 1.0  # "a" takes twice its prediction
    bar.solved(["a"])
    assert bar.remaining_seconds() == pytest.approx(2 * 3.0)
    bar.solved(["b"], here=False)  # solved by another process
    assert bar.remaining_seconds() == 0


def test_the_solves_are_rescaled_only_after_a_tenth_of_their_predicted_time(monkeypatch):
    """Twenty solves predicted at 1 s: the first, measured at 5 s (its neighbours ran beside it),
    leaves the prediction alone; from the second on (a tenth of 20 s) the measured scale applies.
    Catches a rescale on the first solve (the estimate jumped to 4.8x the time left on SmolLM2)."""
    clock = Clock()
    monkeypatch.setattr(P.time, "perf_counter", clock)
    names = [f"l{i}" for i in range(20)]
    bar = P.RunProgress.for_init([], 1, dict.fromkeys(names, 1.0), enabled=False)
    clock.now += 5.0
    bar.solved(names[:1])
    assert bar.remaining_seconds() == pytest.approx(19.0)
    clock.now += 1.0
    bar.solved(names[1:2])
    assert bar.remaining_seconds() == pytest.approx(18 * 6.0 / 2)


def test_a_pass_read_from_a_store_costs_nothing(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(P.time, "perf_counter", clock)
    bar = P.RunProgress.for_init([10, 10], 2, {"a": 1.0}, enabled=False)
    bar.skip_pass(2)
    clock.now += 5
    bar.step()
    clock.now += 5
    bar.step()
    assert bar.remaining_seconds() == pytest.approx(1.0)
