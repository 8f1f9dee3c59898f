"""Static, self-contained HTML for one rater: blinded feature cards with a form that downloads a
CSV.

The page carries no method name, no latent index and no detection answer; the CSV it produces has
the columns that :func:`compsae.evaluation.human_study.kit.score` reads.
"""

from __future__ import annotations

import html

from compsae.analysis.context_style import CONTEXT_CSS, SHADE_RGB
from compsae.lm.token_text import display_text

RATING_COLUMNS = ("rater", "card_id", "interpretable", "confidence", "detection", "description")

# context lines look as in the feature browser (compsae.analysis.context_style)
_CSS = (
    CONTEXT_CSS
    + """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
.card{border:1px solid #bbb;border-radius:6px;padding:1em;margin:1.5em 0}
h3{margin:.6em 0 .2em} .muted{color:#777;font-size:12px}
.det label{display:block;font-family:ui-monospace,monospace;font-size:13px;margin:3px 0}
"""
)

_JS = """
function csvCell(s){s=String(s);return /[",\\n]/.test(s)?'"'+s.replace(/"/g,'""')+'"':s}
function download(){
  const rater=document.getElementById('rater').value.trim();
  if(!rater){alert('Enter your rater id first');return}
  const rows=[%COLUMNS%];
  document.querySelectorAll('.card').forEach(c=>{
    const id=c.dataset.card;
    const interp=c.querySelector('input[name="i_'+id+'"]:checked');
    const conf=c.querySelector('select[name="c_'+id+'"]').value;
    const det=[...c.querySelectorAll('input[name="d_'+id+'"]:checked')].map(e=>e.value).join(';');
    const desc=c.querySelector('textarea').value;
    rows.push([rater,id,interp?interp.value:'',conf,det,desc].map(csvCell).join(','));
  });
  const blob=new Blob([rows.join('\\n')+'\\n'],{type:'text/csv'});
  const a=document.createElement('a');a.href=URL.createObjectURL(blob);
  a.download='ratings_'+rater+'.csv';a.click();
}
"""


def _token_span(text: str, act: float, scale: float, is_centre: bool) -> str:
    alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, act / scale))
    shown = html.escape(display_text(text))
    cls = "tok centre" if is_centre else "tok"
    style = f' style="background:rgba({SHADE_RGB},{alpha:.2f})"' if alpha > 0 else ""
    title = f' title="{act:.3g}"' if act else ""
    return f'<span class="{cls}"{style}{title}>{shown}</span>'


def render_context(ctx: dict, scale: float, highlight: bool = True) -> str:
    """One context as a line of shaded tokens (``ctx`` as in the JSONL: tokens, acts, centre)."""
    spans = [
        _token_span(t, a if highlight else 0.0, scale, highlight and i == ctx["centre"])
        for i, (t, a) in enumerate(zip(ctx["tokens"], ctx["acts"], strict=True))
    ]
    return f'<div class="ctx">{"".join(spans)}</div>'


def render_card(card: dict, number: int) -> str:
    """HTML for one blinded card (the JSONL record), numbered in this rater's order."""
    cid = html.escape(card["card_id"])
    scale = max([c["max_act"] for c in card["top"]] + [1e-9])
    parts = [
        f'<div class="card" data-card="{cid}"><h2>Feature {number} <span class="muted">({cid}, '
        "fires on "
        f"{100 * card['density']:.3g}% of tokens)</span></h2>",
        "<h3>Top-activating contexts</h3>",
    ]
    parts += [render_context(c, scale) for c in card["top"]]
    for label, ctxs in card["quantiles"]:
        parts.append(f'<h3>Weaker activations <span class="muted">{html.escape(label)}</span></h3>')
        parts += [render_context(c, scale) for c in ctxs]
    parts.append("<h3>Contexts where it does not fire</h3>")
    parts += [render_context(c, scale) for c in card["negatives"]]
    parts.append(
        f"<h3>1. Is there a single clear interpretation?</h3>"
        f'<label><input type="radio" name="i_{cid}" value="1"> yes</label> '
        f'<label><input type="radio" name="i_{cid}" value="0"> no</label> &nbsp; confidence '
        f'<select name="c_{cid}"><option value=""></option>'
        + "".join(f'<option value="{v}">{v}</option>' for v in range(1, 6))
        + '</select><br><textarea rows="1" cols="80" placeholder="short description '
        '(optional)"></textarea>'
        "<h3>2. Detection: tick every context on which you think this feature fires</h3><div "
        'class="det">'
    )
    for j, c in enumerate(card["detection"], start=1):
        parts.append(
            f'<label><input type="checkbox" name="d_{cid}" value="{j}"> {j}. '
            f"{render_context(c, 1.0, highlight=False)}</label>"
        )
    parts.append("</div>")
    if card.get("partners"):
        parts.append(
            "<details><summary>Composition partners (open only after answering 1 and "
            "2)</summary><ul>"
        )
        parts += [
            f"<li>score {p['score']:.3g}: {html.escape(' | '.join(p['top_tokens']))}</li>"
            for p in card["partners"]
        ]
        parts.append("</ul></details>")
    parts.append("</div>")
    return "\n".join(parts)


def render_page(cards: list[dict], title: str) -> str:
    """A complete rater page for ``cards`` (already in this rater's order)."""
    js = _JS.replace("%COLUMNS%", "'" + ",".join(RATING_COLUMNS) + "'")
    body = "\n".join(render_card(c, i) for i, c in enumerate(cards, start=1))
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style><script>{js}</script></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<p>Each card shows one feature of a language model: tokens shaded by how strongly the "
        "feature "
        "fires (the outlined token is the one the context is centred on). Answer question 1 from "
        "the "
        "shaded evidence, then tick the detection contexts (shown without shading) on which you "
        "think it "
        "fires. When done, enter your rater id and download the CSV.</p>"
        '<p>Rater id: <input id="rater"> <button onclick="download()">Download ratings '
        "CSV</button></p>"
        f"{body}"
        '<p><button onclick="download()">Download ratings CSV</button></p></body></html>'
    )
