"""Human-evaluation kit: blinded feature cards out (``export``), ratings in (``score``).

``export`` samples ``n`` alive latents per method (stratified by density), builds one card each,
gives every card a random id, shuffles the order separately for every rater and writes

    <out>/cards.jsonl          one blinded card per line (what the pages show; no method, no
    answers) <out>/rater_<r>.html       one static page per rater, its own order; a button downloads
    the CSV <out>/ratings_template.csv the CSV header
    (rater,card_id,interpretable,confidence,detection,description) <out>/answer_key.json      card
    id -> method, latent, density, stratum, detection truth  (keep away
                               from raters)

``score`` joins the ratings with the key and reports, per method, the interpretable rate and the
detection F1 with bootstrap 95 % intervals (resampling features), pairwise differences, and
Krippendorff's alpha.  What n = 50 can detect is in docs/evaluation.md.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from itertools import combinations

import fsspec
import numpy as np
from tqdm.auto import tqdm

from compsae import durable
from compsae.errors import UserError
from compsae.evaluation.human_study.agreement import krippendorff_alpha
from compsae.evaluation.human_study.card_html import RATING_COLUMNS, render_page
from compsae.evaluation.human_study.cards import (
    Card,
    CardConfig,
    Corpus,
    FeatureSource,
    build_card,
    stratified_sample,
)
from compsae.files import GROUND_TRUTH_JSON
from compsae.lm.token_text import token_display

KEY_FORMAT = "compsae-humaneval-key/1"


def _card_record(card: Card, card_id: str) -> dict:
    """The blinded JSONL record of a card (everything a rater may see)."""
    return {
        "card_id": card_id,
        "density": card.density,
        "top": [c.as_dict() for c in card.top],
        "quantiles": [[label, [c.as_dict() for c in ctxs]] for label, ctxs in card.quantiles],
        "negatives": [c.as_dict() for c in card.negatives],
        "detection": [c.as_dict() for c in card.detection],
        "partners": card.partners,
    }


KEY_FILE = "answer_key.json"


def refuse_existing_kit(out_dir: str) -> None:
    """Refuse to export into a folder that holds an answer key already: replacing it would make the
    ratings collected against it unscorable."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    if fs.exists(f"{root}/{KEY_FILE}"):
        raise UserError(
            f"{out_dir} already holds a kit ({KEY_FILE}); ratings collected against it would "
            "become "
            "unscorable: pass another --out, or move that kit away first"
        )


