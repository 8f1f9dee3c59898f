"""The smallest pipeline the CLI and config tests write: tiny-neox, 256 tokens, one TopK model."""

from __future__ import annotations

MINI = {
    "runs_root": "RUNS",
    "pipelines": {
        "mini": {
            "harvest": {
                "model": "tiny-neox",
                "hooks": ["blocks.1.hook_resid_post"],
                "n_tokens": 256,
                "context": 16,
                "data": {"source": "synthetic:arithmetic"},
            },
            "train": {
                "hook": "blocks.1.hook_resid_post",
                "models": {"topk": {"type": "topk", "n_latents": 64, "k": 4}},
            },
            "analyze": {},
        }
    },
}
