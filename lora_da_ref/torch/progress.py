"""One progress bar over a whole LoRA-DA init: every pass's batches, then the layer solves.

The bar counts **seconds of work**, not steps: a batch and a layer solve take very different
times (on SmolLM2, 64 calibration problems are 64 batches and 210 solves, and the batches are
most of the time), so counting them as equal steps gave an estimate of the time left that was
off by a factor of five. Each step is weighed by its measured cost:

* a **batch** by its statistics positions times the seconds per position measured so far in
  this run (from the second batch on, the first one leaves the rate: it also pays one-time
  costs, allocations and lazy initialisation);
* a **layer solve** by the time a solve of its shape took on synthetic statistics of that shape,
  timed before the first pass (:func:`lora_da_ref.torch.pipeline.predict_solve_seconds`: one
  transformer layer's solves, about ``1/layers`` of the solve time), times the ratio of measured
  to predicted seconds once a tenth of the predicted solve time has run (:data:`RESCALE_AFTER`:
  earlier, solves running side by side make the first ones look slow; on SmolLM2 the first
  finished task put the estimate at 4.8× the time left).

The time left is the remaining work at those rates; the bar's description names the stage
(``statistics, pass 2/4 (8 layers)``, ``solves``). Without a work model (:meth:`RunProgress.of`,
one statistics pass on its own) every step weighs the same, as a plain tqdm bar.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

from tqdm.auto import tqdm

__all__ = ["RunProgress"]

_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}"
RESCALE_AFTER = 0.1  # the share of the predicted solve time measured before the rescale


class RunProgress:
    """A tqdm bar over a whole init (disabled: every call is a no-op).

    ``RunProgress(total)`` counts ``total`` equal steps (:meth:`step`). With a work model
    (:meth:`for_init`) the steps are the passes' batches in order (:meth:`step`, one per batch;
    :meth:`skip_pass` for a pass read from a store) and the layers' solves (:meth:`solved`),
    each weighed by its measured cost (module docstring).
    """

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self._bar = tqdm(total=total, desc="LoRA-DA", unit="step", disable=not self.enabled)
        self._work: _Work | None = None

    @classmethod
    def of(cls, progress: bool | RunProgress, total: int) -> RunProgress:
        """``progress`` itself when it is a bar, else a new bar over ``total`` steps."""
        return progress if isinstance(progress, RunProgress) else cls(total, bool(progress))

    @classmethod
    def for_init(
        cls,
        positions: Sequence[int],
        passes: int,
        solve_seconds: Mapping[str, float],
        enabled: bool = True,
    ) -> RunProgress:
        """A bar over ``passes`` passes of the batches with ``positions`` statistics positions
        each, then the solves of ``solve_seconds``' layers, each predicted to take that long."""
        bar = cls.__new__(cls)
        bar.enabled = bool(enabled)
        bar._bar = tqdm(total=1.0, desc="LoRA-DA", bar_format=_FORMAT, disable=not bar.enabled)
        bar._work = _Work(list(positions), passes, dict(solve_seconds))
        return bar

    def stage(self, text: str) -> None:
        """Name the current stage in the bar's description."""
        self._bar.set_description_str(f"LoRA-DA {text}")

    def step(self, n: int = 1) -> None:
        """``n`` steps done: batches of the current pass with a work model."""
        if self._work is None:
            self._bar.update(n)
            return
        for _ in range(n):
            self._work.batch_done()
        self._show()

    def mark(self) -> None:
        """Work between stages (a reduce, a store, a gather) is charged to no step."""
        if self._work is not None:
            self._work.last = time.perf_counter()

    def skip_pass(self, batches: int) -> None:
        """The current pass of ``batches`` batches was read from a store: done, at no cost."""
        if self._work is None:
            self._bar.update(batches)
            return
        self._work.skip_pass()
        self._show()

    def solved(self, names: Iterable[str], *, here: bool = True) -> None:
        """These layers' solves are done (``here=False``: by another process, at no cost here)."""
        names = list(names)
        if self._work is None:
            self._bar.update(len(names))
            return
        self._work.solves_done(names, here)
        self._show()

    def remaining_seconds(self) -> float | None:
        """The estimated seconds left (``None`` before anything is measured)."""
        return None if self._work is None else self._work.remaining()

    def _show(self) -> None:
        if not self.enabled or self._work is None:
            return
        left = self._work.remaining()
        done = self._work.done()
        if left is None:
            self._bar.set_postfix_str("", refresh=False)
        else:
            total = done + left
            self._bar.n = done / total if total > 0 else 0.0
            self._bar.set_postfix_str(f"about {_clock(left)} left", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._work is not None and self.enabled:
            self._bar.n = 1.0
            self._bar.set_postfix_str("", refresh=False)
        self._bar.close()


class _Work:
    """The cost model behind :meth:`RunProgress.for_init` (module docstring)."""

    def __init__(self, positions: list[int], passes: int, solve: dict[str, float]) -> None:
        self.positions, self.passes, self.solve = positions, passes, solve
        self.start = time.perf_counter()
        self.batches_done = 0  # over all passes
        self.last = self.start  # end of the latest step
        self.first_batch_seconds: float | None = None
        self.stats_seconds = 0.0  # after the first batch
        self.stats_positions = 0  # after the first batch
        self.solve_predicted = 0.0  # predicted seconds of the solves done here
        self.solve_measured = 0.0
        self.solves_left = dict(solve)
        self.solve_total = sum(solve.values())

    def batch_done(self) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        pos = self.positions[self.batches_done % len(self.positions)] if self.positions else 0
        if self.first_batch_seconds is None:
            self.first_batch_seconds = seconds
        else:
            self.stats_seconds += seconds
            self.stats_positions += pos
        self.batches_done += 1

    def skip_pass(self) -> None:
        self.batches_done += len(self.positions)
        self.last = time.perf_counter()

    def solves_done(self, names: list[str], here: bool) -> None:
        now = time.perf_counter()
        predicted = sum(self.solves_left.pop(n, 0.0) for n in names)
        if here:
            self.solve_predicted += predicted
            self.solve_measured += now - self.last
        self.last = now

    def _rate(self) -> float | None:
        """Seconds per statistics position."""
        if self.stats_positions > 0:
            return self.stats_seconds / self.stats_positions
        if self.first_batch_seconds is not None and self.positions and self.positions[0] > 0:
            return self.first_batch_seconds / self.positions[0]
        return None

    def remaining(self) -> float | None:
        total_batches = self.passes * len(self.positions)
        left_batches = max(total_batches - self.batches_done, 0)
        stats_left = 0.0
        if left_batches:
            rate = self._rate()
            if rate is None:
                return None
            per_pass = sum(self.positions)
            full, part = divmod(left_batches, len(self.positions))
            stats_left = rate * (
                full * per_pass + sum(self.positions[len(self.positions) - part :])
            )
        enough = (
            self.solve_predicted > 0 and self.solve_predicted >= RESCALE_AFTER * self.solve_total
        )
        scale = self.solve_measured / self.solve_predicted if enough else 1.0
        return stats_left + scale * sum(self.solves_left.values())

    def done(self) -> float:
        return time.perf_counter() - self.start


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
