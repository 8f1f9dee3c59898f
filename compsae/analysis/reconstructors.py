"""One interface over everything analysis evaluates: trained SAEs and fitted baselines.

A reconstructor maps a block of activations `x: [b, d]` (original units) to a `Reconstruction`
in original units.  Reconstructors are picklable and small when pickled: a trained model travels
as its checkpoint folder and is loaded once per worker process, so a `distributed` cluster does
not ship weights with every task.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from compsae.train.records import CheckpointMeta
from compsae.train.trained import TrainedSAE

_MODEL_CACHE: dict[str, TrainedSAE] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class Reconstruction:
    """What one block gives: `x_hat: [b, d]`, dense codes `z: [b, n]`, and for a CompSAE
    `x_hat_off: [b, d]` (composition path off), `attn: [b, heads, k, k]`, `active_idx: [b, k]`,
    `gate: [b, d]`."""

    x_hat: np.ndarray
    z: np.ndarray
    x_hat_off: np.ndarray | None = None
    attn: np.ndarray | None = None
    active_idx: np.ndarray | None = None
    gate: np.ndarray | None = None


class Reconstructor(Protocol):
    name: str
    kind: str  # "compsae" | "topk" | "relu" | "pca" | "pca_topk" | "nmf"
    n_latents: int

    def __call__(self, x: np.ndarray) -> Reconstruction: ...


def load_checkpoint(
    model_dir: str, trust_unverified: bool = False, warn: bool = True
) -> TrainedSAE:
    """A checkpoint folder, loaded once per process (one without any content digest only with
    `trust_unverified`, and then with a warning unless not `warn`)."""
    with _CACHE_LOCK:
        if model_dir not in _MODEL_CACHE:
            _MODEL_CACHE[model_dir] = TrainedSAE.load(
                model_dir, trust_unverified=trust_unverified, warn=warn
            )
        return _MODEL_CACHE[model_dir]


class SAEReconstructor:
    """A trained dictionary (any model of the train stage's interface), normalisation undone.

    The model saw `x · scale`; its output is divided by `scale` again so every metric is in the
    store's units."""

    def __init__(
        self,
        name: str,
        kind: str,
        n_latents: int,
        scale: float = 1.0,
        model_dir: str | None = None,
        model: torch.nn.Module | None = None,
        batch_rows: int = 1024,
        meta: CheckpointMeta | None = None,
        trust_unverified: bool = False,
    ) -> None:
        if model_dir is None and model is None:
            raise ValueError("SAEReconstructor needs a model or a checkpoint folder")
        self.name, self.kind, self.n_latents = name, kind, n_latents
        self.scale = float(scale)
        self.model_dir = model_dir
        self.batch_rows = batch_rows
        self.meta = meta  # None for a model given directly
        # travels with the reconstructor: a worker process reloads the checkpoint as trusted
        self.trust_unverified = trust_unverified
        self._model = model

    @classmethod
    def from_checkpoint(
        cls, name: str, model_dir: str, batch_rows: int = 1024, trust_unverified: bool = False
    ) -> SAEReconstructor:
        """Load `model_dir` (a train-stage model folder) and describe it; one without any content
        digest only with `trust_unverified`."""
        sae = load_checkpoint(model_dir, trust_unverified)
        return cls(
            name,
            sae.kind,
            sae.n_latents,
            scale=sae.scale,
            model_dir=model_dir,
            batch_rows=batch_rows,
            meta=sae.meta,
            trust_unverified=trust_unverified,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.model_dir is not None:
            state["_model"] = None  # reloaded from the checkpoint in the worker
        return state

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            assert self.model_dir is not None
            # in a worker process: the user was warned when the analysis loaded it first
            self._model = load_checkpoint(self.model_dir, self.trust_unverified, warn=False).model
        return self._model

    def __call__(self, x: np.ndarray) -> Reconstruction:
        return self.reconstruct(x)[0]

    @torch.no_grad()
    def reconstruct(
        self,
        x: np.ndarray,
        rows: np.ndarray | None = None,
        m: int = 0,
        null_seed: int | None = None,
        effect_rows: np.ndarray | None = None,
    ) -> tuple[Reconstruction, Any, Any]:
        """The reconstruction of `x: [b, d]` and, when `rows` is given (`[n_latents]` latent -> row
        of the `m` tracked latents, −1 untracked) and the model has a composition path, its
        `PairEffectSums` over those latents (else None).  One forward per `batch_rows` rows serves
        both: the effects are measured on the same codes and x̂ the reconstruction reports.
        With `null_seed`, also the same sums on rows made additive in this dictionary (its linear
        reconstruction plus its residuals permuted across the batch's tokens, see `pair_calls`):
        the null of the label-free pair calls; else the third value is None.  `effect_rows: [b]`
        bool: the rows both sums cover (default all; the reconstruction always covers all)."""
        from compsae.analysis.pair_effects import PairEffectSums

        model = self.model
        composes = getattr(model, "has_composition", False) and hasattr(model, "decode_active")
        acc = PairEffectSums.empty(m) if rows is not None and composes else None
        null = PairEffectSums.empty(m) if acc is not None and null_seed is not None else None
        parts = []
        for i in range(0, max(len(x), 1), self.batch_rows):
            xt = (
                torch.as_tensor(np.ascontiguousarray(x[i : i + self.batch_rows], dtype=np.float32))
                * self.scale
            )
            out = model(xt)
            parts.append(self._numpy(out))
            sel = (
                slice(None)
                if effect_rows is None
                else torch.as_tensor(np.asarray(effect_rows[i : i + self.batch_rows], dtype=bool))
            )
            xs, x_hat = xt[sel], out.x_hat[sel]
            if acc is not None and len(xs):
                idx = out.active_idx[sel]
                acc.update(model, xs, x_hat, idx, out.z[sel].gather(1, idx), rows)
            if null is not None and len(xs) > 1 and out.comp is not None:
                gen = torch.Generator().manual_seed(null_seed * 1_000_003 + i)
                perm = torch.randperm(len(xs), generator=gen)
                x0 = (x_hat - out.comp[sel]) + (xs - x_hat)[perm]
                out0 = model(x0)
                idx0 = out0.active_idx
                null.update(model, x0, out0.x_hat, idx0, out0.z.gather(1, idx0), rows)
        if len(parts) == 1:
            return parts[0], acc, null
        cat = {
            f: (
                None
                if getattr(parts[0], f) is None
                else np.concatenate([getattr(p, f) for p in parts])
            )
            for f in Reconstruction.__dataclass_fields__
        }
        return Reconstruction(**cat), acc, null

    def _numpy(self, out: Any) -> Reconstruction:
        """A model's output on scaled rows, back in store units as numpy."""
        inv = 1.0 / self.scale
        x_hat = out.x_hat.float() * inv
        comp = out.comp
        # one forward: x̂ with the path off is x̂ minus its gated composition term
        x_hat_off = None if comp is None else x_hat - comp.float() * inv
        idx, gate = out.active_idx, out.gate
        return Reconstruction(
            x_hat=x_hat.numpy(),
            z=out.z.float().numpy() * inv,
            x_hat_off=None if x_hat_off is None else x_hat_off.numpy(),
            attn=None if out.attn is None else out.attn.float().numpy(),
            active_idx=None if idx is None else idx.numpy(),
            gate=None if gate is None else gate.float().numpy(),
        )
