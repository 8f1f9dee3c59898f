"""Configs of the train stage: one `ModelConfig` per dictionary, shared `TrainConfig` settings.

`TrainStageConfig` is what `pipelines.yaml` holds under `train:`: the hook to read, the training
settings every model shares (flattened, so `--set train.lr=1e-3` works) and `models`, a mapping
name -> `ModelConfig`.  A model may override shared settings with `train: {lr: 1e-3}`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from compsae.store.split import DEFAULT_HELDOUT_FRACTION

ModelType = Literal["compsae", "topk", "relu", "jumprelu"]  # jumprelu: imported SAEs only


class _DictionaryConfig(BaseModel):
    """What every sparse dictionary has: its type, width, sparsity, decoder settings and training
    overrides.  Each kind adds only its own settings (`extra="forbid"`: a TopK config cannot carry a
    composer)."""

    model_config = ConfigDict(extra="forbid")

    n_latents: int = Field(4096, ge=1, description="dictionary size (8 x d_model for Pythia-70m)")
    k: int = Field(32, ge=1, description="active latents per token (top-k models)")
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    unit_norm_decoder: bool = True
    train: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the shared training settings for this model"
    )

    @model_validator(mode="after")
    def _consistent(self) -> _DictionaryConfig:
        if self.k > self.n_latents:
            raise ValueError(f"k ({self.k}) must not exceed n_latents ({self.n_latents})")
        bad = set(self.train) - set(TrainConfig.model_fields)
        if bad:
            raise ValueError(f"unknown training setting(s) {sorted(bad)} in train overrides")
        return self

    @property
    def first_k(self) -> int:
        """k at step 0 (only top-k models anneal it)."""
        return self.k

    def ignored_because(self, field: str) -> str | None:
        """Why setting `field` has no effect on this model, or None when it reads it (every
        kind reads all of its own settings but CompSAE, whose composer picks its settings)."""
        return None

    @property
    def has_curriculum(self) -> bool:
        """Whether training moves a partner count m (CompSAE only)."""
        return False


class TopKConfig(_DictionaryConfig):
    """TopK SAE (Gao et al. 2024): graduated sparsity and AuxK for dead latents."""

    type: Literal["topk"] = "topk"

    # graduated sparsity (topk and compsae)
    graduated_sparsity: bool = Field(True, description="anneal k from k_start down to k")
    k_start: int | None = Field(None, ge=1, description="first k of the anneal; default 4 * k")
    k_anneal_fraction: float = Field(
        0.3, gt=0.0, le=1.0, description="fraction of training the anneal takes"
    )

    # dead latents (topk and compsae): AuxK of Gao et al. (2024)
    aux_k: int = Field(256, ge=0, description="dead latents used by the AuxK loss (0 = off)")
    aux_coef: float = Field(1 / 32, ge=0.0)

    @model_validator(mode="after")
    def _anneal(self) -> TopKConfig:
        if self.k_start is not None and self.k_start < self.k:
            raise ValueError(f"k_start ({self.k_start}) must be >= k ({self.k})")
        return self

    @property
    def first_k(self) -> int:
        """k at step 0 (k_start when graduated sparsity is on)."""
        if not self.graduated_sparsity:
            return self.k
        return min(self.k_start or 4 * self.k, self.n_latents)


# The composition settings each composer reads, in one place: any other composition setting has
# no effect with it (`CompSAEConfig.ignored_fields`, and the warning on a `--set` of one).
_CURRICULUM = frozenset({"curriculum", "curriculum_m", "curriculum_at"})
COMPOSER_SETTINGS: dict[str, frozenset[str]] = {
    # the explicit pair term (pair_composer.py) and its penalties, warm-ups and fit
    "pair": frozenset(
        {
            "pair_rank",
            "pair_diagonal",
            "pair_selection",
            "pair_gate_l1",
            "pair_l1",
            "pair_l1_warmup_fraction",
            "pair_group_l1",
            "pair_group_warmup_fraction",
            "pair_fit",
            "pair_start_fraction",
            *_CURRICULUM,
        }
    ),
    # the pooled network (composer.py): items attend to each other; the curriculum caps partners
    "attention": frozenset({"d_f", "d_c", "n_heads", "ffn_mult", "gate", *_CURRICULUM}),
    # the pooled network without attention: no heads, no partners to cap
    "mlp": frozenset({"d_f", "d_c", "ffn_mult", "gate"}),
    # no composition path: exactly a TopK SAE
    "none": frozenset(),
}
# Of the pair composer's settings, those only one selection reads (the others read none of them).
PAIR_SELECTION_SETTINGS: dict[str, frozenset[str]] = {
    "all": frozenset(),
    "gated": frozenset({"pair_gate_l1"}),
    "top_m": _CURRICULUM,
}
COMPOSITION_SETTINGS = frozenset().union(*COMPOSER_SETTINGS.values())


class CompSAEConfig(TopKConfig):
    """CompSAE: a TopK dictionary plus a composition network over each token's active latents."""

    type: Literal["compsae"] = "compsae"  # type: ignore[assignment]

    composer: Literal["pair", "attention", "mlp", "none"] = Field(
        "pair",
        description="pair: explicit low-rank sum over pairs of active latents; attention / mlp: "
        "pooled composition network (mlp ablates the attention); none gives exactly a TopK SAE",
    )
    d_f: int = Field(
        256, ge=1, description="feature-extractor width: item z_i * E[i] lives in R^d_f"
    )
    d_c: int = Field(
        128, ge=1, description="composition width: the attended items are projected to R^d_c"
    )
    n_heads: int = Field(8, ge=1)
    ffn_mult: int = Field(
        2, ge=1, description="hidden width of the composer's feed-forward, in units of d_f"
    )
    gate: bool = Field(
        True, description="learned per-dimension gate g in [0,1]; off = g fixed to 1"
    )

    # composer "pair": x̂ += Σ_{i<j active} s_ij z_i z_j (E_i ⊙ E_j) W_out
    pair_rank: int = Field(64, ge=1, description="r: width of the pair embedding E [n_latents, r]")
    pair_diagonal: bool = Field(
        False,
        description="PolySAE's quadratic form: also each latent's square z_i² (E_i ⊙ E_i) W_out, "
        "i.e. "
        "½ (zE ⊙ zE) W_out with one shared embedding (pair effects are unchanged: a square has no "
        "mixed difference)",
    )
    pair_selection: Literal["all", "gated", "top_m"] = Field(
        "all",
        description="all: every pair of active latents (s_ij = 1); gated: one learned gate per "
        "pair of latents, s_ij = σ(G_ij) (n² parameters); top_m: each latent's top-m partners by a "
        "learned score (the curriculum moves m)",
    )
    pair_gate_l1: float = Field(
        0.0,
        ge=0.0,
        description="gated selection: L1 on the gates of the co-active pairs (Σ s_ij per token)",
    )
    # Both pair penalties default to off: chosen on the composition grid's validation cells, where
    # they suppressed real pairs (docs/composition_grid.md); calls come from the label-free test.
    pair_l1: float = Field(
        0.0, ge=0.0, description="penalty on an upper bound of Σ_pairs ‖z_i z_j R_ij‖"
    )
    pair_group_l1: float = Field(
        0.0,
        ge=0.0,
        description="group lasso on each latent's pair embedding (rows of E), token-weighted: a "
        "latent "
        "that composes with nothing gets no pair term with any partner",
    )
    pair_group_warmup_fraction: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="the group lasso ramps in over this fraction, counted from when the path joins",
    )
    pair_fit: Literal["joint", "residual"] = Field(
        "joint",
        description="joint: dictionary and pair term trained on one reconstruction; residual: the "
        "dictionary as a TopK SAE, the pair term on its residual (codes held fixed)",
    )
    pair_l1_warmup_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="pair penalty ramps in over this"
    )
    pair_start_fraction: float = Field(
        0.3,
        ge=0.0,
        lt=1.0,
        description="the pair term joins the reconstruction after this fraction of training "
        "(the dictionary first learns alone, as graduated sparsity ends; 0: from the start)",
    )

    # composition curriculum: each active latent attends to at most its top-m partners
    curriculum: bool = Field(
        True,
        description="off = attention: every active latent attends to all k; pair top_m: the final "
        "m from the start",
    )
    curriculum_m: list[int] = Field([2, 3, 4], min_length=1, description="m values, in order")
    curriculum_at: list[float] = Field(
        [0.2, 0.4], description="fractions of training where m moves to the next value"
    )

    @model_validator(mode="after")
    def _composition(self) -> CompSAEConfig:
        if self.composer == "attention" and self.d_f % self.n_heads:
            raise ValueError(f"d_f ({self.d_f}) must be a multiple of n_heads ({self.n_heads})")
        if len(self.curriculum_at) != len(self.curriculum_m) - 1:
            raise ValueError(
                "curriculum_at needs one switch point fewer than curriculum_m has values"
            )
        if sorted(self.curriculum_at) != self.curriculum_at or not all(
            0 < a < 1 for a in self.curriculum_at
        ):
            raise ValueError("curriculum_at must be increasing fractions in (0, 1)")
        if any(m < 1 for m in self.curriculum_m):
            raise ValueError("curriculum_m values must be >= 1")
        return self

    def read_settings(self) -> frozenset[str]:
        """The composition settings this config's composer (and pair selection) reads."""
        read = COMPOSER_SETTINGS[self.composer]
        if self.composer == "pair":
            others = frozenset().union(*PAIR_SELECTION_SETTINGS.values())
            read = (read - others) | PAIR_SELECTION_SETTINGS[self.pair_selection]
        return read

    def ignored_fields(self) -> list[str]:
        """The fields set explicitly (a config entry or `--set`) that the chosen composer does not
        read, sorted: setting them has no effect, which a user should be told."""
        return sorted(self.model_fields_set & (COMPOSITION_SETTINGS - self.read_settings()))

    def ignored_because(self, field: str) -> str | None:
        """Why setting `field` has no effect on this model (`with the pair composer (n_heads is
        read by the attention composer only)`), or None when the model reads it."""
        if field not in COMPOSITION_SETTINGS or field in self.read_settings():
            return None
        if self.composer == "pair" and field in COMPOSER_SETTINGS["pair"]:
            readers = [s for s, read in PAIR_SELECTION_SETTINGS.items() if field in read]
            return (
                f"with pair_selection {self.pair_selection} ({field} is read by pair_selection "
                f"{' / '.join(readers)} only)"
            )
        readers = [c for c, read in COMPOSER_SETTINGS.items() if field in read]
        return (
            f"with the {self.composer} composer ({field} is read by the "
            f"{' / '.join(readers)} composer{'s' if len(readers) > 1 else ''} only)"
        )

    @property
    def has_curriculum(self) -> bool:
        return True

    @property
    def final_m(self) -> int | None:
        """Partners each latent may attend to once the curriculum is over (None = all k).  The pair
        composer's top-m selection keeps its final m from the start when the curriculum is off."""
        if self.curriculum or (self.composer == "pair" and self.pair_selection == "top_m"):
            return self.curriculum_m[-1]
        return None