def export(
    methods: dict[str, FeatureSource],
    corpus: Corpus,
    out_dir: str,
    n: int = 50,
    n_raters: int = 3,
    n_strata: int = 5,
    seed: int = 0,
    card_cfg: CardConfig | None = None,
) -> dict:
    """Write the blinded kit for ``n`` latents of every method to ``out_dir``; returns a summary.

    ``methods``: method name -> its latent activations over ``corpus`` rows (and CompSAE partners).
    Latents are drawn at random among those firing at least ``card_cfg.min_fires`` times, spread
    over ``n_strata`` log-density bins.  Deterministic by ``seed``.
    """
    if n_raters < 1 or n < 1:
        raise UserError("humaneval export needs --n >= 1 and --raters >= 1")
    refuse_existing_kit(out_dir)
    card_cfg = card_cfg or CardConfig()
    rng = np.random.default_rng(seed)
    cards: list[tuple[Card, int]] = []
    for method in sorted(methods):
        source = methods[method]
        if source.acts.shape[0] != corpus.n_rows:
            raise UserError(
                f"{method}: activations have {source.acts.shape[0]} rows, the corpus "
                f"{corpus.n_rows}"
            )
        latents, strata = stratified_sample(
            source.fire_counts(), corpus.n_rows, n, n_strata, card_cfg.min_fires, rng
        )
        for latent, stratum in tqdm(
            list(zip(latents, strata, strict=True)), desc=f"cards {method}", unit="card"
        ):
            cards.append(
                (build_card(method, int(latent), corpus, source, card_cfg, rng), int(stratum))
            )

    # Random ids, independent of method and of the order cards were built in
    ids = [f"C{i:04d}" for i in rng.permutation(len(cards))]
    records = [_card_record(card, cid) for (card, _), cid in zip(cards, ids, strict=True)]
    by_id = {r["card_id"]: r for r in records}
    key = {
        "format": KEY_FORMAT,
        "seed": seed,
        "n_per_method": n,
        "n_raters": n_raters,
        "methods": sorted(methods),
        "cards": {
            cid: {
                "method": card.method,
                "latent": card.latent,
                "density": card.density,
                "stratum": stratum,
                "detection_truth": card.detection_truth,
            }
            for (card, stratum), cid in zip(cards, ids, strict=True)
        },
    }
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/cards.jsonl", "w") as f:
        for cid in sorted(by_id):
            f.write(json.dumps(by_id[cid]) + "\n")
    pages = []
    for r in range(n_raters):
        order = sorted(by_id)
        order = [order[i] for i in np.random.default_rng([seed, r + 1]).permutation(len(order))]
        path = f"{root}/rater_{r + 1}.html"
        with fs.open(path, "w") as f:
            f.write(
                render_page(
                    [by_id[c] for c in order], title=f"Feature rating — rater sheet {r + 1}"
                )
            )
        pages.append(path)
    with fs.open(f"{root}/ratings_template.csv", "w") as f:
        f.write(",".join(RATING_COLUMNS) + "\n")
    # last, and never over an earlier key (refused above): the kit is complete once its key exists
    durable.atomic_write(f"{root}/{KEY_FILE}", json.dumps(key, indent=1).encode(), fs=fs)
    return {
        "out_dir": out_dir,
        "n_cards": len(records),
        "pages": pages,
        "key": f"{root}/answer_key.json",
    }


# ---------------------------------------------------------------------------------------------
# scoring


@dataclass
class Rating:
    rater: str
    card_id: str
    interpretable: int | None  # 1 yes, 0 no, None unanswered
    confidence: int | None  # 1..5
    detection: set[int]  # 1-based indices of detection contexts marked as firing


def _parse_bool(v: str, where: str) -> int | None:
    v = v.strip().lower()
    if v == "":
        return None
    if v in ("1", "yes", "y", "true"):
        return 1
    if v in ("0", "no", "n", "false"):
        return 0
    raise UserError(f"{where}: interpretable must be 1/0 (yes/no), got {v!r}")


def read_ratings(paths: list[str] | str) -> list[Rating]:
    """Read one or more rating CSVs (columns: rater, card_id, interpretable[, confidence,
    detection])."""
    paths = [paths] if isinstance(paths, str | os.PathLike) else paths
    out: list[Rating] = []
    for path in paths:
        try:
            out += _read_rating_file(path)
        except FileNotFoundError:
            raise UserError(f"ratings file {path} not found; check the path") from None
        except (UnicodeDecodeError, csv.Error) as e:
            raise UserError(
                f"{path} is not a ratings CSV ({e.__class__.__name__}); start from "
                "ratings_template.csv"
            ) from None
        except IsADirectoryError:
            raise UserError(f"{path} is a folder, not a ratings CSV") from None
    return out


