"""The feature browser page: one self-contained HTML file per trained model (opens from disk, no
network assets, no framework), its data one JSON blob (`browser_data`) in a `<script
type="application/json">` element, rendered by the small script below.

The page: a searchable, sortable table of latents (frequency, mean / max activation, top tokens,
partners); clicking a latent (or opening `#latent=N`) shows its top contexts shaded by activation
(the same shading as the human-evaluation cards), its activation histogram, its logit effect and
its composition partners (linked to their own `#latent=N` views) with the contexts where each pair
fires together; each top pair analysis profiled has its own view (`#pair=i-j`: the tokens where
both fire and where only one does, the logits its term moves, examples), linked from both latents.
The script records
any error it meets in `body[data-errors]` and sets `body[data-ready]` when it has rendered, which
the headless-browser test reads.
"""

from __future__ import annotations

import html
import json
from typing import Any

from compsae.analysis.context_style import CONTEXT_CSS, SHADE_RGB

_CSS = (
    CONTEXT_CSS
    + """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;font-size:14px}
h1{font-size:20px;margin:0 0 .3em} h2{font-size:16px;margin:.8em 0 .3em} .muted{color:#777;font-size:12px}
#wrap{display:flex;gap:1.2em;align-items:flex-start}
#left{flex:0 0 46%;min-width:0} #detail{flex:1;min-width:0;border-left:1px solid #ddd;padding-left:1em}
#scroll{max-height:80vh;overflow:auto;border:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;width:100%}
th{position:sticky;top:0;background:#f3f3f3;cursor:pointer;user-select:none;white-space:nowrap}
td,th{border-bottom:1px solid #e4e4e4;padding:2px 6px;text-align:right}
td.txt,th.txt{text-align:left;font-family:ui-monospace,monospace;max-width:18em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
tr.row:hover{background:#fff4e6} tr.sel{background:#ffe2bf}
#q{width:60%;padding:3px} .pill{display:inline-block;border:1px solid #ccc;border-radius:9px;padding:0 6px;margin:1px;
font-family:ui-monospace,monospace;font-size:12px} a.lat{cursor:pointer;color:#0645ad;text-decoration:underline}
.cols{display:flex;gap:2em;flex-wrap:wrap} .note{color:#a40}
"""
)

