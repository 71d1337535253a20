// Run a node: pick a model and a price, copy the one-line command, and watch the node link,
// pass calibration and start earning.

import { api } from '../api.js';
import { h, replace, copyButton, errorBox } from '../dom.js';
import { lai, parseLai, num, shortAddr } from '../format.js';

// `lattice model catalog`: the models known by name (any GGUF works with hf:OWNER/REPO/FILE.gguf).
const CATALOG = [
  ['smollm2-135m', 'SmolLM2 135M Instruct — chat, tiny, runs anywhere'],
  ['gemma3-270m', 'Gemma 3 270M — text completion'],
];

function shellQuote(s) {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, "'\\''")}'`;
}

export async function mount(root) {
  const model = h('select', { id: 'node-model' }, CATALOG.map(([id, d]) => h('option', { value: id }, `${id} — ${d.split(' — ')[1]}`)),
    h('option', { value: 'other' }, 'Another GGUF model…'));
  const other = h('input', { id: 'node-model-other', placeholder: 'hf:OWNER/REPO/FILE.gguf or a local path', hidden: true, 'aria-label': 'Model (Hugging Face file or path)' });
  const priceIn = h('input', { id: 'price-in', inputmode: 'decimal', value: '0.1', 'aria-describedby': 'price-hint' });
  const priceOut = h('input', { id: 'price-out', inputmode: 'decimal', value: '0.2', 'aria-describedby': 'price-hint' });
  const label = h('input', { id: 'node-label', placeholder: 'optional, e.g. ada-laptop', maxlength: '64' });
  const cmd = h('code', { id: 'node-command' });
  const problem = h('div', { 'aria-live': 'polite' });
  const watchEl = h('div', { id: 'node-watch' }, h('p', { class: 'muted' }, 'Looking for new nodes…'));

  function command() {
    const m = model.value === 'other' ? other.value.trim() : model.value;
    const pin = parseLai(priceIn.value);
    const pout = parseLai(priceOut.value);
    replace(problem);
    if (!m) { replace(problem, h('p', { class: 'notice warn' }, 'Enter a model.')); return null; }
    if (pin === null || pout === null) { replace(problem, h('p', { class: 'notice warn' }, 'Prices are amounts of LAI per million tokens, like 0.1.')); return null; }
    const parts = ['lattice', 'node', '--nexus', location.origin, '--model', shellQuote(m), '--price-in', pin.toString(), '--price-out', pout.toString()];
    if (label.value.trim()) parts.push('--label', shellQuote(label.value.trim()));
    return parts.join(' ');
  }
  function update() {
    other.hidden = model.value !== 'other';
    cmd.textContent = command() || '…';
  }
  for (const el of [model, other, priceIn, priceOut, label]) el.addEventListener('input', update);
  model.addEventListener('change', update);

  replace(root,
    h('div', { class: 'page-head' }, h('div', {}, h('h1', {}, 'Run a node'), h('p', {}, 'Serve a model from your machine and earn LAI for every token it generates.'))),
    h('div', { class: 'grid two' },
      h('section', { class: 'card', 'aria-labelledby': 'cfg-h' },
        h('h2', { id: 'cfg-h' }, '1. Choose a model and your price'),
        h('div', { class: 'field' }, h('label', { for: 'node-model' }, 'Model'), model, other),
        h('div', { class: 'row' },
          h('div', { class: 'field' }, h('label', { for: 'price-in' }, 'Prompt price'), priceIn),
          h('div', { class: 'field' }, h('label', { for: 'price-out' }, 'Completion price'), priceOut)),
        h('p', { class: 'hint muted small', id: 'price-hint' }, 'LAI per million tokens. Cheaper nodes get more traffic from people who route for cost.'),
        h('div', { class: 'field' }, h('label', { for: 'node-label' }, 'Label'), label),
        problem),
      h('section', { class: 'card', 'aria-labelledby': 'run-h' },
        h('h2', { id: 'run-h' }, '2. Run this on your machine'),
        h('ol', { class: 'steps muted small' },
          h('li', {}, 'Build or install ', h('code', {}, 'lattice'), ' (see the README: ', h('code', {}, './lattice up'), ' builds it).'),
          h('li', {}, 'Run the command. The model is downloaded and verified on first start; your node key is created in ', h('code', {}, '~/.cache/lattice'), '.'),
          h('li', {}, 'The node dials out to this Nexus — no open port needed — answers a calibration prompt, then gets traffic.')),
        h('div', { class: 'command' }, cmd, copyButton(() => cmd.textContent)),
        h('p', { class: 'muted small' }, 'Staking into node pools and pre-registered node tokens are not available in this version: any node that passes calibration is admitted.'))),
    h('section', { class: 'card', 'aria-labelledby': 'watch-h' }, h('h2', { id: 'watch-h' }, '3. Watch it join'), watchEl));
  update();

  // Nodes online when the page opened are not "yours"; the first new one is watched.
  let before = null;
  let mine = null;
  let stopped = false;
  let timer = null;
  async function tick() {
    try {
      const n = await api('/lattice/v1/nodes');
      const online = n.online || [];
      if (before === null) before = new Set(online.map((x) => x.address));
      const fresh = online.filter((x) => !before.has(x.address));
      if (!mine && fresh.length) mine = fresh[0].address;
      const node = mine && online.find((x) => x.address === mine);
      if (!mine) {
        replace(watchEl, h('p', { class: 'muted' }, h('span', { class: 'dot' }), ` Waiting for a new node to link… (${online.length} online now)`));
      } else if (!node) {
        replace(watchEl, h('div', { class: 'notice warn' }, `Your node ${shortAddr(mine)} went offline. It reconnects by itself when it comes back.`));
      } else {
        const admitted = node.models.filter((m) => m.admitted);
        let earned = null;
        try { earned = await api(`/lattice/v1/nodes/${node.address}/earnings`); } catch { /* shown without */ }
        replace(watchEl, h('div', { id: 'my-node', 'data-address': node.address },
          h('ol', { class: 'steps' },
            h('li', {}, h('span', { class: 'badge ok' }, 'Linked'), ` ${node.label || shortAddr(node.address)} (${node.address}) signed in with its key.`),
            h('li', {}, admitted.length ? h('span', { class: 'badge ok' }, 'Calibrated') : h('span', { class: 'badge warn' }, 'Calibrating…'),
              admitted.length ? ` Serving ${admitted.map((m) => m.id).join(', ')}.` : ' Answering the canary prompt.'),
            h('li', {}, h('span', { class: 'badge' }, 'Earning'), ` ${num(node.served)} requests served`,
              earned ? ` · ${lai(earned.earned?.available ?? earned.earned, 9)} earned · staking pool ${lai(earned.staking_pool?.available ?? earned.staking_pool, 9)}` : '')),
          h('p', {}, h('a', { href: '#/network' }, 'See it in the network explorer'))));
      }
    } catch (e) {
      replace(watchEl, errorBox(e));
    }
    if (!stopped) timer = setTimeout(tick, 2000);
  }
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}
