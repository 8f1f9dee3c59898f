"""`TrainedSAE`: one trained (or imported) model as every later stage uses it.

It holds the model, its checkpoint metadata and what follows from them: the normalisation scale
(the model saw `x * scale`, x in store units), the hook, the held-out split, whether the model has
a composition path, and `encode` / `decode` / `reconstruct` / `pair_effects` on store-unit rows.

Units: `encode`, `decode`, `reconstruct` and `pair_effects` take and return store units (the
values the harvest wrote); the normalisation scale is applied and undone inside.  A code in store
units is the latent's amplitude along its unit-norm decoder row, so `codes @ W_dec` is in store
units too.  Only `forward` returns the raw model output, in model units (store units × scale).

Analyze, the probes, the human-evaluation export, the ground-truth comparison and the held-out
metrics all load models through it, so none re-derives the scale or the kind."""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np
import torch

from compsae.errors import UserError
from compsae.files import CONFIG_FILE, MODEL_FILE
from compsae.store.activation_store import ActivationStore
from compsae.store.loader import BatchLoader, Split
from compsae.store.split import HeldOutSplit
from compsae.train.checkpoint import load_model, parse_meta
from compsae.train.models import SparseAutoencoder
from compsae.train.models.base import SAEOutput
from compsae.train.models.topk import decode_active_latents
from compsae.train.records import CheckpointMeta

# token rows per chunk of `pair_effects`' intervention
_PAIR_ROWS = 64


@dataclass(frozen=True)
class Codes:
    """The latent codes of `b` tokens, in store units (`z_model / scale`).

    `z: [b, n_latents]` dense (zeros where inactive); `idx: [b, k]` the active latents of a top-k
    model, in the model's order (None for ReLU / JumpReLU): decoding uses that exact active set, so
    a latent whose code is 0 but was selected stays selected."""

    z: torch.Tensor
    idx: torch.Tensor | None = None

    @property
    def values(self) -> torch.Tensor:
        """`[b, k]` the codes of the active latents (store units); needs `idx`."""
        if self.idx is None:
            raise ValueError("these codes have no active set (not a top-k model); use `z`")
        return self.z.gather(1, self.idx)


@dataclass(frozen=True)
class PairEffects:
    """What each pair of a token's active latents does together, in store units.

    For a token with codes z and two active latents i, j:
    `delta = x̂(z) − x̂(z∖i) − x̂(z∖j) + x̂(z∖ij)` (z∖i: latent i's code set to 0), the mixed
    difference of the reconstruction; for the pairwise decoder it is exactly its pair term.
    `latents: [b, P, 2]` the latent ids (i, j) of each pair, `delta: [b, P, d]` in store units,
    `norm: [b, P]` its L2 norm (store units); P = k(k−1)/2, pairs of positions a < b."""

    latents: torch.Tensor
    delta: torch.Tensor

    @property
    def norm(self) -> torch.Tensor:
        """`[b, P]` ‖delta‖ in store units."""
        return torch.linalg.vector_norm(self.delta, dim=-1)


