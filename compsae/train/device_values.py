"""Training values left on the device until they are needed on the host.

Reading a CUDA tensor on the host (`float(t)`, `if t:`) waits for every kernel queued before it:
one such read per step keeps the host from queueing the next step while the GPU runs this one, and
a step of a small SAE is launch-bound.  The trainer therefore keeps each step's loss terms and the
first non-finite loss on the device and reads them once per log step or checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepTerms:
    """One step's global loss terms: `values[i]` is the batch mean of `names[i]`, on the device."""

    names: list[str]
    values: torch.Tensor  # [len(names)]

    def floats(self) -> dict[str, float]:
        """The terms on the host (one read)."""
        return dict(zip(self.names, self.values.tolist(), strict=True))


class FirstNonFinite:
    """The first step whose loss was inf or NaN, and that loss, noted on the device without a
    read."""

    def __init__(self, device: torch.device | str) -> None:
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet
        self.loss = torch.zeros((), dtype=torch.float32, device=device)

    @torch.no_grad()
    def note(self, loss: torch.Tensor, step: int) -> None:
        """Remember `step` and `loss` when `loss` is not finite and no earlier step was."""
        first = ~torch.isfinite(loss) & (self.step == 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.float(), self.loss)

    def read(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss, or None (one read)."""
        step = int(self.step)
        return (step, float(self.loss)) if step else None
