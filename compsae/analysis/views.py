"""What a model's composition numbers are, per kind of model: the labels the report and the feature
browser put on them, which composition views a kind has, and the short phrase a cell shows where a
view does not apply.

The kinds differ in what they compose with: the pairwise composer adds one explicit term per pair
of active latents, so its composition matrix is the pair effect ‖Δ_ij‖ (the mixed difference of the
reconstruction, its pair term exactly with every pair on); the attention and MLP composers pool
the active latents through a network, so their pair effect is measured by intervention, and only
the attention composer has attention weights (heads, an attention heatmap, token examples) and,
like the MLP composer, a gate.  TopK / ReLU / JumpReLU dictionaries, a CompSAE with composer "none"
and the baselines have no composition path at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# pair_metrics' "matrix" field -> the matrix's key in the analysis arrays
PAIR_EFFECT_SOURCE = "pair effects (mixed differences)"
ATTENTION_SOURCE = "attention weights"
ATTENTION_LABEL = "attention weight i→j (heads averaged)"


@dataclass(frozen=True)
class CompositionView:
    """The composition views of one model.  `kind`: the model kind ("compsae", "topk", "pca", ...);
    `composer`: a CompSAE's composer ("pair", "attention", "mlp", "none"; None for other kinds);
    `matrix`: what its composition matrix holds ("pair_effect", "attention", None: no pair
    statistics); `gate`: whether the composer has a learned gate; `pair_selection` / `pair_fit`:
    the pair composer's settings (None for the others)."""

    kind: str
    composer: str | None = None
    matrix: str | None = None
    gate: bool = False
    pair_selection: str | None = None
    pair_fit: str | None = None

    @property
    def name(self) -> str:
        """The kind in words: "pair composer", "topk", ..."""
        if self.kind == "compsae" and self.composer is not None:
            return f"{self.composer} composer" if self.composer != "none" else "composer none"
        return self.kind

    @property
    def label(self) -> str:
        """The kind with the settings that change what its numbers mean: "pair composer, gated
        pairs, residual fit" (the default "all" selection and "joint" fit are not named)."""
        extra = []
        if self.composer == "pair" and self.pair_selection not in (None, "all"):
            extra.append(f"{self.pair_selection.replace('_', '-')} pairs")
        if self.composer == "pair" and self.pair_fit not in (None, "joint"):
            extra.append(f"{self.pair_fit} fit")
        if self.composes and self.composer != "pair" and not self.gate:
            extra.append("gate off")
        return ", ".join([self.name, *extra])

    @property
    def composes(self) -> bool:
        """Whether the model has a composition path."""
        return self.kind == "compsae" and self.composer not in (None, "none")

    @property
    def attends(self) -> bool:
        """Whether the composer has attention weights (heads, heatmap, token examples)."""
        return self.composes and self.composer == "attention"

    @property
    def has_gate(self) -> bool:
        """Whether gate values mean something: a pooled composer with its learned gate on."""
        return self.composes and self.composer != "pair" and self.gate

    @property
    def matrix_label(self) -> str:
        """What the composition matrix's numbers are, for this kind."""
        if self.matrix == "attention":
            return ATTENTION_LABEL
        if self.matrix == "pair_effect":
            if self.composer == "pair":  # its mixed difference is its pair term
                return "pair effect ‖Δ_ij‖"
            return "pair effect ‖Δ_ij‖ (by intervention)"
        return self.why("pairs")

    @property
    def partner_label(self) -> str:
        """The mass a partner's share is counted in."""
        if self.matrix == "attention":
            return "share of attention mass"
        return "share of pair-effect mass"

    def why(self, view: str) -> str:
        """One short phrase: why `view` ("pairs", "heads", "attention", "gate") is blank for this
        model ("" where it applies)."""
        if view == "pairs":
            if not self.composes:
                return f"no pair path in {self.name}"
            return "" if self.matrix else "pair statistics not computed"
        if view in ("heads", "attention"):
            if not self.composes:
                return f"no composition path in {self.name}"
            return "" if self.attends else f"no attention in {self.name}"
        if view == "gate":
            if not self.composes:
                return f"no composition path in {self.name}"
            if self.composer == "pair":
                return f"no residual gate in {self.name}"
            return "" if self.gate else "gate off (g = 1)"
        raise ValueError(f"unknown view {view!r}")


def matrix_kind(source: str | None) -> str | None:
    """pair_metrics' "matrix" field -> `CompositionView.matrix`."""
    return {PAIR_EFFECT_SOURCE: "pair_effect", ATTENTION_SOURCE: "attention"}.get(str(source))


def view_of(model: dict[str, Any]) -> CompositionView:
    """The view of one model's metrics.json entry (its "kind", "composer", "gate_on",
    "pair_selection", "pair_fit" and the "matrix" of its "pairs")."""
    return CompositionView(
        kind=str(model.get("kind", "")),
        composer=model.get("composer"),
        matrix=matrix_kind((model.get("pairs") or {}).get("matrix")),
        gate=bool(model.get("gate_on", "gate" in model)),
        pair_selection=model.get("pair_selection"),
        pair_fit=model.get("pair_fit"),
    )


__all__ = ["CompositionView", "matrix_kind", "view_of"]
