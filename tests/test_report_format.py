"""How the reports write numbers: 3 significant digits, units in the headers, scrolling tables,
and an ablation table that blanks settings a model kind does not have."""

from __future__ import annotations

from compsae.analysis.report import NA, ablation_table, fmt, label, table


def test_numbers_have_three_significant_digits():
    assert [
        fmt(0.123456),
        fmt(12.3456),
        fmt(0.000123456),
        fmt(65536.0),
        fmt(7),
        fmt(None),
        fmt(float("nan")),
    ] == ["0.123", "12.3", "0.000123", "65536", "7", "–", "–"]
    assert fmt(NA) == ""


def test_headers_carry_units_and_tables_scroll():
    assert label("l0") == "L0 (latents / token)" and label("delta_ce") == "ΔCE (nats)"
    assert label("dense_fraction_0.01") == "dense > 0.01 (fraction of latents)"
    html = table([{"model": "a", "fvu": 0.5}], ["model", "fvu"], "cap")
    assert html.startswith("<div class='scroll'><table>") and "<td>0.5</td>" in html


def test_ablation_table_shows_only_applicable_settings():
    rows = [
        {
            "model": "c",
            "type": "compsae",
            "n_latents": 64,
            "k": 4,
            "composer": "attention",
            "gate": True,
            "curriculum": True,
            "graduated_sparsity": True,
            "fvu": 0.1,
        },
        {
            "model": "none",
            "type": "compsae",
            "n_latents": 64,
            "k": 4,
            "composer": "none",
            "gate": True,
            "curriculum": True,
            "graduated_sparsity": False,
            "fvu": 0.2,
        },
        {
            "model": "t",
            "type": "topk",
            "n_latents": 64,
            "k": 4,
            "composer": "attention",
            "gate": True,
            "curriculum": True,
            "graduated_sparsity": True,
            "fvu": 0.3,
        },
        {
            "model": "r",
            "type": "relu",
            "n_latents": 64,
            "k": 32,
            "composer": "attention",
            "gate": True,
            "curriculum": True,
            "graduated_sparsity": True,
            "fvu": 0.4,
        },
    ]
    out, cols = ablation_table(rows)
    assert cols == list(rows[0])
    blank = {r["model"]: sorted(k for k, v in r.items() if v is NA) for r in out}
    assert blank == {
        "c": [],
        "none": ["curriculum", "gate"],
        "t": ["composer", "curriculum", "gate"],
        "r": ["composer", "curriculum", "gate", "graduated_sparsity", "k"],
    }
    only_relu, cols = ablation_table([rows[3]])
    assert cols == ["model", "type", "n_latents", "fvu"]  # no column that applies to no row