class ReLUConfig(_DictionaryConfig):
    """ReLU SAE: an L1 penalty on z_i * ||W_dec[i]||, ramped in linearly."""

    type: Literal["relu"] = "relu"

    l1_coef: float = Field(5.0, ge=0.0, description="with inputs normalised to mean norm sqrt(d)")
    l1_warmup_fraction: float = Field(0.05, ge=0.0, le=1.0)


class JumpReLUConfig(_DictionaryConfig):
    """JumpReLU SAE: imported only (`compsae import --format saelens`), never trained here."""

    type: Literal["jumprelu"] = "jumprelu"


def _model_type(data: Any) -> str:
    # a config without `type` is a CompSAE, as it always was
    return str(
        data.get("type", "compsae") if isinstance(data, dict) else getattr(data, "type", "compsae")
    )


ModelConfig = Annotated[
    Annotated[CompSAEConfig, Tag("compsae")]
    | Annotated[TopKConfig, Tag("topk")]
    | Annotated[ReLUConfig, Tag("relu")]
    | Annotated[JumpReLUConfig, Tag("jumprelu")],
    Discriminator(_model_type),
]
"""One sparse dictionary's config: the class its `type` names."""

MODEL_CONFIGS: dict[str, type[_DictionaryConfig]] = {
    "compsae": CompSAEConfig,
    "topk": TopKConfig,
    "relu": ReLUConfig,
    "jumprelu": JumpReLUConfig,
}
_ADAPTER: TypeAdapter[Any] = TypeAdapter(ModelConfig)