def _rows(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`x` as a float32 tensor (a numpy array is copied only if it must be)."""
    if isinstance(x, np.ndarray):
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    return x.float()


@dataclass
class TrainedSAE:
    """A model folder of the train stage, loaded."""

    name: str
    folder: str
    model: SparseAutoencoder
    meta: CheckpointMeta

    @classmethod
    def load(
        cls,
        folder: str,
        device: str | torch.device = "cpu",
        name: str | None = None,
        trust_unverified: bool = False,
        *,
        warn: bool = True,
    ) -> TrainedSAE:
        """The model saved in `folder` (eval mode, schedule at its end), named after the folder.
        A checkpoint without any content digest is refused unless `trust_unverified` (then a
        warning, unless not `warn`)."""
        model, meta = load_model(folder, device, trust_unverified=trust_unverified, warn=warn)
        return cls(
            name or folder.rstrip("/").rsplit("/", 1)[-1], folder, model, parse_meta(meta, folder)
        )

    @property
    def scale(self) -> float:
        return self.meta.scale

    @property
    def hook(self) -> str:
        return self.meta.hook

    @property
    def kind(self) -> str:
        return self.meta.type

    @property
    def n_latents(self) -> int:
        return int(self.meta.model.n_latents)

    @property
    def split(self) -> HeldOutSplit | None:
        """The held-out split it was trained with; None for a model trained elsewhere."""
        return self.meta.split

    @property
    def has_composition(self) -> bool:
        return self.model.has_composition

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, x: np.ndarray | torch.Tensor, **kwargs: bool) -> SAEOutput:
        """The raw model output on store-unit rows `x: [b, d]`, which are scaled as in training
        first.  Unlike every other method the OUTPUT IS IN MODEL UNITS (store units × `scale`):
        `x_hat`, `z`, `comp`.  Use `reconstruct` / `encode` for store units."""
        return self.model(_rows(x).to(self.device) * self.scale, **kwargs)

    @torch.no_grad()
    def reconstruct(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """`x̂: [b, d]` of store-unit rows `x: [b, d]`; store units in and out."""
        return self.forward(x).x_hat / self.scale

    def batches(
        self,
        store: ActivationStore | str,
        batch_size: int = 512,
        split: Split = "heldout",
        shuffle: bool = True,
        epochs: int | None = 1,
        seed: int = 0,
    ) -> BatchLoader:
        """Batches `[batch_size, d]` of this model's hook from `store`, in store units (feed them
        to `encode` / `reconstruct` as they are), on the checkpoint's own held-out split: `split`
        "heldout" (the rows it never trained on), "train" or "all".  A model trained elsewhere
        records no split: every row is then served, whatever `split` says."""
        own = self.split
        return BatchLoader(
            store,
            self.hook,
            batch_size=batch_size,
            split=split if own else "all",
            heldout_fraction=own.fraction if own else 0.0,
            split_seed=own.seed if own else 0,
            seed=seed,
            device=self.device,
            normalize=False,
            shuffle=shuffle,
            epochs=epochs,
        )

    @torch.no_grad()
    def encode(self, x: np.ndarray | torch.Tensor) -> Codes:
        """The codes of store-unit rows `x: [b, d]`, in store units (see `Codes`);
        `decode(encode(x))` equals `reconstruct(x)`."""
        out = self.forward(x)
        return Codes(out.z / self.scale, out.active_idx)

    @torch.no_grad()
    def decode(self, codes: Codes | torch.Tensor) -> torch.Tensor:
        """`x̂: [b, d]` in store units of `codes` in store units: a `Codes` from `encode`
        (possibly edited), or dense `[b, n_latents]` codes.  The composition path, where the model
        has one, is included.  Dense codes of a top-k model are decoded over their k largest."""
        if isinstance(codes, torch.Tensor):
            z = codes.float().to(self.device)
            idx = z.topk(self.model.k, dim=-1).indices if hasattr(self.model, "active") else None
            codes = Codes(z, idx)
        if codes.idx is None:
            return self.model.decode(codes.z.to(self.device) * self.scale) / self.scale
        idx = codes.idx.to(self.device)
        return self._decode_active(idx, codes.values.to(self.device) * self.scale) / self.scale

    def _decode_active(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """Model-unit `x̂` from model-unit active codes (`idx`, `vals`: `[b, k]`)."""
        if hasattr(self.model, "decode_active"):
            return self.model.decode_active(idx, vals)
        m = self.model
        return decode_active_latents(m.W_dec, idx, vals, m.sparse_decoder) + m.b_dec

    @torch.no_grad()
    def pair_effects(self, x: np.ndarray | torch.Tensor) -> PairEffects:
        """The mixed difference (see `PairEffects`) of every pair of active latents of each
        store-unit row `x: [b, d]`, in store units.  A model without a composition path gives zeros
        up to rounding; a ReLU / JumpReLU model (no fixed active set) is refused."""
        codes = self.encode(x)
        if codes.idx is None:
            raise UserError(f"{self.name} is a {self.kind} model: pair effects need a top-k model")
        idx = codes.idx.to(self.device)
        vals = codes.values.to(self.device) * self.scale
        k = idx.shape[1]
        pa, pb = torch.triu_indices(k, k, offset=1, device=idx.device)  # pairs of positions a < b
        latents = torch.stack([idx[:, pa], idx[:, pb]], dim=-1)  # [b, P, 2]
        # chunks of rows keep the [rows, 3, P, d] intervention tensor small
        delta = torch.cat(
            [
                self._mixed(idx[lo : lo + _PAIR_ROWS], vals[lo : lo + _PAIR_ROWS], pa, pb)
                for lo in range(0, idx.shape[0], _PAIR_ROWS)
            ]
        )
        return PairEffects(latents, delta / self.scale)

    def _mixed(
        self, idx: torch.Tensor, vals: torch.Tensor, pa: torch.Tensor, pb: torch.Tensor
    ) -> torch.Tensor:
        """Model-unit mixed differences `[b, P, d]` of the pairs (pa, pb) of positions:
        x̂(z) − x̂(z∖i) − x̂(z∖j) + x̂(z∖ij), by four decodes per pair."""
        b, k = idx.shape
        n_pairs = pa.shape[0]
        eye = torch.eye(k, dtype=torch.bool, device=idx.device)
        keep = torch.stack([~eye[pa], ~eye[pb], ~eye[pa] & ~eye[pb]])  # [3, P, k]
        v = (vals[:, None, None, :] * keep[None]).reshape(-1, k)  # [b·3·P, k]
        i = idx[:, None, None, :].expand(b, 3, n_pairs, k).reshape(-1, k)
        dec = self._decode_active(i, v).view(b, 3, n_pairs, -1)
        full = self._decode_active(idx, vals)[:, None]  # [b, 1, d]
        return full - dec[:, 0] - dec[:, 1] + dec[:, 2]


def model_folders(train_dir: str) -> list[tuple[str, str]]:
    """(name, folder) of every model folder (a sub-folder holding config.json) of a train-stage
    output, sorted by name."""
    fs, root = fsspec.core.url_to_fs(train_dir)
    if not fs.isdir(root):
        raise UserError(f"no train stage folder at {train_dir}; run `compsae train` first")
    prefix = train_dir.rstrip("/")
    names = sorted(
        p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p)
    )
    base = root.rstrip("/")
    for n in names:
        # weights without their metadata: leaving the model out silently would drop it from the
        # metrics, so say which folder is broken instead
        if fs.exists(f"{base}/{n}/{MODEL_FILE}") and not fs.exists(f"{base}/{n}/{CONFIG_FILE}"):
            raise UserError(
                f"{prefix}/{n} has {MODEL_FILE} but no {CONFIG_FILE}; restore it or retrain"
            )
    return [(n, f"{prefix}/{n}") for n in names if fs.exists(f"{base}/{n}/{CONFIG_FILE}")]


def load_trained(
    train_dir: str, device: str | torch.device = "cpu", trust_unverified: bool = False
) -> list[TrainedSAE]:
    """Every model of a train-stage output, sorted by name."""
    return [
        TrainedSAE.load(folder, device, name, trust_unverified=trust_unverified)
        for name, folder in model_folders(train_dir)
    ]
