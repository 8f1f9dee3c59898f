"""Loading a model prints nothing of the libraries' own (transformer_lens' device chatter)."""

from __future__ import annotations

import warnings

from compsae.harvest.config import HarvestConfig
from compsae.lm.models import load_model


def test_building_the_bridge_prints_nothing(capfd):
    cfg = HarvestConfig(
        model="tiny-neox",
        hooks=["blocks.0.attn.hook_z"],  # not a residual hook: needs the transformer_lens bridge
        n_tokens=256,
        context=16,
        data={"source": "synthetic:arithmetic"},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(cfg)
        assert "blocks.0.attn.hook_z" in loaded.hook_names()  # the bridge is built here
    out, err = capfd.readouterr()
    assert "Moving model to device" not in out + err
    assert out == "" and err == "", (out, err)
    assert not caught, [str(w.message) for w in caught]
