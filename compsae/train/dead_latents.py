"""Which latents have not fired lately: the AuxK mask and the logged dead fraction."""

from __future__ import annotations

import torch


class DeadLatentTracker:
    """Tokens since each latent last fired.  A latent is dead once that count reaches `window`
    tokens, so nothing can be called dead before `window` tokens have been seen."""

    def __init__(self, n_latents: int, window: int, device: torch.device | str = "cpu") -> None:
        self.window = window
        self.since_fired = torch.zeros(n_latents, dtype=torch.int64, device=device)  # [n]

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """Account for one batch of codes `z: [b, n]`."""
        self.reset_fired((z != 0).any(0), z.shape[0])

    @torch.no_grad()
    def reset_fired(self, fired: torch.Tensor, rows: int) -> None:
        """Count `rows` more tokens and zero the latents that `fired: [n]` (bool) marks.  A masked
        fill, not boolean indexing: that reads the mask's size on the host, a sync per step on a
        GPU."""
        self.since_fired += rows
        self.since_fired.masked_fill_(fired, 0)

    def dead_mask(self) -> torch.Tensor:
        """`[n]` bool: True where the latent has been silent for `window` tokens."""
        return self.since_fired >= self.window

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"since_fired": self.since_fired.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.since_fired = state["since_fired"].to(self.since_fired.device, torch.int64).clone()