def parse_model_config(data: Any) -> ModelConfig:
    """A model config from JSON-like data (type-checked against its kind)."""
    return _ADAPTER.validate_python(data)


def make_model_config(**fields: Any) -> ModelConfig:
    """`make_model_config(type="topk", n_latents=64)`: the config class of `type` (default
    compsae)."""
    return parse_model_config(fields)


def legacy_model_config(data: dict[str, Any]) -> ModelConfig:
    """A model config written when every kind carried every setting (checkpoints before the
    per-kind configs): the settings its kind does not have are dropped."""
    cls = MODEL_CONFIGS.get(_model_type(data))
    if cls is None:
        return parse_model_config(data)
    return parse_model_config({k: v for k, v in data.items() if k in cls.model_fields})


class TrainConfig(BaseModel):
    """Training settings shared by every model of a train stage (each may override them)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(3e-4, gt=0.0)
    adam_betas: tuple[float, float] = Field(
        (0.9, 0.999), description="Adam's (beta1, beta2), each in [0, 1)"
    )
    grad_clip: float | None = Field(
        None, gt=0.0, description="clip the global gradient norm to this (None: off)"
    )
    batch_size: int = Field(512, ge=1)
    tokens: int = Field(
        10_000_000, ge=1, description="token budget: steps = ceil(tokens / batch_size)"
    )
    warmup_fraction: float = Field(0.01, ge=0.0, le=1.0, description="linear lr warm-up from 0")
    decay_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="linear lr decay to 0 at the end"
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="initialisation and shuffling (0 .. 2^32-1)"
    )
    log_every: int = Field(50, ge=1, description="steps between metrics.jsonl lines")
    checkpoint_every: int = Field(
        1000, ge=1, description="steps between checkpoints (one at the end too)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = Field(False, description="bf16 autocast (CUDA only; ignored on CPU)")
    compile: bool = Field(
        False,
        description="torch.compile each step's loss and its backward (CUDA graphs on CUDA; CPU "
        "needs g++): "
        "changes results only by float rounding, as the device does, so it is not part of the "
        "config hash",
    )
    normalize: bool = Field(
        True, description="scale activations to mean norm sqrt(d_model), as SAELens"
    )
    heldout_fraction: float = Field(
        DEFAULT_HELDOUT_FRACTION,
        ge=0.0,
        lt=1.0,
        description="sequences kept out of training (split seed: its own, 0)",
    )
    dead_window_tokens: int = Field(
        1_000_000,
        ge=1,
        description="a latent not fired in this many tokens is dead (AuxK and metrics)",
    )
    mix_chunks: int = Field(16, ge=1, description="store chunks mixed per shuffle window")
    num_threads: int = Field(2, ge=1, description="loader decode threads")
    prefetch: int = Field(2, ge=1, description="shuffle windows decoded ahead")
    # experiment tracking: where metrics go besides metrics.jsonl (never what is trained: not
    # hashed)
    log: Literal["none", "wandb"] = Field(
        "none", description="wandb: also log the metrics to Weights & Biases"
    )
    wandb_project: str | None = Field(None, description="W&B project; default compsae-<pipeline>")
    wandb_entity: str | None = Field(None, description="W&B entity (team); default your own")

    @model_validator(mode="after")
    def _fractions(self) -> TrainConfig:
        if self.warmup_fraction + self.decay_fraction > 1.0:
            raise ValueError("warmup_fraction + decay_fraction must be <= 1")
        return self

    @property
    def total_steps(self) -> int:
        return -(-self.tokens // self.batch_size)

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"Adam's betas must each be in [0, 1), got {list(v)}")
        return v


SEED_SEPARATOR = "__s"  # model "<variant>__s<seed>" is one seed of a variant


def split_seed_name(name: str) -> tuple[str, int | None]:
    """`gate_off__s2` -> ("gate_off", 2); a name without a seed suffix -> (name, None)."""
    variant, sep, seed = name.rpartition(SEED_SEPARATOR)
    if sep and seed.isdigit():
        return variant, int(seed)
    return name, None


class ImportedSAE(BaseModel):
    """An SAE trained elsewhere, listed in a pipeline beside the trained models: the train stage
    imports it into its folder, so analyze, probe and humaneval score it like the others."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["saelens"] = "saelens"
    path: str = Field(
        ...,
        min_length=1,
        description="the SAE's folder (SAELens: cfg.json + sae_weights.safetensors)",
    )
    hook: str | None = Field(
        None,
        description="store hook it reads, when its own hook name differs (other model wrapper)",
    )


