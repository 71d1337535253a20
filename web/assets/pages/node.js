// Run a node: pick a model and a price, create a pre-registered node token (shown once, inside
// the one-line command), copy the command, and watch "Your nodes" — the nodes bound to your
// tokens — link, pass calibration and earn (off-chain earnings, stake on-chain); revoke a token.
// Signed out, the page watches for the first new node instead. Then stake into a node's pool:
// its expected APY, the exact calls, and with an injected EIP-1193 wallet on an RPC chain, the
// two transactions sent from the wallet.

import { api } from '../api.js';
import { h, replace, copyButton, errorBox } from '../dom.js';
import { lai, parseLai, num, shortAddr, apy, bps, ago } from '../format.js';

// `lattice model catalog`: the models known by name (any GGUF works with hf:OWNER/REPO/FILE.gguf).
const CATALOG = [
  ['smollm2-135m', 'SmolLM2 135M Instruct — chat, tiny, runs anywhere'],
  ['gemma3-270m', 'Gemma 3 270M — text completion'],
];

function shellQuote(s) {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, "'\\''")}'`;
}

const STATUS = {
  calibrating: ['warn', 'Calibrating…'],
  healthy: ['ok', 'Healthy'],
  unhealthy: ['error', 'Failing probes'],
  offline: ['', 'Offline'],
};

