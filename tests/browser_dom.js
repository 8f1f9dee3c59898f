// A minimal DOM stand-in for node: runs a feature-browser page's script on the page's own data
// (with location.hash = argv[3]) and prints, as JSON, what it drew in the latent view: whether it
// finished, the errors it met, the links, the context lines and their outlined centres, the
// repeat pills and the view's text.  Used where no headless browser is installed.
const fs = require('fs');
const page = fs.readFileSync(process.argv[2], 'utf8');
const hash = process.argv[3] || '';
const data = page.match(/<script type='application\/json' id='data'>([\s\S]*?)<\/script>/)[1];
const code = page.match(/<script>([\s\S]*?)<\/script><\/body>/)[1];
class El {
  constructor(tag) { this.tag = tag; this.children = []; this.attrs = {}; this.style = {}; this.dataset = {}; this._text = ''; this.listeners = {}; }
  set textContent(v) { this._text = String(v); this.children = []; }
  get textContent() { return this._text + this.children.map(c => typeof c === 'string' ? c : c.textContent).join(''); }
  set className(v) { this.attrs.class = v; }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  addEventListener(k, f) { (this.listeners[k] = this.listeners[k] || []).push(f); }
  append(...kids) { for (const k of kids) this.children.push(k); }
  replaceChildren(...kids) { this.children = kids; }
  all() { return [this, ...this.children.flatMap(c => typeof c === 'string' ? [] : c.all())]; }
}
const byId = {};
for (const id of ['q', 'count', 'tbl', 'more', 'detail']) byId[id] = new El('div');
byId.data = { textContent: data };
const body = new El('body');
const errors = [];
global.document = {
  body, getElementById: id => byId[id],
  createElement: t => new El(t), createElementNS: (ns, t) => new El(t),
};
global.location = { hash };
global.window = { addEventListener: () => {} };
global.console = { ...console, error: (...a) => errors.push(a.join(' ')) };
try { eval(code); } catch (e) { errors.push(String(e.stack || e)); }
const det = byId.detail;
const links = det.all().filter(e => e.tag === 'a').map(e => e.attrs.href);
const ctx = det.all().filter(e => e.attrs.class === 'ctx').length;
const centres = det.all().filter(e => (e.attrs.class || '').includes('centre')).length;
const pills = det.all().filter(e => e.attrs.class === 'pill' && e._text.startsWith('×')).map(e => e._text);
console.log(JSON.stringify({ ready: body.dataset.ready, errors: errors.concat(body.dataset.errors ? [body.dataset.errors] : []),
  links, ctx, centres, pills, text: det.textContent.slice(0, 1500) }));
