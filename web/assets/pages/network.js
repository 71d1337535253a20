// Network explorer: the online nodes (model, kind, label, health, load, speed, price,
// reputation, uptime) and totals, refreshed every 2 s without reloading; nodes seen before that
// are offline now; each node on-chain (stake, active flag, reputation, earnings, staking pool and
// its expected APY); and the settlement batches on the chain, when Nexus settles to one.

import { api, request } from '../api.js';
import { h, replace, errorBox, emptyState } from '../dom.js';
import { lai, num, shortAddr, duration, ago, date, apy, bps } from '../format.js';

const POLL_MS = 2000;

function health(n) {
  const open = n.models.filter((m) => m.circuit !== 'closed');
  if (!n.models.some((m) => m.admitted)) {
    const held = n.models.filter((m) => m.held);
    if (held.length) {
      const why = `${held.map((m) => m.id).join(', ')}: other nodes serve this id as another kind (text or embeddings)`;
      return h('span', { class: 'badge warn', title: why }, 'Held');
    }
    return h('span', { class: 'badge warn' }, 'Calibrating');
  }
  if (open.length) return h('span', { class: 'badge bad', title: open.map((m) => `${m.id}: ${m.circuit}`).join(', ') }, 'Failing');
  return h('span', { class: 'badge ok' }, 'Healthy');
}

function meter(fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  const bar = h('span');
  bar.style.width = `${pct}%`;
  return h('span', { class: 'meter', role: 'img', 'aria-label': label }, bar);
}

/** Sums of the counters in Nexus's Prometheus text (`/metrics`). */
function counters(text) {
  let requests = 0;
  let tokens = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith('lattice_nexus_requests_total{') && /(status|outcome)="ok"/.test(line)) {
      requests += Number(line.split(' ').pop()) || 0;
    } else if (line.startsWith('lattice_nexus_completion_tokens_total')) {
      tokens += Number(line.split(' ').pop()) || 0;
    }
  }
  return { requests, tokens, at: performance.now() };
}

function stat(label, value, sub, id) {
  return h('div', { class: 'stat', id }, h('div', { class: 'label' }, label), h('div', { class: 'value' }, value), sub ? h('div', { class: 'sub' }, sub) : null);
}