class TrainStageConfig(TrainConfig):
    """`train:` of a pipeline: the hook, shared training settings and the models to train."""

    hook: str = Field(
        ..., min_length=1, description="store hook to train on, e.g. blocks.3.hook_resid_post"
    )
    n_latents: int | None = Field(None, ge=1, description="when set, every model uses this width")
    k: int | None = Field(
        None, ge=1, description="when set, every model uses this k (compare at equal k)"
    )
    models: dict[str, ModelConfig] = Field(
        default_factory=lambda: {
            "compsae": CompSAEConfig(),
            "topk": TopKConfig(),
            "relu": ReLUConfig(),
        },
    )
    imported: dict[str, ImportedSAE] = Field(
        default_factory=dict,
        description="SAEs trained elsewhere, imported beside the trained models (name -> source)",
    )

    seeds: list[int] | None = Field(
        None,
        min_length=1,
        description="train every model once per seed; names become <model>__s<seed> (ablation "
        "studies)",
    )

    @model_validator(mode="after")
    def _resolve_models(self) -> TrainStageConfig:
        import re

        if self.seeds is not None:
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds are listed twice: {self.seeds}")
            self.models = {
                f"{name}{SEED_SEPARATOR}{seed}": cfg.model_copy(
                    update={"train": {**cfg.train, "seed": seed}}
                )
                for name, cfg in self.models.items()
                if SEED_SEPARATOR not in name
                for seed in self.seeds
            } | {name: cfg for name, cfg in self.models.items() if SEED_SEPARATOR in name}

        if not self.models and not self.imported:
            raise ValueError("models: list at least one model to train (or an SAE under imported)")
        for name in self.imported:
            if name in self.models:
                raise ValueError(
                    f"imported.{name}: a trained model has the same name; rename one of them"
                )
        for name in [*self.models, *self.imported]:
            # fullmatch: `$` would accept a name ending in a newline
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) or ".." in name:
                raise ValueError(f"model name {name!r} must be letters, digits, '_', '-', '.'")
        for name, model in self.models.items():
            if model.type == "jumprelu":
                raise ValueError(
                    f"models.{name}: jumprelu SAEs are imported (compsae import --format saelens), "
                    "not trained; use topk, relu or compsae"
                )
        for name in self.models:
            try:
                self.model_for(name)
                self.train_for(name)
            except ValidationError as e:
                first = e.errors(include_url=False)[0]
                raise ValueError(f"models.{name}: {first['msg']}") from None
        return self

    def model_for(self, name: str) -> ModelConfig:
        """The model's config with the stage-wide n_latents / k applied."""
        cfg = self.models[name]
        changes = {f: getattr(self, f) for f in ("n_latents", "k") if getattr(self, f) is not None}
        if not changes:
            return cfg
        return parse_model_config({**cfg.model_dump(), **changes})

    def train_for(self, name: str) -> TrainConfig:
        """Shared training settings with the model's own overrides applied."""
        shared = {f: getattr(self, f) for f in TrainConfig.model_fields}
        return TrainConfig.model_validate({**shared, **self.models[name].train})