def _read_rating_file(path: str) -> list[Rating]:
    out: list[Rating] = []
    with fsspec.open(path, "r", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"rater", "card_id", "interpretable"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(
                f"{path}: missing column(s) {sorted(missing)}; start from ratings_template.csv"
            )
        for i, row in enumerate(reader, start=2):
            where = f"{path} line {i}"
            conf = (row.get("confidence") or "").strip()
            det = (row.get("detection") or "").strip()
            try:
                marks = {int(x) for x in det.replace(",", ";").split(";") if x.strip()}
                confidence = int(conf) if conf else None
            except ValueError:
                raise UserError(
                    f"{where}: detection must be ';'-separated numbers, confidence 1-5"
                ) from None
            out.append(
                Rating(
                    rater=(row.get("rater") or "").strip(),
                    card_id=(row.get("card_id") or "").strip(),
                    interpretable=_parse_bool(row.get("interpretable") or "", where),
                    confidence=confidence,
                    detection=marks,
                )
            )
    return out


def detection_f1(marked: set[int], truth: list[bool]) -> float:
    """F1 of the marked (1-based) context indices against the truth; 1.0 when both are empty."""
    positives = {i + 1 for i, t in enumerate(truth) if t}
    tp = len(marked & positives)
    if not marked and not positives:
        return 1.0
    if tp == 0:
        return 0.0
    precision, recall = tp / len(marked), tp / len(positives)
    return 2 * precision * recall / (precision + recall)


def bootstrap_ci(
    values: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per feature)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def bootstrap_diff_ci(
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) − mean(b), resampling each arm independently."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    da = a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1)
    db = b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(axis=1)
    return float(np.quantile(da - db, alpha / 2)), float(np.quantile(da - db, 1 - alpha / 2))


def load_key(path: str) -> dict:
    """Read an answer key written by :func:`export`."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            key = json.load(f)
    except FileNotFoundError:
        raise UserError(
            f"answer key {path} not found; give the answer_key.json that `humaneval export` wrote"
        ) from None
    except (UnicodeDecodeError, ValueError, IsADirectoryError):
        raise UserError(f"{path} is not a humaneval answer key (not JSON)") from None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise UserError(
            f"{path} is not a humaneval answer key (format "
            f"{key.get('format') if isinstance(key, dict) else None!r})"
        )
    return key


def score(ratings: list[str] | str, key: str | dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """Score rating CSV(s) against the answer key.

    Per method: ``interpretable_rate`` (mean over features of the share of raters saying yes) and
    ``detection_f1`` (mean over features of the raters' mean F1), each with a bootstrap 95 % CI over
    features; pairwise differences with CIs; Krippendorff's alpha (nominal on "interpretable",
    ordinal on "confidence", nominal on every detection mark).  Unknown card ids are an error.
    """
    key = load_key(key) if isinstance(key, str) else key
    cards = key["cards"]
    rows = read_ratings(ratings)
    unknown = sorted({r.card_id for r in rows} - set(cards))
    if unknown:
        raise UserError(
            f"ratings name card ids not in the key: {unknown[:5]}; is this the right --key?"
        )
    raters = sorted({r.rater for r in rows})
    ids = sorted(cards)
    col = {c: j for j, c in enumerate(ids)}
    interp = np.full((len(raters), len(ids)), np.nan)
    conf = np.full((len(raters), len(ids)), np.nan)
    f1 = np.full((len(raters), len(ids)), np.nan)
    n_det = max((len(c["detection_truth"]) for c in cards.values()), default=0)
    marks = np.full((len(raters), len(ids) * n_det), np.nan)
    for r in rows:
        i, j = raters.index(r.rater), col[r.card_id]
        truth = cards[r.card_id]["detection_truth"]
        if r.interpretable is not None:
            interp[i, j] = r.interpretable
        if r.confidence is not None:
            conf[i, j] = r.confidence
        f1[i, j] = detection_f1(r.detection, truth)
        for t in range(len(truth)):
            marks[i, j * n_det + t] = float(t + 1 in r.detection)

    per_method: dict[str, dict] = {}
    arms: dict[str, dict[str, np.ndarray]] = {}
    with np.errstate(all="ignore"):
        card_interp = np.nanmean(interp, axis=0)  # [n_cards] share of raters saying yes
        card_f1 = np.nanmean(f1, axis=0)
    for m in key["methods"]:
        sel = np.array([cards[c]["method"] == m for c in ids])
        vi = card_interp[sel][~np.isnan(card_interp[sel])]
        vf = card_f1[sel][~np.isnan(card_f1[sel])]
        arms[m] = {"interpretable_rate": vi, "detection_f1": vf}
        per_method[m] = {
            "n_features": int(sel.sum()),
            "n_rated": int(len(vi)),
            "interpretable_rate": float(vi.mean()) if len(vi) else float("nan"),
            "interpretable_rate_ci": bootstrap_ci(vi, n_boot, seed),
            "detection_f1": float(vf.mean()) if len(vf) else float("nan"),
            "detection_f1_ci": bootstrap_ci(vf, n_boot, seed),
        }
    differences = {}
    for a, b in combinations(key["methods"], 2):
        differences[f"{a} - {b}"] = {
            metric: {
                "diff": float(arms[a][metric].mean() - arms[b][metric].mean())
                if len(arms[a][metric]) and len(arms[b][metric])
                else float("nan"),
                "ci": bootstrap_diff_ci(arms[a][metric], arms[b][metric], n_boot, seed),
            }
            for metric in ("interpretable_rate", "detection_f1")
        }
    return {
        "methods": per_method,
        "differences": differences,
        "n_raters": len(raters),
        "n_ratings": len(rows),
        "alpha_interpretable": krippendorff_alpha(interp, "nominal"),
        "alpha_confidence": krippendorff_alpha(conf, "ordinal"),
        "alpha_detection": krippendorff_alpha(marks, "nominal"),
    }


def score_table(result: dict) -> str:
    """Markdown table of a :func:`score` result."""
    lines = [
        "| method | features | interpretable rate (95% CI) | detection F1 (95% CI) |",
        "|---|---|---|---|",
    ]
    for m, r in result["methods"].items():
        lo, hi = r["interpretable_rate_ci"]
        flo, fhi = r["detection_f1_ci"]
        lines.append(
            f"| {m} | {r['n_rated']}/{r['n_features']} | {r['interpretable_rate']:.2f} "
            f"({lo:.2f}–{hi:.2f}) | {r['detection_f1']:.2f} ({flo:.2f}–{fhi:.2f}) |"
        )
    lines.append("")
    lines.append(
        f"Krippendorff's alpha: interpretable {result['alpha_interpretable']:.2f}, "
        f"confidence (ordinal) {result['alpha_confidence']:.2f}, "
        f"detection marks {result['alpha_detection']:.2f}; {result['n_raters']} raters."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# inputs from a store and checkpoints (what the CLI calls)


def corpus_from_store(store_url: str, rows: np.ndarray, vocab: list[str] | None = None) -> Corpus:
    """The store rows ``rows`` (whole sequences, in store order) as a :class:`Corpus`.

    Token text: ``vocab`` if given; else the ground-truth vocabulary of a synthetic store; else the
    tokenizer of the harvested model (offline models only); else ``<id>`` placeholders.
    """
    from compsae.store import ActivationStore

    store = ActivationStore.open(store_url)
    if vocab is None:
        vocab = _store_vocab(store_url, store.manifest)
    tokens, seq_id, pos = (store.column_view(c)[rows] for c in ("tokens", "seq_id", "pos"))
    return Corpus(tokens=tokens, seq_id=seq_id, pos=pos, vocab=vocab)


def heldout_rows(checkpoints: dict[str, str], store_url: str, n_rows: int) -> np.ndarray:
    """The first ``n_rows`` held-out rows ``[n]`` of the split the checkpoints were trained with:
    cards show contexts no method trained on."""
    from compsae.store import ActivationStore
    from compsae.store.split import shared_split
    from compsae.train.checkpoint import parse_meta, read_meta

    splits = {}
    for method, folder in checkpoints.items():
        meta = read_meta(folder)
        if meta is None:
            raise UserError(f"no checkpoint in {folder} (method {method}); train it first")
        splits[method] = parse_meta(meta, folder).split
    split, other = shared_split(splits)
    if other:
        raise UserError(
            f"{', '.join(other)} were trained with another held-out split than the other "
            "checkpoints; "
            "export them separately"
        )
    store = ActivationStore.open(store_url)
    rows = np.flatnonzero(split.store_mask(store))[:n_rows]
    if rows.size == 0:
        raise UserError(
            f"the store at {store_url} has no held-out rows for these checkpoints "
            "(heldout_fraction 0?)"
        )
    return rows


def _store_vocab(store_url: str, manifest: dict) -> list[str]:
    try:
        with fsspec.open(f"{store_url.rstrip('/')}/{GROUND_TRUTH_JSON}", "r") as f:
            return json.load(f)["vocab"]
    except FileNotFoundError:
        pass
    try:
        from compsae.harvest.config import HarvestConfig
        from compsae.lm.models import load_model

        tok = load_model(HarvestConfig(model=manifest["model"]["name"], device="cpu")).tokenizer
        show = token_display(tok)
        return [show(i) for i in range(len(tok))]
    except Exception:  # noqa: BLE001 - a missing tokenizer only costs readable token text
        return []


def feature_source_from_checkpoint(
    store_url: str,
    checkpoint: str,
    rows: np.ndarray,
    batch_size: int = 1024,
    device: str = "cpu",
    n_partners: int = 5,
    trust_unverified: bool = False,
) -> FeatureSource:
    """Encode the store rows ``rows`` with a checkpoint; CompSAE also gets partners (latents it
    attends to most, from :class:`compsae.evaluation.comparison.table.CompositionAccumulator`).
    A checkpoint without any content digest is refused unless ``trust_unverified``."""
    import scipy.sparse as sp
    import torch

    from compsae.evaluation.comparison.table import CompositionAccumulator, iter_batches
    from compsae.store import ActivationStore
    from compsae.train.trained import TrainedSAE

    sae = TrainedSAE.load(checkpoint, device, trust_unverified=trust_unverified)
    store = ActivationStore.open(store_url)
    hook = sae.hook or store.hooks[0]
    acc = CompositionAccumulator(sae.n_latents) if sae.has_composition else None
    parts = []
    with torch.no_grad():
        for batch in tqdm(
            iter_batches(store, hook, rows, batch_size),
            total=-(-len(rows) // batch_size),
            desc=f"encode {checkpoint}",
            unit="batch",
        ):
            out = sae.forward(batch)
            parts.append(sp.csr_matrix(out.z.float().cpu().numpy()))
            if acc is not None and out.attn is not None and out.active_idx is not None:
                acc.update(out.attn, out.active_idx)
    partners = None
    if acc is not None:
        S = acc.matrix()
        S = np.maximum(S, S.T)
        top = np.argsort(-S, axis=1)[:, :n_partners]
        partners = {
            i: [(int(j), float(S[i, j])) for j in top[i] if S[i, j] > 0] for i in range(S.shape[0])
        }
    return FeatureSource(sp.vstack(parts, format="csr"), partners=partners)


def export_from_checkpoints(
    checkpoints: dict[str, str],
    store_url: str,
    out_dir: str,
    n: int = 50,
    n_rows: int = 200_000,
    n_raters: int = 3,
    seed: int = 0,
    device: str = "cpu",
    trust_unverified: bool = False,
) -> dict:
    """``compsae humaneval export``: method name -> checkpoint folder, all encoded on the same
    ``n_rows`` held-out store rows (of the split the checkpoints were trained with); see
    :func:`feature_source_from_checkpoint` for ``trust_unverified``."""
    refuse_existing_kit(out_dir)  # before the minutes of encoding, not after
    rows = heldout_rows(checkpoints, store_url, n_rows)
    corpus = corpus_from_store(store_url, rows)
    methods = {
        m: feature_source_from_checkpoint(
            store_url, c, rows, device=device, trust_unverified=trust_unverified
        )
        for m, c in checkpoints.items()
    }
    return export(methods, corpus, out_dir, n=n, n_raters=n_raters, seed=seed)
