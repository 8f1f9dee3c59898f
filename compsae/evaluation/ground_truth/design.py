"""Synthetic activations with known features and known compositions.

``x = Σ_i a_i v_i + Σ_{c∈C} b_c u_c·[all constituents of c fire] + noise``   (interaction
"direction") ``x = Σ_i a_i v_i + Σ_{i<j firing, both composing} a_i a_j B(v_i, v_j) + noise``
(interaction "bilinear")

Base features ``v_i`` fire with Zipf-like probabilities; an interaction ``c`` (a pair, triple or
quadruple of base features) adds its own direction ``u_c`` only on tokens where every constituent
fires.  In the bilinear design the interaction of two composing features is a shared low-rank
bilinear function ``B(v, w) = ((A v) ⊙ (A w)) W_B`` of their directions, scaled by both magnitudes;
labelled interacting pairs and their co-firing-only twins (non-composing, same firing rates) are the
positives and negatives of the pair scores.  The additive-only control uses the same seed, the same
dictionary and the same firing (interaction groups still co-fire), but no interaction term, so the
two datasets differ only in whether composition exists.

Everything is deterministic by ``cfg.seed``; rows are drawn in fixed blocks of ``BLOCK_ROWS`` from
``numpy.random.default_rng([seed, 1, block])``, so any row range can be regenerated on its own and
the result does not depend on the store's shard size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from compsae import durable
from compsae.errors import UserError
from compsae.evaluation.ground_truth.config import GroundTruthConfig
from compsae.files import GROUND_TRUTH_JSON, GROUND_TRUTH_TENSORS
from compsae.store import ActivationStore, StoreLayout

BLOCK_ROWS = 4096
GT_FORMAT = "compsae-ground-truth/1"
GT_JSON = GROUND_TRUTH_JSON
GT_TENSORS = GROUND_TRUTH_TENSORS
MAX_ORDER = 4  # widest interaction stored (members padded with -1 up to this width)


@dataclass
class GroundTruthDictionary:
    """The fixed parts of the generator: directions, firing probabilities, interaction groups."""

    V: np.ndarray  # [n_features, d] unit base directions
    U: np.ndarray  # [n_groups, d] unit interaction directions (unused if not interacting)
    b: np.ndarray  # [n_groups] interaction magnitudes
    probs: np.ndarray  # [n_features] independent firing probabilities
    groups: list[tuple[int, ...]]  # constituents of each group, sorted feature ids
    interacting: bool  # False for the additive-only control
    kind: str = "direction"  # "direction" | "bilinear"
    composing: np.ndarray | None = None  # bilinear: [n_features] bool
    A: np.ndarray | None = None  # bilinear: [rank, d]
    W_B: np.ndarray | None = None  # bilinear: [rank, d]
    n_pairs: int = 0  # bilinear: groups[:n_pairs] interact, groups[n_pairs:] are twins

    @property
    def C(self) -> list[tuple[int, ...]]:
        """The labelled interactions that exist in the data (empty for the additive-only
        control)."""
        if not self.interacting:
            return []
        return list(self.groups[: self.n_pairs]) if self.kind == "bilinear" else list(self.groups)

    @property
    def twins(self) -> list[tuple[int, ...]]:
        """Bilinear design: the co-firing-only pairs (same firing as the interacting pairs, no
        term)."""
        return list(self.groups[self.n_pairs :]) if self.kind == "bilinear" else []

    def would_interact(self, i: int, j: int) -> bool:
        """Bilinear design: whether features i and j add a term when they fire together (ignores the
        additive control's switch, so the control is scored against what *would* interact)."""
        return bool(
            self.composing is not None and self.composing[i] and self.composing[j] and i != j
        )

    def bilinear(self, a: np.ndarray) -> np.ndarray:
        """Σ_{i<j} a_i a_j B(v_i, v_j) over composing features for magnitudes `a: [rows,
        n_features]` -> `[rows, d]`, through the O(n·r) identity Σ_{i<j} p_i ⊙ p_j = ((Σ p)² − Σ p²)
        / 2."""
        assert self.A is not None and self.W_B is not None and self.composing is not None
        proj = self.V[self.composing] @ self.A.T  # [n_composing, r]: A v_i
        ac = a[:, self.composing]  # [rows, n_composing]
        p = ac @ proj
        q = (ac * ac) @ (proj * proj)
        return (((p * p - q) / 2) @ self.W_B).astype(np.float32)

    @property
    def membership(self) -> np.ndarray:
        """[n_groups, n_features] bool, True where the feature belongs to the group."""
        m = np.zeros((len(self.groups), self.V.shape[0]), dtype=bool)
        for g, members in enumerate(self.groups):
            m[g, list(members)] = True
        return m


@dataclass
class GroundTruth:
    """Generated rows plus the dictionary that made them."""

    dictionary: GroundTruthDictionary
    x: np.ndarray | None  # [n_rows, d] float32 (None when loaded from disk)
    acts: sp.csr_matrix  # [n_rows, n_features] base-feature magnitudes a_i
    interaction_active: np.ndarray | None = None  # [n_rows, n_groups] bool, all constituents fired
    config: dict = field(default_factory=dict)

    @property
    def V(self) -> np.ndarray:
        return self.dictionary.V

    @property
    def U(self) -> np.ndarray:
        return self.dictionary.U

    @property
    def C(self) -> list[tuple[int, ...]]:
        return self.dictionary.C


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def zipf_probs(n_features: int, exponent: float, mean_active: float, max_prob: float) -> np.ndarray:
    """Firing probabilities ``p_i ∝ (i+1)^-exponent`` scaled to sum to ``mean_active``, capped."""
    p = (np.arange(1, n_features + 1, dtype=np.float64)) ** (-exponent)
    return np.minimum(p * (mean_active / p.sum()), max_prob)


def sample_dictionary(cfg: GroundTruthConfig) -> GroundTruthDictionary:
    """Draw V, U, b, the firing probabilities and the interaction groups from ``cfg.seed``."""
    rng = np.random.default_rng([cfg.seed, 0])
    V = _unit_rows(rng.standard_normal((cfg.n_features, cfg.d_model)))
    if cfg.interaction == "bilinear":
        return _sample_bilinear(cfg, V, rng)
    groups: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    for order in sorted(cfg.n_interactions):
        if order > MAX_ORDER:
            raise UserError(f"interaction order {order} > {MAX_ORDER}: use orders 2..{MAX_ORDER}")
        if order > cfg.n_features:
            raise UserError(f"interaction order {order} exceeds n_features={cfg.n_features}")
        for _ in range(cfg.n_interactions[order]):
            for _attempt in range(1000):
                members = tuple(
                    sorted(int(i) for i in rng.choice(cfg.n_features, order, replace=False))
                )
                if members not in seen:
                    break
            else:
                raise UserError(
                    f"cannot draw {cfg.n_interactions[order]} distinct order-{order} groups "
                    f"from {cfg.n_features} features: lower n_interactions"
                )
            seen.add(members)
            groups.append(members)
    U = (
        _unit_rows(rng.standard_normal((len(groups), cfg.d_model)))
        if groups
        else np.zeros((0, cfg.d_model))
    )
    b = rng.uniform(*cfg.interaction_scale, size=len(groups))
    probs = zipf_probs(cfg.n_features, cfg.zipf_exponent, cfg.mean_active, cfg.max_prob)
    return GroundTruthDictionary(
        V=V.astype(np.float32),
        U=U.astype(np.float32),
        b=b.astype(np.float32),
        probs=probs,
        groups=groups,
        interacting=not cfg.additive_only,
    )


def _sample_bilinear(
    cfg: GroundTruthConfig, V: np.ndarray, rng: np.random.Generator
) -> GroundTruthDictionary:
    """The bilinear design: composing half, labelled pairs and twins, the shared map B."""
    probs = zipf_probs(
        cfg.n_features, cfg.zipf_exponent, cfg.mean_active, cfg.max_prob
    )  # decreasing
    # features 2t and 2t+1 fire at nearly the same rate; in a random set of these slots one of the
    # two (at random) composes and the other does not
    n_two = cfg.n_features // 2
    slots = rng.permutation(n_two)[: round(cfg.composing_fraction * cfg.n_features)]
    first = rng.random(len(slots)) < 0.5
    comp_ids = np.where(first, 2 * slots, 2 * slots + 1)
    other_ids = np.where(first, 2 * slots + 1, 2 * slots)
    composing = np.zeros(cfg.n_features, dtype=bool)
    composing[comp_ids] = True
    # labelled pair t: composing (c[s], c[s']) and its twin (o[s], o[s']) from the same slots
    chosen = rng.permutation(len(slots))[: 2 * cfg.n_pairs].reshape(cfg.n_pairs, 2)
    pairs = [tuple(sorted((int(comp_ids[s]), int(comp_ids[t])))) for s, t in chosen]
    twins = [tuple(sorted((int(other_ids[s]), int(other_ids[t])))) for s, t in chosen]
    A = rng.standard_normal((cfg.bilinear_rank, cfg.d_model)) / np.sqrt(cfg.d_model)
    W_B = rng.standard_normal((cfg.bilinear_rank, cfg.d_model))
    # scale W_B so that the mean ‖B(v_i, v_j)‖ over composing pairs is interaction_norm
    proj = V[composing] @ A.T
    iu, ju = np.triu_indices(len(proj), k=1)
    mean_norm = np.linalg.norm((proj[iu] * proj[ju]) @ W_B, axis=1).mean()
    W_B *= cfg.interaction_norm / max(mean_norm, 1e-12)
    return GroundTruthDictionary(
        V=V.astype(np.float32),
        U=np.zeros((0, cfg.d_model), np.float32),
        b=np.zeros(0, np.float32),
        probs=probs,
        groups=pairs + twins,
        interacting=not cfg.additive_only,
        kind="bilinear",
        composing=composing,
        A=A.astype(np.float32),
        W_B=W_B.astype(np.float32),
        n_pairs=cfg.n_pairs,
    )


def _sample_block(
    cfg: GroundTruthConfig,
    d: GroundTruthDictionary,
    block: int,
    membership: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block of BLOCK_ROWS rows: (x [r, d], a [r, n_features], interaction_active [r,
    n_groups])."""
    rng = np.random.default_rng([cfg.seed, 1, block])
    rows = BLOCK_ROWS
    fire = rng.random((rows, cfg.n_features)) < d.probs  # [r, n_features]
    event = rng.random((rows, len(d.groups))) < cfg.group_prob  # [r, n_groups]
    if len(d.groups):
        fire |= (event.astype(np.int32) @ membership.astype(np.int32)) > 0
    a = np.where(fire, rng.uniform(*cfg.magnitude, size=fire.shape), 0.0).astype(np.float32)
    noise = rng.standard_normal((rows, cfg.d_model)).astype(np.float32) * cfg.noise_std
    x = a @ d.V + noise
    order = membership.sum(axis=1)  # [n_groups]
    active = (fire.astype(np.int32) @ membership.T.astype(np.int32)) == order  # [r, n_groups]
    if d.interacting and d.kind == "bilinear":
        x += d.bilinear(a)
    elif d.interacting and len(d.groups):
        x += (active * d.b).astype(np.float32) @ d.U
    return x.astype(np.float32), a, active


def iter_rows(
    cfg: GroundTruthConfig,
    d: GroundTruthDictionary,
    start: int,
    stop: int,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(row_offset, x, a, interaction_active)`` pieces that together cover rows [start,
    stop)."""
    membership = d.membership
    for block in range(start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS + 1):
        x, a, active = _sample_block(cfg, d, block, membership)
        lo = max(start, block * BLOCK_ROWS) - block * BLOCK_ROWS
        hi = min(stop, (block + 1) * BLOCK_ROWS) - block * BLOCK_ROWS
        yield block * BLOCK_ROWS + lo, x[lo:hi], a[lo:hi], active[lo:hi]


def generate(cfg: GroundTruthConfig, n_rows: int | None = None) -> GroundTruth:
    """Generate ``n_rows`` (default ``cfg.n_rows``) rows in memory, with the full ground truth."""
    n = cfg.n_rows if n_rows is None else n_rows
    d = sample_dictionary(cfg)
    xs, As, actives = [], [], []
    for _, x, a, active in iter_rows(cfg, d, 0, n):
        xs.append(x)
        As.append(sp.csr_matrix(a))
        actives.append(active)
    return GroundTruth(
        dictionary=d,
        x=np.concatenate(xs),
        acts=sp.vstack(As, format="csr"),
        interaction_active=np.concatenate(actives),
        config=cfg.model_dump(mode="json"),
    )


def token_ids(a: np.ndarray) -> np.ndarray:
    """A readable stand-in for token ids: the strongest firing base feature, ``n_features`` if
    none."""
    tok = a.argmax(axis=1).astype(np.int32)
    tok[a.max(axis=1) <= 0] = a.shape[1]
    return tok


def vocab(n_features: int) -> list[str]:
    """Token text for the synthetic token ids of :func:`token_ids`."""
    return [f"f{i}" for i in range(n_features)] + ["<none>"]


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def save_ground_truth(
    url: str, d: GroundTruthDictionary, acts: sp.csr_matrix, cfg: GroundTruthConfig
) -> None:
    """Write ``ground_truth.safetensors`` + ``ground_truth.json`` inside the store folder
    ``url``."""
    members = np.full((len(d.groups), MAX_ORDER), -1, dtype=np.int64)
    for g, m in enumerate(d.groups):
        members[g, : len(m)] = m
    acts = acts.tocsr()
    tensors = {
        "V": d.V,
        "U": d.U,
        "b": d.b,
        "probs": d.probs,
        "group_members": members,
        "acts_indptr": acts.indptr.astype(np.int64),
        "acts_indices": acts.indices.astype(np.int64),
        "acts_data": acts.data.astype(np.float32),
    }
    if d.kind == "bilinear":
        tensors.update(A=d.A, W_B=d.W_B, composing=d.composing.astype(np.int8))
    meta = {
        "format": GT_FORMAT,
        "config": cfg.model_dump(mode="json"),
        "hook": cfg.hook,
        "interacting": d.interacting,
        "groups": [list(g) for g in d.groups],
        "C": [list(c) for c in d.C],
        "n_rows": int(acts.shape[0]),
        "vocab": vocab(cfg.n_features),
        "kind": d.kind,
        "n_pairs": d.n_pairs,
        "twins": [list(t) for t in d.twins],
    }
    with fsspec.open(_join(url, GT_TENSORS), "wb") as f:
        f.write(st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))
    with fsspec.open(_join(url, GT_JSON), "w") as f:
        json.dump(meta, f, indent=1)


def load_ground_truth(url: str) -> GroundTruth:
    """Read the ground truth saved beside a synthetic store (``x`` is left as None: read the
    store)."""
    try:
        with fsspec.open(_join(url, GT_JSON), "r") as f:
            meta = json.load(f)
        with fsspec.open(_join(url, GT_TENSORS), "rb") as f:
            t = st_load(f.read())
    except FileNotFoundError as e:
        raise UserError(
            f"no ground truth at {url}: write it with write_ground_truth_store(cfg, url)"
        ) from e
    if meta.get("format") != GT_FORMAT:
        raise UserError(
            f"{url}/{GT_JSON} has format {meta.get('format')!r}, expected {GT_FORMAT!r}"
        )
    groups = [tuple(int(i) for i in row if i >= 0) for row in t["group_members"]]
    bilinear = meta.get("kind") == "bilinear"
    d = GroundTruthDictionary(
        V=t["V"],
        U=t["U"],
        b=t["b"],
        probs=t["probs"],
        groups=groups,
        interacting=bool(meta["interacting"]),
        kind=meta.get("kind", "direction"),
        composing=t["composing"].astype(bool) if bilinear else None,
        A=t.get("A"),
        W_B=t.get("W_B"),
        n_pairs=int(meta.get("n_pairs", 0)),
    )
    n_rows, n_f = int(meta["n_rows"]), t["V"].shape[0]
    acts = sp.csr_matrix((t["acts_data"], t["acts_indices"], t["acts_indptr"]), shape=(n_rows, n_f))
    return GroundTruth(dictionary=d, x=None, acts=acts, config=meta["config"])


def write_ground_truth_store(
    cfg: GroundTruthConfig, url: str, layout: StoreLayout | None = None, overwrite: bool = False
) -> dict:
    """Write the synthetic rows as a regular activation store at ``url`` plus the ground truth
    beside it.

        The store has one hook (``cfg.hook``, width ``cfg.d_model``); ``tokens`` holds the strongest
        firing base feature (text in ``ground_truth.json["vocab"]``), ``seq_id``/``pos`` cut the
        rows into sequences of ``cfg.context``.  Already-finished shards are skipped, so an
        interrupted write resumes.  Returns a summary dict (url, rows, number of interactions, mean
        L0).
    """
    layout = layout if layout is not None else StoreLayout(dtype="float32")
    d = sample_dictionary(cfg)
    manifest = {
        "model": {
            "name": "synthetic-ground-truth",
            "revision": None,
            "source": "synthetic",
            "processing": {"generator": "compsae.evaluation.ground_truth.design"},
        },
        "data": {
            "source": "compsae.evaluation.ground_truth.design",
            "split": "synthetic",
            "seed": cfg.seed,
            "n_docs": -(-cfg.n_rows // cfg.context),
        },
        "context": cfg.context,
        "prepend_bos": False,
        "bos_rule": "none (synthetic rows)",
        "synthetic": cfg.model_dump(mode="json"),
    }
    # The config hash lets an interrupted write resume and refuses to mix two different configs.
    # 12 digits, not 16: the ground-truth stores already written carry a 12-digit hash.
    manifest["config_hash"] = durable.json_digest(manifest["synthetic"], durable.NAME_DIGITS)
    store = ActivationStore.create_or_resume(
        url,
        hooks={cfg.hook: cfg.d_model},
        n_rows=cfg.n_rows,
        layout=layout,
        manifest=manifest,
        force=overwrite,
    )
    with store.lock("ground-truth"):
        acts = _write_rows(store, cfg, d)
    save_ground_truth(url, d, acts, cfg)
    return {
        "url": url,
        "n_rows": cfg.n_rows,
        "hook": cfg.hook,
        "n_interactions": len(d.C),
        "n_groups": len(d.groups),
        "mean_l0": float(acts.getnnz() / cfg.n_rows),
    }


def _write_rows(
    store: ActivationStore, cfg: GroundTruthConfig, d: GroundTruthDictionary
) -> sp.csr_matrix:
    """Fill every unfinished shard, finalize, and return the base activations of all rows (CSR)."""
    from tqdm.auto import tqdm

    done = store.done_shards()
    acts_parts: list[sp.csr_matrix] = []
    n_shards = -(-cfg.n_rows // store.shard_rows)
    for s in tqdm(range(n_shards), desc="ground-truth store", unit="shard"):
        start, stop = s * store.shard_rows, min(cfg.n_rows, (s + 1) * store.shard_rows)
        xs, As = [], []
        for _, x, a, _active in iter_rows(cfg, d, start, stop):
            xs.append(x)
            As.append(a)
        a = np.concatenate(As)
        acts_parts.append(sp.csr_matrix(a))
        if s in done:
            continue
        rows = np.arange(start, stop)
        store.write_shard(
            s,
            acts={cfg.hook: np.concatenate(xs)},
            tokens=token_ids(a),
            seq_id=(rows // cfg.context).astype(np.int64),
            pos=(rows % cfg.context).astype(np.int32),
        )
    store.finalize(cfg.n_rows)
    return sp.vstack(acts_parts, format="csr")
