"""Streaming reconstruction metrics (definitions in docs/metrics.md), as mergeable partial sums.

Every statistic is a small dataclass built from one block of rows (`from_batch`) and merged with
another (`merge`), so a Dask reduction, a plain loop and one big batch give the same numbers.
FVU keeps numerator and denominator apart: `Σ‖x − x̂‖²` and `Σ‖x − μ‖²` with μ the mean over the
evaluated tokens, the latter merged per dimension with Chan et al.'s parallel formula (no
`Σ‖x‖² − n‖μ‖²` cancellation, which loses digits on residual streams with a large mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from compsae.variance import merge_moments

# log10 firing-density bins of the density histogram: 1e-8 .. 1 in quarter decades
DENSITY_BINS = np.linspace(-8.0, 0.0, 33)


@dataclass
class ReconSums:
    """Partial sums of the reconstruction metrics over some tokens.

    `sq_err_off` is Σ‖x − x̂_off‖² with a CompSAE's composition path switched off (NaN for
    others)."""

    n: int
    mean: np.ndarray  # [d] mean of x over these tokens
    m2: np.ndarray  # [d] Σ (x − mean)²
    sq_err: float
    sq_err_off: float
    cos_sum: float
    l2_ratio_sum: float
    l0_sum: float

    @classmethod
    def empty(cls, d: int, has_off: bool = False) -> ReconSums:
        off = 0.0 if has_off else float("nan")
        return cls(0, np.zeros(d), np.zeros(d), 0.0, off, 0.0, 0.0, 0.0)

    @classmethod
    def from_batch(
        cls, x: np.ndarray, x_hat: np.ndarray, l0: np.ndarray, x_hat_off: np.ndarray | None = None
    ) -> ReconSums:
        """Sums of one block: `x`, `x_hat`, `x_hat_off`: [b, d] (original units), `l0`: [b] active
        latents."""
        x = np.asarray(x, dtype=np.float64)
        x_hat = np.asarray(x_hat, dtype=np.float64)
        if x.shape[0] == 0:
            return cls.empty(x.shape[1], x_hat_off is not None)
        mean = x.mean(0)
        norm_x = np.linalg.norm(x, axis=1)
        norm_hat = np.linalg.norm(x_hat, axis=1)
        # a zero row has no direction: cosine 0 and ratio 0 rather than NaN poisoning the mean
        safe = np.where(norm_x > 0, norm_x, 1.0)
        cos = np.where(
            (norm_x > 0) & (norm_hat > 0),
            (x * x_hat).sum(1) / (safe * np.where(norm_hat > 0, norm_hat, 1.0)),
            0.0,
        )
        off = (
            float("nan")
            if x_hat_off is None
            else float(((x - np.asarray(x_hat_off, np.float64)) ** 2).sum())
        )
        return cls(
            n=x.shape[0],
            mean=mean,
            m2=((x - mean) ** 2).sum(0),
            sq_err=float(((x - x_hat) ** 2).sum()),
            sq_err_off=off,
            cos_sum=float(cos.sum()),
            l2_ratio_sum=float(np.where(norm_x > 0, norm_hat / safe, 0.0).sum()),
            l0_sum=float(np.asarray(l0, dtype=np.float64).sum()),
        )

    def merge(self, other: ReconSums) -> ReconSums:
        n, mean, m2 = merge_moments(self.n, self.mean, self.m2, other.n, other.mean, other.m2)
        return ReconSums(
            n,
            mean,
            m2,
            self.sq_err + other.sq_err,
            self.sq_err_off + other.sq_err_off,
            self.cos_sum + other.cos_sum,
            self.l2_ratio_sum + other.l2_ratio_sum,
            self.l0_sum + other.l0_sum,
        )

    def summary(self) -> dict[str, float]:
        """FVU, FVE, cosine, l2 ratio, L0 (and, with a composition path, FVU without it and the
        path's share of the explained variance `(FVU_off − FVU) / (1 − FVU)`)."""
        nan = float("nan")
        var = float(self.m2.sum())
        fvu = self.sq_err / var if var > 0 else nan
        out = {
            "n_tokens": float(self.n),
            "fvu": fvu,
            "fve": 1.0 - fvu,
            "cosine": self.cos_sum / self.n if self.n else nan,
            "l2_ratio": self.l2_ratio_sum / self.n if self.n else nan,
            "l0": self.l0_sum / self.n if self.n else nan,
            "sq_err": self.sq_err,
            "total_variance": var,
        }
        if not np.isnan(self.sq_err_off):
            fvu_off = self.sq_err_off / var if var > 0 else nan
            out["fvu_nocomp"] = fvu_off
            out["comp_share"] = (fvu_off - fvu) / (1.0 - fvu) if fvu < 1.0 else nan
        return out


@dataclass
class LatentSums:
    """Per-latent firing counts, activation sums and maxima over `n_tokens` tokens.

    A latent fires where its code is non-zero (PCA coefficients may be negative)."""

    n_tokens: int
    fire: np.ndarray  # [n] int64 tokens where the latent is non-zero
    act_sum: np.ndarray  # [n] Σ activation where it fires
    act_max: np.ndarray  # [n] max activation (−inf where it never fired)

    @classmethod
    def empty(cls, n_latents: int) -> LatentSums:
        return cls(
            0, np.zeros(n_latents, np.int64), np.zeros(n_latents), np.full(n_latents, -np.inf)
        )

    @classmethod
    def from_codes(cls, z: np.ndarray) -> LatentSums:
        """Sums of one block of dense codes `z: [b, n]`."""
        z = np.asarray(z)
        on = z != 0
        act_max = np.where(on, z, -np.inf).max(0) if z.shape[0] else np.full(z.shape[1], -np.inf)
        return cls(
            z.shape[0],
            on.sum(0).astype(np.int64),
            z.sum(0, dtype=np.float64),
            act_max.astype(np.float64),
        )

    def merge(self, other: LatentSums) -> LatentSums:
        return LatentSums(
            self.n_tokens + other.n_tokens,
            self.fire + other.fire,
            self.act_sum + other.act_sum,
            np.maximum(self.act_max, other.act_max),
        )

    @property
    def frequency(self) -> np.ndarray:
        """[n] fraction of tokens each latent fires on."""
        return self.fire / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> np.ndarray:
        """[n] mean activation where the latent fires (NaN where it never did)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.fire > 0, self.act_sum / np.maximum(self.fire, 1), np.nan)

    def summary(self, dense_thresholds: list[float]) -> dict[str, Any]:
        """Dead count/fraction (never fired on these `n_tokens` tokens), dense fractions and the
        log10-density histogram of the alive latents."""
        n = len(self.fire)
        dead = int((self.fire == 0).sum())
        freq = self.frequency
        out: dict[str, Any] = {
            "n_latents": n,
            "dead_tokens_evaluated": self.n_tokens,
            "dead_count": dead,
            "dead_fraction": dead / n if n else float("nan"),
            "alive_fraction": 1 - dead / n if n else float("nan"),
        }
        for t in dense_thresholds:
            out[f"dense_fraction_{t:g}"] = float((freq > t).sum() / n) if n else float("nan")
        out["density_hist"] = density_histogram(self.fire, self.n_tokens)
        return out


def density_histogram(fire: np.ndarray, n_tokens: int) -> dict[str, list[float]]:
    """Counts of alive latents per log10(firing fraction) bin (`DENSITY_BINS`), dead ones apart."""
    alive = fire > 0
    logd = np.log10(fire[alive] / max(n_tokens, 1))
    counts, _ = np.histogram(np.clip(logd, DENSITY_BINS[0], DENSITY_BINS[-1]), bins=DENSITY_BINS)
    return {
        "bin_edges": DENSITY_BINS.tolist(),
        "counts": counts.astype(int).tolist(),
        "dead": int((~alive).sum()),
    }


@dataclass
class TopContexts:
    """The `k` highest activations of every latent and the store rows they came from.

    Ties go to the lower row, so the result does not depend on how the rows were split up."""

    values: np.ndarray  # [n, k] float32, descending; −inf pads
    rows: np.ndarray  # [n, k] int64 store rows; −1 pads

    @classmethod
    def empty(cls, n_latents: int, k: int) -> TopContexts:
        return cls(
            np.full((n_latents, k), -np.inf, np.float32), np.full((n_latents, k), -1, np.int64)
        )

    @classmethod
    def from_codes(cls, z: np.ndarray, rows: np.ndarray, k: int) -> TopContexts:
        """Top `k` of one block: `z: [b, n]` codes of store rows `rows: [b]` (only where z > 0).

        Works on the firing entries only (a TopK code has k of n per row): one sort of those by
        (latent, value descending, row ascending), then each latent's first `k`."""
        z = np.asarray(z, dtype=np.float32)
        n = z.shape[1]
        out = cls.empty(n, k)
        if z.shape[0] == 0 or k == 0:
            return out
        rows = np.asarray(rows, np.int64)
        r, lat = np.nonzero(z > 0)  # [nnz] each
        vals, rr = z[r, lat], rows[r]
        order = np.lexsort((rr, -vals.astype(np.float64), lat))
        lat, vals, rr = lat[order], vals[order], rr[order]
        rank = np.arange(lat.size) - np.searchsorted(lat, lat)  # place within its latent's run
        sel = rank < k
        out.values[lat[sel], rank[sel]] = vals[sel]
        out.rows[lat[sel], rank[sel]] = rr[sel]
        return out

    def merge(self, other: TopContexts, k: int | None = None) -> TopContexts:
        k = self.values.shape[1] if k is None else k
        vals = np.concatenate([self.values, other.values], axis=1)
        rows = np.concatenate([self.rows, other.rows], axis=1)
        # order by value descending, then row ascending (pads: −inf, row −1 → pushed last by key)
        row_key = np.where(rows < 0, np.iinfo(np.int64).max, rows)
        order = np.lexsort((row_key, -vals.astype(np.float64)), axis=1)[:, :k]
        return TopContexts(np.take_along_axis(vals, order, 1), np.take_along_axis(rows, order, 1))


def merge_partials(a: Any, b: Any) -> Any:
    """Merge two partial results: dataclasses with `merge`, dicts key by key, None as identity."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        return {k: merge_partials(a.get(k), b.get(k)) for k in {**a, **b}}
    return a.merge(b)


__all__ = [
    "DENSITY_BINS",
    "LatentSums",
    "ReconSums",
    "TopContexts",
    "density_histogram",
    "merge_partials",
]
