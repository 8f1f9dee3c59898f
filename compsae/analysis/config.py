"""Config of the analyze stage: what to evaluate, on how many held-out tokens, and how to schedule
it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BaselineName = Literal["pca", "pca_topk", "nmf"]
StatName = Literal["latents", "pairs", "heads", "gate", "contexts", "baselines", "ce"]


class AnalyzeConfig(BaseModel):
    """`analyze:` of a pipeline.  `workers` / `scheduler` change only speed, never a number."""

    model_config = ConfigDict(extra="forbid")

    hook: str | None = Field(
        None, description="store hook to analyse; default: the hook the models were trained on"
    )
    max_heldout_tokens: int = Field(
        1_000_000, ge=1, description="held-out rows evaluated (first ones, store order)"
    )
    workers: int = Field(
        0, ge=0, description="0 = Dask's threaded scheduler; N = a LocalCluster of N workers"
    )
    scheduler: str | None = Field(
        None, description="address of an existing Dask scheduler, tcp://host:port"
    )
    threads_per_worker: int = Field(1, ge=1, description="threads of each LocalCluster worker")
    progress: bool = Field(True, description="show a progress bar while Dask computes")

    baselines: list[BaselineName] = Field(default_factory=lambda: ["pca", "pca_topk", "nmf"])
    baseline_k: int | None = Field(
        None, ge=1, description="L0 of the sparse baselines; default: the CompSAE's k"
    )
    baseline_fit_tokens: int = Field(
        20_000, ge=16, description="training rows the baselines are fitted on"
    )
    nmf_components: int = Field(
        256, ge=2, description="NMF dictionary size (on the 2d sign-split input)"
    )
    seed: int = 0

    top_k_contexts: int = Field(20, ge=0, description="top-activating contexts kept per latent")
    context_window: int = Field(
        12, ge=0, description="tokens of left context kept with each top context"
    )
    context_after: int = Field(
        4, ge=0, description="tokens after the activating one kept with each top context"
    )
    include_sequence_start: bool = Field(
        False,
        description="count sequence-start rows (position 0, BOS) in the top contexts, pair "
        "examples and composition statistics (off: they are left out; reconstruction numbers "
        "always cover them)",
    )
    pair_latents: int = Field(
        512, ge=2, description="most frequent latents the pair statistics cover"
    )
    pair_fdr: float | None = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="false-discovery rate of the label-free pair calls (null: no calls, and no "
        "null pass)",
    )
    pair_min_support: int = Field(
        5, ge=2, description="co-firing held-out tokens a pair needs to be tested and called"
    )
    partner_threshold: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        description="share of a latent's attention mass that makes j a partner",
    )
    dense_thresholds: list[float] = Field(
        default_factory=lambda: [0.01, 0.10],
        description="firing fractions above which a latent is dense",
    )
    skip: list[StatName] = Field(default_factory=list, description="statistics to leave out")

    plots: bool = Field(True, description="write PNG figures and embed them in report.html")
    n_attention_examples: int = Field(
        3, ge=0, description="token-level attention examples in the report"
    )

    browser: bool = Field(
        True, description="write browser/<model>.html, a feature browser per trained model"
    )
    browser_contexts: int = Field(
        5, ge=1, description="top contexts per latent shown (shaded) in the browser"
    )
    browser_partners: int = Field(
        10, ge=1, description="composition partners listed on each latent's browser page"
    )
    browser_hist_rows: int = Field(
        8192, ge=1, description="held-out rows the browser's activation histograms use"
    )

    ce: bool = Field(
        True, description="CE / KL with x_hat spliced in (needs the LM; skipped when not loadable)"
    )
    ce_sequences: int = Field(32, ge=1, description="held-out sequences for the CE evaluation")
    pair_causal: bool = Field(
        False, description="splice x̂ without the top pairs' terms (and controls) into the LM"
    )
    pair_causal_own_max: int = Field(
        100,
        ge=0,
        description="causal test: sets of at most this many pairs also get one ablation per pair "
        "and a bootstrap over pairs (0: off; each pair costs two LM forwards on its sequences)",
    )
    batch_rows: int = Field(
        1024, ge=1, description="rows per model call inside a block (bounds memory)"
    )

    @field_validator("scheduler")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:
            raise ValueError("scheduler must be an address like tcp://host:8786")
        return v

    @field_validator("dense_thresholds")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not all(0.0 < t < 1.0 for t in v):
            raise ValueError("dense_thresholds are fractions in (0, 1)")
        return sorted(v)