export async function mount(root, ctx) {
  const statsEl = h('div', { class: 'stats', id: 'totals' });
  const nodesEl = h('div', { id: 'nodes' }, h('p', { class: 'loading' }, 'Loading nodes…'));
  const knownEl = h('div', { id: 'known' });
  const chainEl = h('div', { id: 'chain' }, h('p', { class: 'loading' }, 'Loading…'));
  const onchainEl = h('div', { id: 'onchain-nodes' }, h('p', { class: 'loading' }, 'Loading…'));
  const live = h('span', { class: 'pill', id: 'live', 'aria-live': 'polite' }, h('span', { class: 'dot' }), 'Connecting…');
  replace(root,
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, 'Network'), h('p', {}, 'Every node serving models through this Nexus, live.')),
      live),
    statsEl,
    h('section', { class: 'card', 'aria-labelledby': 'nodes-h' }, h('h2', { id: 'nodes-h' }, 'Online nodes'), nodesEl),
    knownEl,
    h('section', { class: 'card', 'aria-labelledby': 'onchain-h' }, h('h2', { id: 'onchain-h' }, 'Nodes on-chain'), onchainEl),
    h('section', { class: 'card', 'aria-labelledby': 'chain-h' }, h('h2', { id: 'chain-h' }, 'Settlement'), chainEl));
  const labels = new Map(); // address → label, from /lattice/v1/nodes

  const samples = []; // counters over the last minute, for rates
  let timer = null;
  let stopped = false;
  let chainTick = 0;

  function renderTotals(online) {
    const models = new Set(online.flatMap((n) => n.models.filter((m) => m.admitted).map((m) => m.id)));
    const slots = online.reduce((a, n) => a + n.slots, 0);
    const busy = online.reduce((a, n) => a + Math.min(n.busy, n.slots), 0);
    const queued = online.reduce((a, n) => a + n.queued, 0);
    let rpm = null;
    let tps = null;
    let span = '';
    if (samples.length >= 2) {
      const a = samples[0];
      const b = samples[samples.length - 1];
      const secs = (b.at - a.at) / 1000;
      if (secs > 0) {
        rpm = ((b.requests - a.requests) / secs) * 60;
        tps = (b.tokens - a.tokens) / secs;
        span = secs >= 59 ? 'last minute' : `last ${Math.round(secs)} s`;
      }
    }
    replace(statsEl,
      stat('Active nodes', num(online.length), `${models.size} model${models.size === 1 ? '' : 's'}`, 'stat-nodes'),
      stat('Requests / min', rpm === null ? '—' : num(rpm, 1), span || 'measuring…', 'stat-rpm'),
      stat('Tokens / s', tps === null ? '—' : num(tps, 1), span ? `generated, ${span}` : 'measuring…', 'stat-tps'),
      stat('Slots busy', `${busy} / ${slots}`, queued ? `${queued} queued` : 'none queued', 'stat-slots'),
      stat('Served', num(online.reduce((a, n) => a + n.served, 0)), 'requests by online nodes', 'stat-served'));
  }

  function renderNodes(online) {
    if (!online.length) {
      replace(nodesEl, emptyState('No node is online', 'Nodes appear here as soon as they link to Nexus.',
        h('a', { class: 'button primary', href: '#/node' }, 'Run a node')));
      return;
    }
    const rows = online.map((n) => h('tr', { 'data-address': n.address },
      h('td', { title: n.address }, h('div', {}, h('strong', {}, n.label || shortAddr(n.address))),
        n.label ? h('div', { class: 'small muted mono' }, shortAddr(n.address)) : null,
        n.owner ? h('div', { class: 'small muted owner', 'data-owner': n.owner, title: `Operated by ${n.owner} (bound by a node token)` },
          n.owner === ctx?.account?.user?.address?.toLowerCase() ? 'Your node' : `Operator ${shortAddr(n.owner)}`) : null),
      h('td', {}, n.models.map((m) => h('div', {}, m.id))),
      h('td', {}, n.kind.toUpperCase()),
      h('td', { class: 'health' }, health(n)),
      h('td', {}, meter(n.slots ? n.busy / n.slots : 0, `${n.busy} of ${n.slots} slots busy`), `${n.busy}/${n.slots}`, n.queued ? h('span', { class: 'muted' }, ` +${n.queued}`) : null),
      h('td', { class: 'num' }, h('div', {}, n.decode_tps ? `${num(n.decode_tps, 1)} tok/s` : '—'),
        h('div', { class: 'small muted' }, n.ttft_ms ? `${num(n.ttft_ms)} ms to first` : '')),
      h('td', { class: 'num' }, `${lai(n.price.input_per_mtok, 4).replace(' LAI', '')} / ${lai(n.price.output_per_mtok, 4).replace(' LAI', '')}`),
      h('td', {}, meter(n.reputation, `reputation ${num(n.reputation, 2)}`), num(n.reputation, 2)),
      h('td', { class: 'num' }, h('div', {}, `${num(n.served)} served`),
        h('div', { class: 'small muted' }, `up ${duration(n.uptime_s)}${n.failed ? ` · ${num(n.failed)} failed` : ''}`))));
    const labels = ['Node', 'Models', 'Kind', 'Health', 'Load', 'Speed', 'Price in/out (LAI/1M)', 'Reputation', 'Activity'];
    for (const tr of rows) [...tr.children].forEach((td, i) => td.setAttribute('data-label', labels[i]));
    replace(nodesEl, h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Online nodes' },
      h('table', { class: 'cards' },
        h('thead', {}, h('tr', {},
          labels.map((t, i) => h('th', { scope: 'col', class: [5, 6, 8].includes(i) ? 'num' : '' }, t)))),
        h('tbody', {}, rows))));
  }

  function renderKnown(online, known) {
    const on = new Set(online.map((n) => n.address));
    const offline = known.filter((k) => !on.has(k.address));
    if (!offline.length) { replace(knownEl); return; }
    replace(knownEl, h('section', { class: 'card', 'aria-labelledby': 'known-h' },
      h('h2', { id: 'known-h' }, 'Offline nodes'),
      h('p', { class: 'muted small' }, 'Seen by this Nexus before; they come back with their reputation when they reconnect.'),
      h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Offline nodes' },
        h('table', {}, h('thead', {}, h('tr', {}, ['Node', 'Models', 'Reputation', 'Last seen'].map((t) => h('th', { scope: 'col' }, t)))),
          h('tbody', {}, offline.map((k) => h('tr', { 'data-address': k.address },
            h('td', { title: k.address }, h('span', { class: 'dot down', 'aria-hidden': 'true' }), ' ', h('strong', {}, k.label || shortAddr(k.address)), k.label ? h('div', { class: 'small muted mono' }, shortAddr(k.address)) : null),
            h('td', {}, k.models.join(', ')),
            h('td', {}, num(k.reputation, 2)),
            h('td', {}, ago(k.last_seen)))))))));
  }

  async function loadOnchain() {
    try {
      const r = await api('/lattice/v1/chain/nodes');
      const data = r.data || [];
      if (!data.length) {
        replace(onchainEl, h('p', { class: 'muted' }, 'No node has linked to this Nexus yet.'));
        return;
      }
      const cols = ['Node', 'On-chain status', 'Stake', 'Reputation (last epoch)', 'Earnings to withdraw', 'Staking pool', 'Expected APY'];
      const rows = data.map((n) => {
        const status = !n.registered ? h('span', { class: 'badge' }, 'Not registered')
          : n.active ? h('span', { class: 'badge ok' }, 'Active') : h('span', { class: 'badge bad' }, 'Inactive');
        const tr = h('tr', { 'data-address': n.address },
          h('td', { title: n.address }, h('strong', {}, labels.get(n.address) || shortAddr(n.address)),
            labels.get(n.address) ? h('div', { class: 'small muted mono' }, shortAddr(n.address)) : null),
          h('td', { class: 'chain-status' }, status),
          h('td', { class: 'num chain-stake', 'data-units': n.stake }, lai(n.stake, 2)),
          h('td', { class: 'num' }, n.registered ? bps(n.reputation_bps) : '—'),
          h('td', { class: 'num', 'data-units': n.earnings }, lai(n.earnings, 6)),
          h('td', { class: 'num chain-pool', 'data-units': n.pool.staked }, lai(n.pool.staked, 2)),
          h('td', { class: 'num chain-apy', title: `the pool's ${n.pool.pool_bps / 100} % of ${lai(n.pool.charges, 9)} paid to this node in ${n.pool.window_days} days, annualised over its stake` },
            apy(n.pool.expected_apy)));
        [...tr.children].forEach((td, i) => td.setAttribute('data-label', cols[i]));
        return tr;
      });
      replace(onchainEl,
        h('p', { class: 'muted small' }, `Read from chain ${r.chain.chain_id}. A node needs at least ${lai(r.min_stake)} staked to be admitted; reputation is posted on-chain once per epoch. `,
          'Expected APY: the pool’s share of what users paid the node over the last 7 days, annualised, over what is staked in the pool (— when nothing is). ',
          h('a', { href: '#/node' }, 'Stake into a pool')),
        h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Nodes on-chain' },
          h('table', { class: 'cards' }, h('thead', {}, h('tr', {}, cols.map((t, i) => h('th', { scope: 'col', class: i >= 2 ? 'num' : '' }, t)))),
            h('tbody', {}, rows))));
    } catch (e) {
      replace(onchainEl, e.status === 404
        ? h('p', { class: 'muted' }, 'This Nexus is not connected to a chain: nodes have no stake or pool.')
        : errorBox(e));
    }
  }

  async function loadChain() {
    try {
      const c = await api('/lattice/v1/chain');
      const batches = c.batches || [];
      const rec = c.reconciliation;
      replace(chainEl,
        h('div', { class: 'stats' },
          stat('Chain', String(c.chain_id), c.block !== null && c.block !== undefined ? `block ${num(c.block)}` : 'block unknown'),
          stat('Pending batches', num(c.pending_batches), 'recorded, not yet confirmed'),
          rec ? stat('Reconciliation', rec.mismatches?.length ? `${rec.mismatches.length} mismatch${rec.mismatches.length === 1 ? '' : 'es'}` : 'OK', `ledger vs chain${rec.at ? `, ${ago(rec.at)}` : ''}`) : null),
        batches.length
          ? h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Settlement batches' },
            h('table', {}, h('thead', {}, h('tr', {}, ['Batch', 'Kind', 'Entries', 'Total', 'Status', 'Created', 'Transaction'].map((t, i) => h('th', { scope: 'col', class: i === 2 || i === 3 ? 'num' : '' }, t)))),
              h('tbody', {}, batches.map((b) => h('tr', {},
                h('td', {}, `#${b.seq ?? b.id}`),
                h('td', {}, b.kind),
                h('td', { class: 'num' }, num(Array.isArray(b.entries) ? b.entries.length : b.entries)),
                h('td', { class: 'num' }, lai(b.total)),
                h('td', {}, b.confirmed ? h('span', { class: 'badge ok' }, 'Confirmed') : h('span', { class: 'badge warn' }, 'Pending')),
                h('td', {}, typeof b.created_at === 'number' ? date(b.created_at) : String(b.created_at ?? '—')),
                h('td', { class: 'mono small', title: b.tx_hash || '' }, b.tx_hash ? shortAddr(b.tx_hash) : '—'))))))
          : h('p', { class: 'muted' }, 'No settlement batch yet: charges are settled on-chain in batches.'));
    } catch (e) {
      if (e.status === 404) {
        replace(chainEl, h('p', { class: 'muted', id: 'no-chain' }, 'This Nexus is not connected to a chain: payments stay in its own ledger.'));
      } else {
        replace(chainEl, errorBox(e));
      }
    }
  }

  async function tick() {
    try {
      const [n, m] = await Promise.all([
        api('/lattice/v1/nodes'),
        request('/metrics').then((r) => r.text()).catch(() => null),
      ]);
      if (stopped) return;
      if (m) {
        samples.push(counters(m));
        while (samples.length > 2 && samples[samples.length - 1].at - samples[0].at > 60000) samples.shift();
      }
      const online = n.online || [];
      for (const x of [...(n.known || []), ...online]) if (x.label) labels.set(x.address.toLowerCase(), x.label);
      renderTotals(online);
      renderNodes(online);
      renderKnown(online, n.known || []);
      replace(live, h('span', { class: 'dot live', 'aria-hidden': 'true' }), `Live · ${new Date().toLocaleTimeString('en-GB')}`);
      live.setAttribute('aria-live', 'off');
    } catch (e) {
      if (stopped) return;
      replace(live, h('span', { class: 'dot down', 'aria-hidden': 'true' }), e.offline ? 'Connection lost — retrying' : 'Update failed — retrying');
      if (!nodesEl.querySelector('table')) replace(nodesEl, errorBox(e));
    }
    if (chainTick++ % 3 === 0) await Promise.all([loadChain(), loadOnchain()]);
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  }

  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