export async function mount(root, ctx) {
  const signedIn = () => Boolean(ctx?.account);
  let token = null; // {id, secret, label}: the token just created, shown once in the command
  const model = h('select', { id: 'node-model' }, CATALOG.map(([id, d]) => h('option', { value: id }, `${id} — ${d.split(' — ')[1]}`)),
    h('option', { value: 'other' }, 'Another GGUF model…'));
  const other = h('input', { id: 'node-model-other', placeholder: 'hf:OWNER/REPO/FILE.gguf or a local path', hidden: true, 'aria-label': 'Model (Hugging Face file or path)' });
  const priceIn = h('input', { id: 'price-in', inputmode: 'decimal', value: '0.1', 'aria-describedby': 'price-hint' });
  const priceOut = h('input', { id: 'price-out', inputmode: 'decimal', value: '0.2', 'aria-describedby': 'price-hint' });
  const label = h('input', { id: 'node-label', placeholder: 'optional, e.g. ada-laptop', maxlength: '64' });
  const cmd = h('code', { id: 'node-command' });
  const problem = h('div', { 'aria-live': 'polite' });
  const watchEl = h('div', { id: 'node-watch' }, h('p', { class: 'muted' }, 'Looking for new nodes…'));
  const tokenEl = h('div', { id: 'node-token', 'aria-live': 'polite' });
  const myNodesEl = h('div', { id: 'my-nodes' }, h('p', { class: 'loading' }, 'Loading your nodes…'));
  const tokensEl = h('div', { id: 'node-tokens' });
  const tokenMsg = h('div', { id: 'node-token-msg', 'aria-live': 'polite' });
  const stakeEl = h('div', { id: 'stake' }, h('p', { class: 'loading' }, 'Loading pools…'));
  const stakeNode = h('select', { id: 'stake-node' });
  const stakeAmount = h('input', { id: 'stake-amount', inputmode: 'decimal', value: '10', 'aria-describedby': 'stake-hint' });
  const stakeOut = h('div', { id: 'stake-out', 'aria-live': 'polite' });
  const walletOut = h('div', { id: 'wallet-out', 'aria-live': 'polite' });
  let pools = null;

  function command() {
    const m = model.value === 'other' ? other.value.trim() : model.value;
    const pin = parseLai(priceIn.value);
    const pout = parseLai(priceOut.value);
    replace(problem);
    if (!m) { replace(problem, h('p', { class: 'notice warn' }, 'Enter a model.')); return null; }
    if (pin === null || pout === null) { replace(problem, h('p', { class: 'notice warn' }, 'Prices are amounts of LAI per million tokens, like 0.1.')); return null; }
    const parts = ['lattice', 'node', '--nexus', location.origin, '--model', shellQuote(m), '--price-in', pin.toString(), '--price-out', pout.toString()];
    if (label.value.trim()) parts.push('--label', shellQuote(label.value.trim()));
    if (token) parts.push('--token', token.secret);
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
        tokenEl,
        h('div', { class: 'command' }, cmd, copyButton(() => cmd.textContent)),
        h('p', { class: 'muted small' }, 'With a chain, a node is admitted once it is active on-chain with the minimum stake; on a local network (', h('code', {}, 'lattice up'),
          ') the operator stakes it for you.'))),
    signedIn()
      ? h('section', { class: 'card', 'aria-labelledby': 'mine-h' }, h('h2', { id: 'mine-h' }, '3. Your nodes'), myNodesEl,
        h('h3', {}, 'Node tokens'), tokenMsg, tokensEl)
      : h('section', { class: 'card', 'aria-labelledby': 'watch-h' }, h('h2', { id: 'watch-h' }, '3. Watch it join'), watchEl),
    h('section', { class: 'card', 'aria-labelledby': 'stake-h' }, h('h2', { id: 'stake-h' }, '4. Stake into a node’s pool'), stakeEl));
  renderTokenArea();
  update();
  loadPools();
  const poolTimer = setInterval(() => { if (!document.hidden) loadPools(); }, 6000);

  const labels = new Map();
  let poolsShown = '';
  async function loadPools() {
    try {
      const [p, n] = await Promise.all([api('/lattice/v1/chain/nodes'), api('/lattice/v1/nodes').catch(() => null)]);
      pools = p;
      for (const x of [...(n?.known || []), ...(n?.online || [])]) if (x.label) labels.set(x.address.toLowerCase(), x.label);
    } catch (e) {
      replace(stakeEl, e.status === 404
        ? h('p', { class: 'muted', id: 'stake-no-chain' }, 'This Nexus is not connected to a chain: there are no staking pools.')
        : errorBox(e));
      return;
    }
    const nodes = (pools.data || []).filter((n) => n.registered);
    if (!nodes.length) {
      replace(stakeEl, h('p', { class: 'muted' }, 'No node is registered on-chain yet: pools appear with their nodes.'));
      return;
    }
    // Refreshed every few seconds: only redrawn when something changed, keeping the selection.
    const key = JSON.stringify(nodes) + [...labels].join();
    if (key === poolsShown) return;
    const first = !poolsShown;
    poolsShown = key;
    const selected = stakeNode.value;
    replace(stakeNode, nodes.map((n) => h('option', { value: n.address, selected: n.address === selected },
      `${labels.get(n.address) ? `${labels.get(n.address)} (${shortAddr(n.address)})` : shortAddr(n.address)} — pool ${lai(n.pool.staked, 2)}, expected APY ${apy(n.pool.expected_apy)}`)));
    if (!first) { renderStake(true); return; }
    replace(stakeEl,
      h('p', { class: 'small' }, 'Stakers share each node’s pool income: ', h('strong', {}, `${(nodes[0].pool.pool_bps / 100)} %`),
        ' of everything users pay the node, in proportion to their stake. The expected APY is that share of what users paid the node over the last 7 days, annualised, over what is staked in the pool now: an estimate from recent traffic, not a promise. With nothing staked there is no APY to show (—).'),
      h('div', { class: 'row' },
        h('div', { class: 'field' }, h('label', { for: 'stake-node' }, 'Node'), stakeNode),
        h('div', { class: 'field' }, h('label', { for: 'stake-amount' }, 'Amount (LAI)'), stakeAmount)),
      h('p', { class: 'hint muted small', id: 'stake-hint' }, 'Staking is an on-chain transaction signed by the staker’s own wallet: Nexus cannot stake your off-chain credit.'),
      stakeOut, walletOut);
    renderStake();
  }

  async function renderStake(refresh = false) {
    if (refresh !== true) replace(walletOut);
    const node = (pools?.data || []).find((n) => n.address === stakeNode.value);
    const units = parseLai(stakeAmount.value);
    if (!node) return;
    if (units === null || units === 0n) {
      replace(stakeOut, h('p', { class: 'notice warn' }, 'Enter an amount of LAI, like 10.'));
      return;
    }
    let calls;
    try {
      calls = await api(`/lattice/v1/chain/calls/stake?to=${node.address}&amount=${units}`);
    } catch (e) {
      replace(stakeOut, errorBox(e));
      return;
    }
    const whole = stakeAmount.value.trim();
    const cli = `lattice chain stake ${node.address} ${/^\d+$/.test(whole) ? whole : '10'}`;
    const embedded = pools.chain.kind === 'embedded';
    replace(stakeOut,
      h('dl', { class: 'kv small', id: 'stake-pool' },
        h('dt', {}, 'Staked in the pool'), h('dd', { 'data-units': node.pool.staked }, lai(node.pool.staked, 6)),
        h('dt', {}, 'Paid to the node, 7 days'), h('dd', {}, lai(node.pool.charges, 9)),
        h('dt', {}, 'The pool’s share'), h('dd', {}, lai(node.pool.income, 9)),
        h('dt', {}, 'Expected APY'), h('dd', { id: 'stake-apy' }, apy(node.pool.expected_apy))),
      h('h3', {}, 'From a wallet'),
      h('p', { class: 'small' }, `Send these two transactions on chain ${calls.chain_id}, in order (amount = ${calls.amount} units, ${lai(calls.amount)}):`),
      h('ol', { class: 'small calls', id: 'stake-calls' }, calls.transactions.map((t, i) => h('li', {},
        h('code', {}, i === 0 ? `approve(${pools.chain.tokenomics}, amount)` : `stake(${node.address}, amount)`),
        i === 0 ? ' to the LAI token ' : ' to Tokenomics ', h('code', {}, t.to),
        h('details', {}, h('summary', {}, 'calldata'), h('code', { class: 'calldata' }, t.data))))),
      h('p', { class: 'muted small' }, 'Later: ', h('code', {}, 'Tokenomics.claim(node)'), ' pays your share of the pool income, ', h('code', {}, 'Tokenomics.unstake(node, amount)'), ' takes the stake back.'),
      embedded
        ? h('p', { class: 'muted small', id: 'wallet-none' }, 'This Nexus runs its chain inside its own process, with no RPC endpoint a wallet could send to. On this local network the operator can stake test LAI instead (stop Nexus first, then start it again):')
        : null,
      embedded ? h('div', { class: 'command' }, h('code', { id: 'stake-command' }, cli), copyButton(() => cli)) : null,
      !embedded && window.ethereum
        ? h('button', { type: 'button', class: 'primary', id: 'stake-wallet', onclick: () => stakeWithWallet(calls) }, `Stake ${lai(units)} with your wallet`)
        : null,
      !embedded && !window.ethereum ? h('p', { class: 'muted small' }, 'With a browser wallet (an injected EIP-1193 provider) this page can send them for you.') : null);
  }

  async function stakeWithWallet(calls) {
    const eth = window.ethereum;
    try {
      const [from] = await eth.request({ method: 'eth_requestAccounts' });
      const chainId = parseInt(await eth.request({ method: 'eth_chainId' }), 16);
      if (chainId !== calls.chain_id) {
        replace(walletOut, h('div', { class: 'notice warn', role: 'alert' }, `Your wallet is on chain ${chainId}; switch it to chain ${calls.chain_id} and try again.`));
        return;
      }
      const hashes = [];
      for (const [i, t] of calls.transactions.entries()) {
        replace(walletOut, h('p', { class: 'muted' }, `Confirm transaction ${i + 1} of 2 in your wallet (${t.call})…`));
        hashes.push(await eth.request({ method: 'eth_sendTransaction', params: [{ from, to: t.to, data: t.data }] }));
      }
      replace(walletOut, h('div', { class: 'notice ok', id: 'stake-sent' }, 'Sent: ', hashes.map((x) => h('code', { title: x }, shortAddr(x))).flatMap((c, i) => (i ? [', ', c] : [c])),
        '. The pool shows your stake once they are mined.'));
      setTimeout(loadPools, 5000);
    } catch (e) {
      replace(walletOut, h('div', { class: 'notice error', role: 'alert' }, `The wallet did not send it: ${e?.message || e}`));
    }
  }
  stakeNode.addEventListener('change', () => renderStake());
  stakeAmount.addEventListener('input', () => renderStake());

  function renderTokenArea() {
    if (!signedIn()) {
      replace(tokenEl, h('p', { class: 'small' }, h('a', { href: '#/signin' }, 'Sign in'),
        ' to create a node token: the command then carries it, and the node is listed as yours with its earnings and stake.'));
      return;
    }
    if (token) {
      replace(tokenEl, h('div', { class: 'notice ok', id: 'node-token-created' },
        h('p', {}, h('strong', {}, `Node token${token.label ? ` “${token.label}”` : ''} created`), ' and added to the command below (',
          h('code', {}, '--token'), '). Copy the command now: the token is not shown again.'),
        h('p', { class: 'small muted' }, 'It binds the first node that registers with it to your account; another node presenting it is refused. For scripts, ',
          h('code', {}, 'LATTICE_NODE_TOKEN'), ' works too.')));
      return;
    }
    replace(tokenEl, h('p', { class: 'small' },
      h('button', { type: 'button', class: 'primary', id: 'create-node-token', onclick: createToken }, 'Create node token'),
      ' A pre-registered token in the command makes the node yours: it appears under “Your nodes” with its earnings and stake.'));
  }

  async function createToken() {
    const btn = tokenEl.querySelector('#create-node-token');
    if (btn) btn.disabled = true;
    try {
      const body = label.value.trim() ? { label: label.value.trim().slice(0, 64) } : {};
      const t = await api('/lattice/v1/account/node-tokens', { method: 'POST', body });
      token = { id: t.id, secret: t.secret, label: t.label };
      renderTokenArea();
      update();
      loadMine();
    } catch (e) {
      replace(tokenEl, errorBox(e));
      setTimeout(() => { if (!token) renderTokenArea(); }, 4000);
    }
  }

  async function revokeToken(t) {
    const name = t.label || t.prefix;
    if (!confirm(`Revoke node token “${name}”? ${t.node_address ? 'Its node is disconnected and refused from now on.' : 'No node can register with it any more.'}`)) return;
    try {
      await api(`/lattice/v1/account/node-tokens/${encodeURIComponent(t.id)}`, { method: 'DELETE' });
      if (token?.id === t.id) { token = null; renderTokenArea(); update(); }
      replace(tokenMsg, h('div', { class: 'notice', id: 'node-token-revoked' }, `Node token “${name}” revoked.${t.node_address ? ` Node ${shortAddr(t.node_address)} was disconnected and is refused when it reconnects.` : ''}`));
      loadMine();
    } catch (e) {
      replace(tokenMsg, errorBox(e));
    }
  }

  let mineShown = '';
  let mineError = false;
  async function loadMine() {
    if (!signedIn()) return;
    let nodes;
    let tokens;
    try {
      [nodes, tokens] = await Promise.all([api('/lattice/v1/account/nodes'), api('/lattice/v1/account/node-tokens')]);
    } catch (e) {
      // Keep the last list; say what went wrong above it.
      mineError = true;
      const last = myNodesEl.querySelector('#my-nodes-list');
      replace(myNodesEl, errorBox(e, 'Retrying…'), last);
      return;
    }
    const key = JSON.stringify([nodes, tokens]);
    if (key === mineShown && !mineError) return;
    mineShown = key;
    mineError = false;
    const data = nodes.data || [];
    if (!data.length) {
      replace(myNodesEl, h('div', { class: 'empty small', id: 'my-nodes-empty' },
        h('p', {}, token
          ? h('span', {}, h('span', { class: 'dot' }), ' Waiting for your node to link: run the command above.')
          : 'No nodes yet. Create a node token, run the command on your machine, and your node appears here as soon as it links.')));
    } else {
      const cols = ['Node', 'Status', 'Served', 'Earned (off-chain)', 'Staking pool', 'Stake on-chain', 'Last seen'];
      const rows = data.map((n) => {
        const [cls, text] = STATUS[n.status] || ['', n.status];
        const stake = n.stake
          ? h('span', {}, n.stake.active ? h('span', { class: 'badge ok' }, 'Active') : h('span', { class: 'badge warn' }, 'Not active'), ` ${lai(n.stake.stake, 2)}`,
            h('div', { class: 'small muted' }, `pool ${lai(n.stake.pool_staked, 2)} · reputation ${bps(n.stake.reputation_bps)} · ${lai(n.stake.earnings, 9)} to withdraw`))
          : h('span', { class: 'muted' }, n.stake_error ? `Unavailable: ${n.stake_error}` : (nodes.chain ? '—' : 'No chain'));
        const tr = h('tr', { 'data-address': n.address, 'data-status': n.status },
          h('td', { title: n.address }, h('strong', {}, n.label || shortAddr(n.address)), h('div', { class: 'small muted mono' }, shortAddr(n.address))),
          h('td', { class: 'node-status' }, h('span', { class: `badge ${cls}` }, text),
            n.token_live ? null : h('div', { class: 'small muted' }, 'token revoked'),
            n.status === 'calibrating' ? h('div', { class: 'small muted' }, 'answering the canary prompt') : null),
          h('td', { class: 'num' }, n.served === null || n.served === undefined ? '—' : num(n.served)),
          h('td', { class: 'num node-earned', 'data-units': n.earned }, lai(n.earned, 9)),
          h('td', { class: 'num node-pool', 'data-units': n.staking_pool }, lai(n.staking_pool, 9)),
          h('td', { class: 'node-stake', 'data-units': n.stake ? n.stake.stake : '' }, stake),
          h('td', {}, n.status === 'offline' ? ago(n.last_seen) : 'now'));
        [...tr.children].forEach((td, i) => td.setAttribute('data-label', cols[i]));
        return tr;
      });
      replace(myNodesEl, h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Your nodes', id: 'my-nodes-list' },
        h('table', { class: 'cards' }, h('thead', {}, h('tr', {}, cols.map((t, i) => h('th', { scope: 'col', class: i >= 2 && i <= 4 ? 'num' : '' }, t)))),
          h('tbody', {}, rows))),
      h('p', { class: 'small' }, h('a', { href: '#/network' }, 'See the whole network in the explorer')));
    }
    const list = tokens.data || [];
    replace(tokensEl, list.length
      ? h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Node tokens' },
        h('table', {}, h('thead', {}, h('tr', {}, ['Label', 'Token', 'Node', 'Last used', ''].map((t) => h('th', { scope: 'col' }, t)))),
          h('tbody', {}, list.map((t) => h('tr', { 'data-token': t.id },
            h('td', {}, t.label || h('span', { class: 'muted' }, '—')),
            h('td', {}, h('code', {}, `${t.prefix}…`)),
            h('td', { title: t.node_address || '' }, t.node_address
              ? [h('span', { class: 'mono' }, shortAddr(t.node_address)), t.online ? h('span', { class: 'badge ok' }, ' online') : null]
              : h('span', { class: 'muted' }, 'not used yet')),
            h('td', {}, t.last_used_at ? ago(t.last_used_at) : '—'),
            h('td', {}, t.revoked_at
              ? h('span', { class: 'muted' }, `revoked ${ago(t.revoked_at)}`)
              : h('button', { type: 'button', class: 'danger', 'aria-label': `Revoke node token ${t.label || t.prefix}`, onclick: () => revokeToken(t) }, 'Revoke')))))))
      : h('p', { class: 'muted small' }, 'No node tokens yet.'));
  }

  // Nodes online when the page opened are not "yours"; the first new one is watched.
  let before = null;
  let mine = null;
  let stopped = false;
  let timer = null;
  async function tick() {
    if (signedIn()) {
      await loadMine();
      if (!stopped) timer = setTimeout(tick, 2000);
      return;
    }
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
        let chain = null;
        try { earned = await api(`/lattice/v1/nodes/${node.address}/earnings`); } catch { /* shown without */ }
        try { chain = (await api(`/lattice/v1/chain/accounts/${node.address}`)).node; } catch { /* no chain */ }
        replace(watchEl, h('div', { id: 'my-node', 'data-address': node.address },
          h('ol', { class: 'steps' },
            h('li', {}, h('span', { class: 'badge ok' }, 'Linked'), ` ${node.label || shortAddr(node.address)} (${node.address}) signed in with its key.`),
            h('li', {}, admitted.length ? h('span', { class: 'badge ok' }, 'Calibrated') : h('span', { class: 'badge warn' }, 'Calibrating…'),
              admitted.length ? ` Serving ${admitted.map((m) => m.id).join(', ')}.` : ' Answering the canary prompt.'),
            h('li', {}, h('span', { class: 'badge' }, 'Earning'), ` ${num(node.served)} requests served`,
              earned ? ` · ${lai(earned.earned?.available ?? earned.earned, 9)} earned · staking pool ${lai(earned.staking_pool?.available ?? earned.staking_pool, 9)}` : ''),
            chain ? h('li', { id: 'my-node-chain' }, chain.active ? h('span', { class: 'badge ok' }, 'Active on-chain') : h('span', { class: 'badge warn' }, 'Not active on-chain'),
              ` stake ${lai(chain.stake, 2)} · reputation ${bps(chain.reputation_bps)} · ${lai(chain.earnings, 9)} to withdraw on-chain · pool ${lai(chain.pool.staked, 2)}, expected APY ${apy(chain.pool.expected_apy)}`) : null),
          h('p', {}, h('a', { href: '#/network' }, 'See it in the network explorer'))));
      }
    } catch (e) {
      replace(watchEl, errorBox(e));
    }
    if (!stopped) timer = setTimeout(tick, 2000);
  }
  tick();
  return () => { stopped = true; clearTimeout(timer); clearInterval(poolTimer); };
}
