"""Pure functions of the step: learning rate, graduated k, curriculum m, L1 warm-up."""

from __future__ import annotations

import bisect

from compsae.train.config import CompSAEConfig, ModelConfig, ReLUConfig, TopKConfig, TrainConfig


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up over the first `warmup_fraction`, constant, linear decay to 0 over the last
    `decay_fraction` of `total` steps."""
    warm = int(cfg.warmup_fraction * total)
    decay = int(cfg.decay_fraction * total)
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    decay_start = total - decay
    if decay and step >= decay_start:
        return cfg.lr * max(0.0, (total - step) / decay)
    return cfg.lr


def k_at(step: int, total: int, cfg: ModelConfig) -> int:
    """Graduated sparsity: k falls linearly from `first_k` to `k` over the first
    `k_anneal_fraction` of training, then stays at k (so all later metrics are at the final k)."""
    start = cfg.first_k
    if not isinstance(cfg, TopKConfig) or start == cfg.k:
        return cfg.k
    span = max(1, int(cfg.k_anneal_fraction * total))
    if start == cfg.k or step >= span:
        return cfg.k
    return round(start + (cfg.k - start) * step / span)


def m_at(step: int, total: int, cfg: ModelConfig) -> int | None:
    """Composition curriculum: `curriculum_m[j]` partners per latent once training has passed
    `curriculum_at[j-1]`; None (all k) when the curriculum is off or the model has no partners."""
    if not isinstance(cfg, CompSAEConfig):
        return None
    if not cfg.curriculum:
        return cfg.final_m
    frac = step / max(1, total)
    return cfg.curriculum_m[bisect.bisect_right(cfg.curriculum_at, frac)]


def l1_scale_at(step: int, total: int, cfg: ModelConfig) -> float:
    """Factor on the L1 coefficient: 0 → 1 linearly over the first `l1_warmup_fraction` (ReLU)."""
    if not isinstance(cfg, ReLUConfig):
        return 1.0
    warm = int(cfg.l1_warmup_fraction * total)
    return 1.0 if warm == 0 else min(1.0, (step + 1) / warm)


def pair_scale_at(step: int, total: int, cfg: ModelConfig) -> float:
    """Factor on the pair penalty: 0 → 1 linearly over the first `pair_l1_warmup_fraction`."""
    if not isinstance(cfg, CompSAEConfig):
        return 1.0
    warm = int(cfg.pair_l1_warmup_fraction * total)
    return 1.0 if warm == 0 else min(1.0, (step + 1) / warm)


def pair_group_scale_at(step: int, total: int, cfg: ModelConfig) -> float:
    """Factor on the pair embeddings' group lasso: 0 → 1 linearly over `pair_group_warmup_fraction`
    of training counted from the step the pair term joins.  It must not act on a path that has not
    grown yet: with all rows of E near zero no latent's pairs pay for its row, and it would stay
    0."""
    if not isinstance(cfg, CompSAEConfig):
        return 1.0
    start, warm = int(cfg.pair_start_fraction * total), int(cfg.pair_group_warmup_fraction * total)
    return 1.0 if warm == 0 else min(1.0, max(0.0, (step + 1 - start) / warm))


def pair_on_at(step: int, total: int, cfg: ModelConfig) -> bool:
    """Whether the pair term is part of the reconstruction at `step` (after
    `pair_start_fraction`)."""
    return step >= int(cfg.pair_start_fraction * total)