_JS = r"""
(function(){
const errors=[];
function fail(msg){errors.push(String(msg));document.body.dataset.errors=errors.join(' | ');}
window.addEventListener('error',e=>fail(e.message||e));
const origError=console.error;console.error=function(){fail([...arguments].join(' '));origError.apply(console,arguments);};
const D=JSON.parse(document.getElementById('data').textContent);
const col=Object.fromEntries(D.columns.map((c,i)=>[c,i]));
const el=(tag,attrs,...kids)=>{const e=document.createElement(tag);for(const[k,v]of Object.entries(attrs||{})){
  if(k==='class')e.className=v;else if(k==='text')e.textContent=v;else if(k.startsWith('on'))e.addEventListener(k.slice(2),v);else e.setAttribute(k,v);}
  for(const k of kids){if(k!=null)e.append(k);}return e;};
const fmt=v=>v==null?'–':(Number.isInteger(v)?String(v):Number(v).toPrecision(3));
const tokText=id=>(D.vocab[id]??('<'+id+'>')).replace(/\n/g,'↵');
const tokLabel=id=>{const t=tokText(id);return t.trim()===''?t.replace(/ /g,'␣'):t;};  // a lone space stays visible
const topTok=l=>(D.top_tokens[l]||[]).map(([t,c])=>tokLabel(t)).join(' · ');
const partnersOf=l=>(D.partners[l]||[]);
const SHOWN=[['latent','latent',''],['frequency','freq (% tokens)','%'],['mean_activation','mean act',''],
  ['max_activation','max act',''],['n_partners','partners','']].filter(([c])=>c in col);
let sortKey='frequency' in col?'frequency':'latent',sortDesc=true,query='',limit=300,current=null;
function cell(r,c){const v=r[col[c]];return c==='frequency'&&v!=null?v*100:v;}
function rows(){
  const q=query.trim().toLowerCase();
  let rs=D.table;
  if(q){rs=rs.filter(r=>String(r[col.latent])===q||topTok(r[col.latent]).toLowerCase().includes(q));}
  const k=col[sortKey];
  rs=[...rs].sort((a,b)=>{const x=a[k]??-Infinity,y=b[k]??-Infinity;return sortDesc?(y-x):(x-y);});
  return rs;}
function drawTable(){
  const rs=rows();const body=el('tbody');
  for(const r of rs.slice(0,limit)){
    const l=r[col.latent];
    const tr=el('tr',{class:'row'+(l===current?' sel':''),onclick:()=>show(l)});
    for(const[c]of SHOWN)tr.append(el('td',{text:fmt(cell(r,c))}));
    tr.append(el('td',{class:'txt',text:topTok(l)}));
    tr.append(el('td',{class:'txt',text:partnersOf(l).map(p=>p[0]).join(', ')}));
    body.append(tr);}
  const head=el('tr');
  for(const[c,label]of SHOWN)head.append(el('th',{text:label+(c===sortKey?(sortDesc?' ▼':' ▲'):''),
    onclick:()=>{if(sortKey===c)sortDesc=!sortDesc;else{sortKey=c;sortDesc=true;}drawTable();}}));
  head.append(el('th',{class:'txt',text:'top tokens'}),el('th',{class:'txt',text:'top partners'}));
  const t=document.getElementById('tbl');t.replaceChildren(el('thead',{},head),body);
  document.getElementById('count').textContent=`${Math.min(limit,rs.length)} of ${rs.length} latents shown`;
  document.getElementById('more').style.display=rs.length>limit?'':'none';}
function context(ctx,scale){
  const line=el('div',{class:'ctx'});const c=ctx.c??ctx.t.length-1;
  if((ctx.n||1)>1)line.append(el('span',{class:'pill',title:'top contexts with this same token window',text:'×'+ctx.n}),' ');
  ctx.t.forEach((t,i)=>{const a=ctx.a[i];const alpha=scale>0?Math.max(0,Math.min(1,a/scale)):0;
    const s=el('span',{class:'tok'+(i===c?' centre':''),text:tokText(t)});
    if(alpha>0)s.style.background=`rgba(SHADE_RGB,${alpha.toFixed(2)})`;if(a)s.title=fmt(a);line.append(s);});
  return line;}
function histogram(counts){
  const w=360,h=90,n=counts.length,mx=Math.max(...counts,1);
  const ns='http://www.w3.org/2000/svg';const svg=document.createElementNS(ns,'svg');
  svg.setAttribute('width',w);svg.setAttribute('height',h+14);
  counts.forEach((c,i)=>{const r=document.createElementNS(ns,'rect');const bh=c?Math.max(1,h*Math.log1p(c)/Math.log1p(mx)):0;
    r.setAttribute('x',i*w/n+1);r.setAttribute('width',w/n-2);r.setAttribute('y',h-bh);r.setAttribute('height',bh);
    r.setAttribute('fill','rgb(SHADE_RGB)');const tt=document.createElementNS(ns,'title');tt.textContent=c+' tokens';r.append(tt);svg.append(r);});
  const lab=document.createElementNS(ns,'text');lab.setAttribute('x',0);lab.setAttribute('y',h+12);lab.setAttribute('font-size','10');
  lab.textContent='0 → max activation (log count)';svg.append(lab);return svg;}
function latLink(l){return el('a',{class:'lat',href:'#latent='+l,text:'#'+l});}  // its own page: #latent=N
const PAIRS=D.pairs||[];
const pairKey=(i,j)=>Math.min(i,j)+'-'+Math.max(i,j);
const pairOf=Object.fromEntries(PAIRS.map(p=>[pairKey(p.i,p.j),p]));
function pairLink(p){return el('a',{class:'lat pairlink',href:'#pair='+pairKey(p.i,p.j),text:`pair #${p.i} × #${p.j}`});}
function tokenPills(xs){return (xs||[]).length?xs.map(([t,c])=>el('span',{class:'pill',text:`${t.trim()===''?t.replace(/ /g,'␣'):t} ×${c}`})):[el('span',{class:'muted',text:'none'})];}
function valuePills(xs){return (xs||[]).map(([t,v])=>el('div',{},el('span',{class:'pill',text:t}),' '+fmt(v)));}
function showPair(i,j){
  current='pair='+pairKey(i,j);location.hash=current;
  const det=document.getElementById('detail');det.replaceChildren();const p=pairOf[pairKey(i,j)];
  if(!p){det.append(el('p',{class:'note',text:`no page for pair ${i} × ${j}: only the top pairs analysis profiled have one`}));return;}
  det.append(el('h2',{id:'pair-head'},'pair ',latLink(p.i),' × ',latLink(p.j)));
  const call=p.called==null?'':(p.called?'; called composing by the label-free rule':'; not called by the label-free rule');
  det.append(el('p',{text:`both fire on ${fmt(p.tokens)} held-out tokens; mean ${D.matrix_label||'pair effect'} ${fmt(p.mean_effect)}`+(p.p_value==null?'':`, p = ${fmt(p.p_value)}`)+call}));
  const cols=el('div',{class:'cols'});
  cols.append(el('div',{},el('h2',{text:'tokens where both fire'}),...tokenPills(p.tokens_both)));
  cols.append(el('div',{},el('h2',{text:`only #${p.i} (${fmt(p.n_only_i)} tokens)`}),...tokenPills(p.tokens_only_i)));
  cols.append(el('div',{},el('h2',{text:`only #${p.j} (${fmt(p.n_only_j)} tokens)`}),...tokenPills(p.tokens_only_j)));
  det.append(cols);
  if(p.promoted){const lg=el('div',{class:'cols'});
    lg.append(el('div',{},el('h2',{text:'its term promotes (logit change)'}),...valuePills(p.promoted)));
    lg.append(el('div',{},el('h2',{text:'demotes'}),...valuePills(p.demoted)));det.append(lg);}
  else det.append(el('p',{class:'muted',text:'logit effects left out (no unembedding for this hook)'}));
  const ex=p.examples||[];det.append(el('h2',{text:'where both fire'}));
  if(!ex.length)det.append(el('p',{class:'muted',text:'no example among the shown rows'}));
  for(const e of ex)det.append(el('div',{class:'ctx pairex'},el('span',{class:'muted',text:e.context}),el('span',{class:'tok centre',text:e.token}),el('span',{class:'muted',text:e.after||''})));
}
function show(l){
  current=l;location.hash='latent='+l;drawTable();
  const r=D.table.find(r=>r[col.latent]===l);const det=document.getElementById('detail');det.replaceChildren();
  if(!r){det.append(el('p',{class:'note',text:'no latent '+l}));return;}
  det.append(el('h2',{text:`latent ${l}`}));
  det.append(el('p',{text:`fires on ${fmt(cell(r,'frequency'))} % of ${D.n_tokens} held-out tokens; mean activation ${fmt(r[col.mean_activation])}, max ${fmt(r[col.max_activation])} (store units)`}));
  const tt=D.top_tokens[l]||[];
  if(tt.length)det.append(el('p',{},'top tokens (count among its top contexts): ',...tt.map(([t,c])=>el('span',{class:'pill',text:`${tokLabel(t)} ×${c}`}))));
  const ctxs=D.contexts[l]||[];
  det.append(el('h2',{text:'top-activating contexts'}));
  if(!ctxs.length)det.append(el('p',{class:'muted',text:'none: it never fired on the evaluated tokens'}));
  const scale=Math.max(...ctxs.flatMap(c=>c.a),1e-9);
  for(const c of ctxs)det.append(context(c,scale));
  const cols=el('div',{class:'cols'});
  if(D.hist[l]){cols.append(el('div',{},el('h2',{text:`activation histogram (${D.hist_rows} held-out tokens)`}),histogram(D.hist[l])));}
  const lg=D.logits[l];
  if(lg){const side=(title,xs)=>el('div',{},el('h2',{text:title}),...xs.map(([t,v])=>el('div',{},el('span',{class:'pill',text:tokLabel(t)}),' '+fmt(v))));
    cols.append(side('promotes (logit per unit activation)',lg.up),side('suppresses',lg.down));}
  det.append(cols);
  const ps=partnersOf(l);const total=(D.partner_counts||{})[l]??ps.length;
  det.append(el('h2',{text:'composition partners'}));
  if(!D.partner_matrix)det.append(el('p',{class:'muted',text:D.no_partners_why}));
  else if(!ps.length)det.append(el('p',{class:'muted',text:`none: no latent holds a ${D.partner_label} at the partner threshold`}));
  else det.append(el('p',{class:'muted',id:'partners-head',text:`${ps.length} of ${total} partners (${D.partner_label} ≥ threshold), strongest first by ${D.matrix_label}`}));
  const plist=el('div',{id:'partners'});det.append(plist);
  for(const[j,s,sh]of ps){
    const both=ctxs.filter(c=>c.p.includes(j));
    plist.append(el('div',{class:'partner'},latLink(j),` ${D.matrix_label} ${fmt(s)}`+(sh?`, ${fmt(sh*100)} % of its ${D.partner_label.replace('share of ','')}`:'')+`; fires with it in ${both.length} of these ${ctxs.length} contexts`,
      el('span',{class:'muted',text:'  its top tokens: '+topTok(j)})));
    const pp=pairOf[pairKey(l,j)];if(pp)plist.append(el('div',{class:'muted'},'  its page: ',pairLink(pp)));
    for(const c of both)plist.append(context(c,scale));}
  const mine=PAIRS.filter(p=>p.i===l||p.j===l);
  if(mine.length){det.append(el('h2',{text:'pair pages (top pairs analysis profiled)'}));
    const pl=el('div',{id:'pair-pages'});for(const p of mine)pl.append(el('div',{},pairLink(p),` ${fmt(p.tokens)} tokens both fire`));det.append(pl);}
}
document.getElementById('q').addEventListener('input',e=>{query=e.target.value;limit=300;drawTable();});
document.getElementById('more').addEventListener('click',()=>{limit+=1000;drawTable();});
function route(){const h=/latent=(\d+)/.exec(location.hash),q=/pair=(\d+)-(\d+)/.exec(location.hash);
  if(q){if('pair='+pairKey(Number(q[1]),Number(q[2]))!==current)showPair(Number(q[1]),Number(q[2]));return true;}
  if(h){if(Number(h[1])!==current)show(Number(h[1]));return true;}return false;}
window.addEventListener('hashchange',route);
drawTable();
if(!route()){const first=(rows()[0]||[])[col.latent];if(first!=null)show(first);}
document.body.dataset.ready='1';
})();
""".replace("SHADE_RGB", SHADE_RGB)


def _kind(data: dict[str, Any]) -> str:
    """The model kind, with its composer where it has one: "compsae (pair composer)"."""
    composer = data.get("composer")
    kind = str(data["kind"])
    return f"{kind} ({composer})" if composer and composer != kind else kind


def render_browser(data: dict[str, Any]) -> str:
    """The complete page for one model's `browser_data`."""
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace(
        "</", "<\\/"
    )  # no early </script>
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in data.get("notes", []))
    title = f"compsae feature browser: {data['model']}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='muted'>{html.escape(_kind(data))} on "
        f"<code>{html.escape(str(data['hook']))}</code>, {data['n_latents']} latents; frequencies and activations "
        f"on {data['n_tokens']} held-out tokens (activations in the store's units).</p>{notes}"
        "<div id='wrap'><div id='left'><input id='q' placeholder='search: latent number or token text'> "
        "<span id='count' class='muted'></span><div id='scroll'><table id='tbl'></table></div>"
        "<button id='more'>show more</button></div><div id='detail'></div></div>"
        f"<script type='application/json' id='data'>{blob}</script><script>{_JS}</script></body></html>"
    )
