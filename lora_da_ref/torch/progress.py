"""One progress bar over a whole LoRA-DA init: every pass's batches, then the layer solves.

The bar's total is ``passes × batches + layers`` steps, known before any work starts, so its
estimate of the time left covers the whole init and never restarts from 0 %; its description
names the stage (``pass 2/4 (8 layers)``, ``solves``). A batch and a layer solve are one step
each although they take different times, so the estimate is rough while the stage changes.
"""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["RunProgress"]


class RunProgress:
    """A tqdm bar over ``total`` steps (disabled: every call is a no-op)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self._bar = tqdm(total=total, desc="LoRA-DA", unit="step", disable=not self.enabled)

    @classmethod
    def of(cls, progress: bool | RunProgress, total: int) -> RunProgress:
        """``progress`` itself when it is a bar, else a new bar over ``total`` steps."""
        return progress if isinstance(progress, RunProgress) else cls(total, bool(progress))

    def stage(self, text: str) -> None:
        """Name the current stage in the bar's description."""
        self._bar.set_description_str(f"LoRA-DA {text}")

    def step(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
