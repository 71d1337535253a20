// Chat: pick a model (from /v1/models, with nodes, price and speed from /lattice/v1/nodes),
// stream the answer as it arrives (safe Markdown), stop it (aborting the request makes Nexus
// cancel the node's work), see which node answered and what it cost, regenerate, and — for
// users who opted in — the stored conversations.

import { api, streamChat } from '../api.js';
import { h, replace, errorBox, emptyState, copyButton } from '../dom.js';
import { lai, cost, num, shortAddr, ago } from '../format.js';
import { render } from '../markdown.js';

const PREFERENCES = [
  ['latency', 'Fastest'],
  ['cost', 'Cheapest'],
  ['quality', 'Best quality'],
];

function newId() {
  const b = new Uint8Array(12);
  crypto.getRandomValues(b);
  return 'c' + Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

/** Per model: nodes serving it, price range and mean decode speed, from the online nodes. */
function modelStats(nodes) {
  const stats = new Map();
  for (const n of nodes) {
    for (const m of n.models) {
      if (!m.admitted) continue;
      const s = stats.get(m.id) || { prices: [], speeds: [] };
      s.prices.push(n.price);
      if (n.decode_tps) s.speeds.push(n.decode_tps);
      stats.set(m.id, s);
    }
  }
  return stats;
}

function modelLabel(m, s) {
  const parts = [m.id, `${m.nodes ?? 0} node${m.nodes === 1 ? '' : 's'}`];
  if (s?.prices.length) {
    const outs = s.prices.map((p) => BigInt(p.output_per_mtok));
    const lo = outs.reduce((a, b) => (b < a ? b : a));
    const hi = outs.reduce((a, b) => (b > a ? b : a));
    parts.push(`${lai(lo, 4).replace(' LAI', '')}${hi !== lo ? '–' + lai(hi, 4).replace(' LAI', '') : ''} LAI/1M out`);
  }
  if (s?.speeds.length) parts.push(`${num(s.speeds.reduce((a, b) => a + b, 0) / s.speeds.length)} tok/s`);
  return parts.join(' · ');
}

export async function mount(root, ctx) {
  let models = [];
  let nodesByAddr = new Map();
  let conv = { id: newId(), messages: [], stored: false };
  let controller = null;
  let conversations = [];
  let stopped = false;
  const signedIn = () => Boolean(ctx.account);
  const keepHistory = () => Boolean(ctx.account?.user?.keep_history);

  const modelSelect = h('select', { id: 'model', name: 'model' });
  const prefSelect = h('select', { id: 'preference', name: 'preference' },
    PREFERENCES.map(([v, label]) => h('option', { value: v }, label)));
  prefSelect.value = localStorage.getItem('lattice.preference') || 'latency';
  prefSelect.addEventListener('change', () => localStorage.setItem('lattice.preference', prefSelect.value));
  modelSelect.addEventListener('change', () => localStorage.setItem('lattice.model', modelSelect.value));

  const messagesEl = h('div', { class: 'messages', id: 'messages', role: 'log', 'aria-label': 'Conversation', tabindex: '0' });
  const input = h('textarea', {
    id: 'prompt', name: 'prompt', rows: '2', placeholder: 'Ask anything…', 'aria-label': 'Message',
    'aria-describedby': 'composer-hint',
  });
  const sendBtn = h('button', { type: 'submit', class: 'primary', id: 'send' }, 'Send');
  const stopBtn = h('button', { type: 'button', class: 'danger', id: 'stop', hidden: true, onclick: () => stop() }, 'Stop');
  const status = h('p', { class: 'small muted', 'aria-live': 'polite', id: 'chat-status' });
  const composer = h('form', { class: 'composer', onsubmit: (e) => { e.preventDefault(); send(); } },
    h('div', { class: 'grow' }, input, h('div', { class: 'hint', id: 'composer-hint' }, 'Enter to send · Shift+Enter for a new line · Esc to stop')),
    h('div', { class: 'buttons row' }, stopBtn, sendBtn));
  composer.querySelector('.grow').classList.add('full');
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  root.addEventListener('keydown', (e) => { if (e.key === 'Escape' && controller) stop(); });

  const convList = h('ul', { class: 'convs', id: 'conversations', 'aria-label': 'Conversations' });
  const aside = h('aside', { 'aria-label': 'Conversations' },
    h('button', { type: 'button', id: 'new-chat', class: 'full', onclick: () => newChat() }, '+ New chat'),
    h('h2', { id: 'history-h' }, 'History'),
    h('div', { id: 'history-area' }));
  const main = h('section', { class: 'chat-main', 'aria-label': 'Chat' },
    h('div', { class: 'toolbar' },
      h('div', { class: 'field' }, h('label', { for: 'model' }, 'Model'), modelSelect),
      h('div', { class: 'field' }, h('label', { for: 'preference' }, 'Route for'), prefSelect)),
    messagesEl, status, composer);
  replace(root, h('h1', { class: 'sr-only' }, 'Chat'), h('div', { class: 'chat' }, aside, main));

  function setStreaming(on) {
    stopBtn.hidden = !on;
    sendBtn.disabled = on;
    modelSelect.disabled = on;
  }

  // ---- models ----
  async function loadModels() {
    try {
      const [m, n] = await Promise.all([api('/v1/models'), api('/lattice/v1/nodes')]);
      // Embedding models (they carry `dimensions`) cannot chat.
      models = (m.data || []).filter((x) => !x.dimensions);
      nodesByAddr = new Map((n.online || []).map((x) => [x.address, x]));
      const stats = modelStats(n.online || []);
      const keep = modelSelect.value || localStorage.getItem('lattice.model');
      replace(modelSelect, models.map((x) => h('option', { value: x.id }, modelLabel(x, stats.get(x.id)))));
      if (models.some((x) => x.id === keep)) modelSelect.value = keep;
      if (!models.length) modelSelect.append(h('option', { value: '' }, 'No model online'));
    } catch (e) {
      replace(modelSelect, h('option', { value: '' }, 'Models unavailable'));
      replace(status, e.message);
    }
    renderMessages();
  }

  // ---- history ----
  async function loadHistory() {
    const area = aside.querySelector('#history-area');
    if (!signedIn()) { replace(area); return; }
    if (!keepHistory()) {
      replace(area, h('p', { class: 'small muted' }, 'History is off: conversations are not stored. ',
        h('a', { href: '#/account' }, 'Turn it on'), ' to keep them.'));
      return;
    }
    try {
      const r = await api('/lattice/v1/history');
      conversations = r.data || [];
      replace(convList, conversations.map((c) => h('li', { class: c.id === conv.id ? 'active' : '' },
        h('button', { type: 'button', class: 'open', title: c.title, onclick: () => openConversation(c.id) }, c.title || 'Untitled'),
        h('button', { type: 'button', class: 'ghost', 'aria-label': `Delete conversation “${c.title}”`, title: 'Delete', onclick: () => deleteConversation(c) }, '✕'))));
      replace(area, conversations.length ? convList : h('p', { class: 'small muted' }, 'No saved conversations yet.'));
    } catch (e) {
      replace(area, errorBox(e));
    }
  }

  /** Nexus stores an exchange just after answering: reload the list until it shows `id`. */
  async function historyShows(id, tries = 5) {
    await loadHistory();
    if (tries > 1 && !stopped && !conversations.some((c) => c.id === id)) {
      setTimeout(() => historyShows(id, tries - 1), 700);
    }
  }

  async function openConversation(id) {
    if (controller) return;
    try {
      const r = await api(`/lattice/v1/history/${encodeURIComponent(id)}`);
      conv = { id, stored: true, messages: r.messages.map((m) => ({ role: m.role, content: m.content, meta: { stored: m.created_at } })) };
      renderMessages();
      loadHistory();
    } catch (e) {
      replace(status, e.message);
    }
  }

  async function deleteConversation(c) {
    if (!confirm(`Delete “${c.title}”? This cannot be undone.`)) return;
    try {
      await api(`/lattice/v1/history/${encodeURIComponent(c.id)}`, { method: 'DELETE' });
      if (conv.id === c.id) newChat();
      replace(status, 'Conversation deleted.');
      loadHistory();
    } catch (e) {
      replace(status, e.message);
    }
  }

  function newChat() {
    if (controller) stop();
    conv = { id: newId(), messages: [], stored: false };
    renderMessages();
    loadHistory();
    input.focus();
  }

  // ---- messages ----
  function metaLine(m, index) {
    const meta = m.meta || {};
    const bits = [];
    if (meta.stopped) bits.push(h('span', { class: 'badge warn' }, 'Stopped · not charged'));
    if (meta.node) {
      const n = nodesByAddr.get(meta.node);
      bits.push(h('span', { class: 'node', title: meta.node }, 'Node ', h('span', { class: 'mono' }, n?.label || shortAddr(meta.node))));
    }
    if (meta.usage) bits.push(h('span', {}, `${num(meta.usage.prompt_tokens)} + ${num(meta.usage.completion_tokens)} tokens`));
    if (meta.cost !== undefined && meta.cost !== null) bits.push(h('span', { class: 'cost', 'data-units': String(meta.cost) }, lai(meta.cost, 9)));
    if (meta.seconds) bits.push(h('span', {}, `${meta.seconds.toFixed(1)} s`));
    if (meta.stored) bits.push(h('span', {}, ago(meta.stored)));
    const last = index === conv.messages.length - 1;
    const actions = h('span', { class: 'actions' },
      m.content ? copyButton(() => m.content) : null,
      last && !controller ? h('button', { type: 'button', class: 'ghost', id: 'regenerate', onclick: () => regenerate() }, '↻ Regenerate') : null);
    actions.querySelectorAll('button').forEach((b) => b.classList.add('ghost'));
    return h('div', { class: 'meta' }, bits, actions);
  }

  function messageEl(m, index) {
    if (m.role === 'user') {
      return h('div', { class: 'msg user' }, h('div', { class: 'who' }, 'You'), h('div', { class: 'body', text: m.content }));
    }
    const body = h('div', { class: 'body' });
    body.append(render(m.content));
    if (m.streaming) body.classList.add('cursor');
    const el = h('div', { class: 'msg assistant', 'data-index': String(index) },
      h('div', { class: 'who' }, 'Assistant'), body);
    if (m.error) el.append(m.error);
    if (!m.streaming) el.append(metaLine(m, index));
    return el;
  }

  function renderMessages() {
    if (!signedIn()) {
      replace(messagesEl, emptyState('Sign in to chat',
        'Answers are served by nodes on the network and paid per token. New accounts get free credit.',
        h('a', { class: 'button primary', href: '#/signin' }, 'Sign in')));
      input.disabled = true;
      sendBtn.disabled = true;
      return;
    }
    input.disabled = false;
    if (!controller) sendBtn.disabled = false;
    if (!conv.messages.length) {
      replace(messagesEl, models.length
        ? emptyState('Start a conversation', `Ask ${modelSelect.value || 'a model'} anything. Each answer shows the node that served it and what it cost.`)
        : emptyState('No model is online', 'No node is serving a model right now.', h('a', { class: 'button', href: '#/node' }, 'Run a node')));
      return;
    }
    replace(messagesEl, conv.messages.map(messageEl));
    messagesEl.scrollTop = messagesEl.scrollHeight;
  }

  let frame = 0;
  function renderSoon() {
    if (frame) return;
    frame = requestAnimationFrame(() => { frame = 0; renderMessages(); });
  }

  function errorFor(e) {
    let extra = null;
    if (e.status === 402) extra = h('a', { href: '#/account' }, 'See your balance');
    else if (e.status === 401) extra = h('a', { href: '#/signin' }, 'Sign in');
    else if (e.status === 429 || e.status === 503) extra = h('span', {}, 'Wait a moment and regenerate.');
    return errorBox(e, extra);
  }

  async function ask() {
    const model = modelSelect.value;
    if (!model) {
      replace(status, 'No model is online: run a node or wait for one to join.');
      return;
    }
    const history = conv.messages.filter((m) => !m.error).map(({ role, content }) => ({ role, content }));
    const answer = { role: 'assistant', content: '', streaming: true, meta: {} };
    conv.messages.push(answer);
    controller = new AbortController();
    setStreaming(true);
    replace(status, 'Generating…');
    renderMessages();
    const started = performance.now();
    try {
      const r = await streamChat({
        model, messages: history, preference: prefSelect.value,
        conversation: keepHistory() ? conv.id : null, signal: controller.signal,
      }, (text) => { answer.content += text; renderSoon(); });
      if (r.node && !nodesByAddr.has(r.node)) {
        try {
          const n = await api('/lattice/v1/nodes');
          nodesByAddr = new Map((n.online || []).map((x) => [x.address, x]));
        } catch { /* the cost is shown when known */ }
      }
      answer.meta = {
        node: r.node, usage: r.usage, seconds: (performance.now() - started) / 1000,
        cost: r.node ? cost(r.usage, nodesByAddr.get(r.node)?.price) : null,
      };
      replace(status, r.finish === 'length' ? 'The answer reached its length limit.' : '');
    } catch (e) {
      if (e.name === 'AbortError') {
        answer.meta = { stopped: true, seconds: (performance.now() - started) / 1000 };
        replace(status, 'Stopped. The node was told to stop; nothing is charged for a stopped answer.');
      } else {
        answer.error = errorFor(e);
        replace(status, '');
      }
    } finally {
      answer.streaming = false;
      controller = null;
      setStreaming(false);
      renderMessages();
      ctx.refreshAccount();
      if (keepHistory()) historyShows(conv.id);
    }
  }

  function send() {
    const text = input.value.trim();
    if (!text || controller || !signedIn()) return;
    input.value = '';
    conv.messages.push({ role: 'user', content: text });
    ask();
  }

  function regenerate() {
    if (controller) return;
    const last = conv.messages[conv.messages.length - 1];
    if (last?.role === 'assistant') conv.messages.pop();
    if (conv.messages[conv.messages.length - 1]?.role === 'user') ask();
  }

  function stop() {
    if (controller) controller.abort();
  }

  renderMessages();
  await loadModels();
  loadHistory();
  input.focus();
  const poll = setInterval(() => { if (!controller && !document.hidden) loadModels(); }, 15000);
  return () => {
    stopped = true;
    clearInterval(poll);
    stop();
  };
}
