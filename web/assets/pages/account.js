// Account & billing: balance and holds, the account on-chain (custody, what is settled, how to
// deposit), withdrawals to an on-chain address (debited off-chain at once, then sent by the
// settler), usage over time (an inline SVG chart), API keys (created keys are shown once), the
// chat-history opt-in, and the faucet.

import { api } from '../api.js';
import { h, replace, errorBox, emptyState, copyButton } from '../dom.js';
import { lai, num, date, parseLai, units, shortAddr } from '../format.js';

function isoDay(d) {
  return d.toISOString().slice(0, 10);
}

/** A bar chart of `rows` ({label, value}) as SVG, with a text summary for screen readers. */
function barChart(rows, { format, title }) {
  const W = 720;
  const H = 220;
  const pad = { l: 8, r: 8, t: 16, b: 34 };
  const max = rows.reduce((m, r) => (r.value > m ? r.value : m), 0) || 1;
  const bw = (W - pad.l - pad.r) / Math.max(rows.length, 1);
  const svg = h('svg:svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': title });
  svg.append(h('svg:line', { class: 'axis', x1: pad.l, x2: W - pad.r, y1: H - pad.b, y2: H - pad.b }));
  const labelEvery = Math.ceil(rows.length / 10);
  rows.forEach((r, i) => {
    const bh = Math.max(r.value > 0 ? 2 : 0, ((H - pad.t - pad.b) * r.value) / max);
    const x = pad.l + i * bw + bw * 0.15;
    const bar = h('svg:rect', { class: 'bar', x: x.toFixed(1), y: (H - pad.b - bh).toFixed(1), width: (bw * 0.7).toFixed(1), height: bh.toFixed(1), rx: '2' });
    bar.append(h('svg:title', {}, `${r.label}: ${format(r.value)}`));
    svg.append(bar);
    if (i % labelEvery === 0) {
      svg.append(h('svg:text', { x: (pad.l + i * bw + bw / 2).toFixed(1), y: H - pad.b + 16, 'text-anchor': 'middle' }, r.short ?? r.label));
    }
  });
  svg.append(h('svg:text', { x: pad.l, y: 11 }, `max ${format(max)}`));
  return svg;
}

export async function mount(root, ctx) {
  if (!ctx.account) {
    replace(root, h('h1', {}, 'Account'), h('div', { class: 'card' }, emptyState('Sign in to see your account',
      'Balance, usage, API keys and preferences live here.', h('a', { class: 'button primary', href: '#/signin' }, 'Sign in'))));
    return null;
  }
  const balanceEl = h('div', { id: 'account-balance' });
  const chainEl = h('div', { id: 'onchain' }, h('p', { class: 'loading' }, 'Loading the chain…'));
  const usageEl = h('div', { id: 'usage' }, h('p', { class: 'loading' }, 'Loading usage…'));
  const withdrawalsEl = h('div', { id: 'withdrawals' }, h('p', { class: 'loading' }, 'Loading withdrawals…'));
  const withdrawStatus = h('div', { id: 'withdraw-status', 'aria-live': 'polite' });
  const withdrawAmount = h('input', { id: 'withdraw-amount', name: 'amount', inputmode: 'decimal', placeholder: 'e.g. 2.5', required: true, autocomplete: 'off' });
  const withdrawTo = h('input', { id: 'withdraw-to', name: 'to', value: ctx.account.user.address.toLowerCase(), spellcheck: 'false', autocomplete: 'off',
    pattern: '0x[0-9a-fA-F]{40}', title: '0x followed by 40 hex digits', 'aria-describedby': 'withdraw-to-hint' });
  const withdrawButton = h('button', { type: 'submit', class: 'primary', id: 'withdraw-submit' }, 'Withdraw');
  const withdrawForm = h('form', { id: 'withdraw-form', onsubmit: (e) => { e.preventDefault(); withdraw(); } },
    h('div', { class: 'row' },
      h('div', { class: 'field' }, h('label', { for: 'withdraw-amount' }, 'Amount (LAI)'), withdrawAmount),
      h('div', { class: 'field wide' }, h('label', { for: 'withdraw-to' }, 'Destination address'), withdrawTo),
      withdrawButton),
    h('p', { class: 'muted small', id: 'withdraw-to-hint' }, 'Defaults to this account’s own address. The LAI leaves custody for that address’s wallet on-chain.'));
  const keysEl = h('div', { id: 'keys' }, h('p', { class: 'loading' }, 'Loading keys…'));
  const newKeyEl = h('div', { id: 'new-key', 'aria-live': 'polite' });
  const prefsStatus = h('span', { class: 'small muted', 'aria-live': 'polite' });
  const groupSel = h('select', { id: 'usage-group', 'aria-label': 'Group usage by' },
    h('option', { value: 'day' }, 'By day'), h('option', { value: 'model' }, 'By model'),
    h('option', { value: 'key' }, 'By API key'), h('option', { value: 'node' }, 'By node'));
  const metricSel = h('select', { id: 'usage-metric', 'aria-label': 'Chart' },
    h('option', { value: 'cost' }, 'Cost'), h('option', { value: 'tokens' }, 'Tokens'), h('option', { value: 'requests' }, 'Requests'));

  const keepHistory = h('input', { type: 'checkbox', id: 'keep-history', checked: ctx.account.user.keep_history });
  keepHistory.addEventListener('change', async () => {
    keepHistory.disabled = true;
    try {
      await api('/lattice/v1/account', { method: 'PATCH', body: { keep_history: keepHistory.checked } });
      replace(prefsStatus, keepHistory.checked ? 'Saved: new chats are kept.' : 'Saved: chats are no longer kept.');
      await ctx.refreshAccount();
    } catch (e) {
      keepHistory.checked = !keepHistory.checked;
      replace(prefsStatus, e.message);
    } finally {
      keepHistory.disabled = false;
    }
  });

  const keyName = h('input', { id: 'key-name', name: 'name', maxlength: '100', placeholder: 'e.g. laptop script', required: true });
  const keyLimit = h('input', { id: 'key-limit', name: 'spend_limit', inputmode: 'decimal', placeholder: 'no limit' });
  const keyRpm = h('input', { id: 'key-rpm', name: 'rpm_limit', inputmode: 'numeric', placeholder: 'no limit' });
  const keyForm = h('form', { id: 'create-key', onsubmit: (e) => { e.preventDefault(); createKey(); } },
    h('div', { class: 'row' },
      h('div', { class: 'field' }, h('label', { for: 'key-name' }, 'Name'), keyName),
      h('div', { class: 'field' }, h('label', { for: 'key-limit' }, 'Spending limit (LAI)'), keyLimit),
      h('div', { class: 'field' }, h('label', { for: 'key-rpm' }, 'Requests per minute'), keyRpm),
      h('button', { type: 'submit', class: 'primary' }, 'Create key')));

  replace(root,
    h('div', { class: 'page-head' }, h('div', {}, h('h1', {}, 'Account'), h('p', {}, 'Credit, usage and API keys.'))),
    balanceEl,
    h('section', { class: 'card', 'aria-labelledby': 'chain-h' }, h('h2', { id: 'chain-h' }, 'On-chain'), chainEl),
    h('section', { class: 'card', 'aria-labelledby': 'withdraw-h' },
      h('h2', { id: 'withdraw-h' }, 'Withdraw'),
      h('p', { class: 'small' }, 'Move credit to an address on the chain. It is taken off your balance here at once; Nexus then sends it from custody in its next withdrawal batch, usually within seconds.'),
      withdrawForm, withdrawStatus, withdrawalsEl),
    h('section', { class: 'card', 'aria-labelledby': 'usage-h' },
      h('div', { class: 'page-head' }, h('h2', { id: 'usage-h' }, 'Usage, last 30 days'), h('div', { class: 'row' }, metricSel, groupSel)),
      usageEl),
    h('section', { class: 'card', 'aria-labelledby': 'keys-h' },
      h('h2', { id: 'keys-h' }, 'API keys'),
      h('p', { class: 'muted small' }, 'Use a key with any OpenAI client: base URL ', h('code', {}, `${location.origin}/v1`), '. Keys are shown once, when created.'),
      keyForm, newKeyEl, keysEl),
    h('section', { class: 'card', 'aria-labelledby': 'prefs-h' },
      h('h2', { id: 'prefs-h' }, 'Preferences'),
      h('div', { class: 'check' }, keepHistory, h('label', { for: 'keep-history' }, 'Keep my chat history')),
      h('p', { class: 'muted small' }, 'Off by default. When on, your conversations are stored on this Nexus so you can reopen them; deleting one removes it.'),
      prefsStatus));

  function renderBalance() {
    const a = ctx.account;
    if (!a) return;
    const held = units(a.balance.held);
    replace(balanceEl, h('div', { class: 'grid two' },
      h('section', { class: 'card', 'aria-labelledby': 'bal-h' },
        h('h2', { id: 'bal-h' }, 'Balance'),
        h('div', { class: 'stats' },
          h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Available'), h('div', { class: 'value', id: 'available', 'data-units': a.balance.available }, lai(a.balance.available))),
          h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Held'), h('div', { class: 'value', id: 'held' }, lai(held)),
            h('div', { class: 'sub' }, held > 0n ? 'reserved for answers in progress' : 'nothing in progress'))),
        h('div', { class: 'row' }, h('button', { type: 'button', id: 'faucet', onclick: claim }, 'Claim free credit'), h('span', { id: 'faucet-status', class: 'small muted', 'aria-live': 'polite' }))),
      h('section', { class: 'card', 'aria-labelledby': 'id-h' },
        h('h2', { id: 'id-h' }, 'Identity'),
        h('p', {}, h('span', { class: 'muted' }, a.user.custodial ? 'Address (held for you by Nexus): ' : 'Wallet: '),
          h('code', { title: a.user.address }, a.user.address)),
        (a.identities || []).filter((i) => i.kind === 'passkey-name').map((i) => h('p', { class: 'small' }, h('span', { class: 'muted' }, 'User name: '), h('strong', {}, i.subject))),
        h('p', { class: 'muted small' }, 'Signs in with: ', [...new Set((a.identities || []).filter((i) => i.kind !== 'passkey-name')
          .map((i) => ({ passkey: 'passkey', siwe: 'wallet', local: 'operator key' }[i.kind] || (i.kind.startsWith('oidc:') ? 'identity provider' : i.kind))))].join(', ') || '—'),
        h('p', { class: 'muted small' }, 'This is your address on the chain Nexus settles to: see “On-chain” below.'))));
  }

  function chainStat(label, value, sub, id, digits = 6) {
    return h('div', { class: 'stat', id }, h('div', { class: 'label' }, label),
      h('div', { class: 'value', 'data-units': value }, lai(value, digits)), sub ? h('div', { class: 'sub' }, sub) : null);
  }

  let lastChain = null;
  async function loadChain() {
    let c;
    try {
      c = await api('/lattice/v1/account/chain');
      // Polled: redrawn only when something changed, so an open "How this adds up" stays open.
      const key = JSON.stringify(c);
      if (key === lastChain) return;
      lastChain = key;
    } catch (e) {
      lastChain = null;
      replace(chainEl, e.status === 404
        ? h('p', { class: 'muted', id: 'no-chain' }, 'This Nexus is not connected to a chain: your credit lives only in its ledger, and there is nothing to deposit to.')
        : errorBox(e));
      return;
    }
    const p = c.position;
    const offChain = units(c.off_chain.available) + units(c.off_chain.held);
    const sync = c.in_sync
      ? h('span', { class: 'badge ok', id: 'chain-sync' }, 'Ledger and chain agree')
      : h('span', { class: 'badge warn', id: 'chain-sync', title: `expected ${lai(c.expected_custody ?? 0)} in custody` }, 'Chain differs from the ledger');
    const example = `lattice chain faucet ${c.address} 10`;
    const faucetCmd = c.chain.kind === 'embedded' ? example
      : `lattice chain --chain-rpc RPC_URL --chain-key-file OPERATOR_KEY faucet ${c.address} 10`;
    const pending = [];
    if (units(p.unsettled) > 0n) pending.push(`${lai(p.unsettled, 9)} of charges wait for the next settlement batch`);
    if (units(p.unminted) > 0n) pending.push(`${lai(p.unminted)} of free credit is not minted into custody yet`);
    if (units(p.withdrawing) > 0n) pending.push(`${lai(p.withdrawing, 9)} of withdrawals wait to leave custody`);
    replace(chainEl,
      h('p', {}, h('span', { class: 'muted' }, `Address on chain ${c.chain.chain_id}: `), h('code', { id: 'chain-address' }, c.address), ' ', sync),
      h('div', { class: 'stats' },
        chainStat('Credit off-chain', offChain.toString(), 'what Nexus lets you spend now', 'chain-offchain'),
        chainStat('Custody on-chain', c.on_chain.custody, 'UserRegistry balance', 'chain-custody'),
        chainStat('Settled on-chain', p.settled, 'charges paid from custody', 'chain-settled', 9),
        chainStat('Wallet on-chain', c.on_chain.wallet, 'LAI the address holds itself', 'chain-wallet')),
      h('p', { class: 'small', id: 'chain-pending' }, pending.length
        ? `On its way: ${pending.join('; ')}. Nexus settles every few seconds.`
        : 'Everything credited to you off-chain is reflected on-chain.'),
      h('details', { class: 'small' }, h('summary', {}, 'How this adds up'),
        h('p', { class: 'muted' }, `Custody should be ${lai(c.expected_custody ?? 0, 9)}: free credit minted (${lai(p.granted)}) + deposits (${lai(p.deposited)}) − charges settled (${lai(p.settled, 9)}) − withdrawals sent (${lai(p.withdrawn, 9)}). `,
          'Your off-chain credit also counts what is on its way.')),
      h('h3', {}, 'Deposit'),
      h('p', { class: 'small' }, 'Deposits go into custody on-chain; Nexus credits them to this account by itself once they are a few blocks deep. From any wallet holding LAI, send two transactions:'),
      h('ol', { class: 'small calls', id: 'deposit-calls' },
        h('li', {}, h('code', {}, `approve(${c.chain.users}, amount)`), ' to the LAI token ', h('code', {}, c.chain.token)),
        h('li', {}, h('code', {}, `depositFor(${c.address}, amount)`), ' to the UserRegistry ', h('code', {}, c.chain.users))),
      h('p', { class: 'muted small' }, 'amount is in units of 10⁻¹⁸ LAI (1 LAI = 1000000000000000000).'),
      h('p', { class: 'small' }, 'On a local network the operator can mint and deposit test LAI:'),
      h('div', { class: 'command' }, h('code', { id: 'faucet-command' }, faucetCmd), copyButton(() => faucetCmd)),
      c.chain.kind === 'embedded'
        ? h('p', { class: 'muted small' }, 'This Nexus runs the chain inside its own process: stop Nexus, run the command (add ', h('code', {}, '--db'), ' with the path you gave Nexus, if any), and start Nexus again; the deposit is credited when it is back.')
        : null,
      h('p', { class: 'muted small', id: 'withdraw-note' }, 'To take LAI out, use “Withdraw” below: Nexus debits your credit first and then releases it from custody. ',
        c.custodial ? 'Your address is held for you by Nexus, so only Nexus can release it.'
          : 'Do not call UserRegistry.withdraw from your wallet while you hold credit here: it would not be taken off your off-chain credit, and the chain and the ledger would disagree.'));
  }

  const STATUS = {
    requested: ['Requested', ''], debited: ['Debited', 'warn'], sent: ['Sending', 'warn'],
    confirmed: ['Confirmed', 'ok'], rejected: ['Rejected', 'bad'],
  };
  let withdrawTimer = null;
  let lastWithdrawals = null;
  async function loadWithdrawals() {
    clearTimeout(withdrawTimer);
    let r;
    try {
      r = await api('/lattice/v1/account/withdrawals');
    } catch (e) {
      lastWithdrawals = null;
      replace(withdrawalsEl, errorBox(e));
      return;
    }
    if (!r.chain) {
      withdrawForm.hidden = true;
      replace(withdrawalsEl, h('p', { class: 'muted', id: 'no-withdraw' }, 'This Nexus is not connected to a chain, so there is nowhere to withdraw to.'));
      return;
    }
    const list = r.data || [];
    // Poll quickly while one is on its way, so "Confirmed" and its transaction show up soon.
    if (list.some((w) => ['requested', 'debited', 'sent'].includes(w.status))) {
      withdrawTimer = setTimeout(() => { if (!document.hidden) loadWithdrawals(); }, 2000);
    }
    const key = JSON.stringify(list);
    if (key === lastWithdrawals) return;
    const changed = lastWithdrawals !== null;
    lastWithdrawals = key;
    if (changed) { ctx.refreshAccount().then(renderBalance); loadChain(); }
    if (!list.length) {
      replace(withdrawalsEl, h('p', { class: 'muted', id: 'withdrawals-empty' }, `No withdrawals yet. The smallest is ${lai(r.min_amount)}; up to ${r.max_pending} can be on their way at once.`));
      return;
    }
    replace(withdrawalsEl, h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Withdrawals' },
      h('table', { id: 'withdrawals-table' },
        h('thead', {}, h('tr', {}, ['Requested', 'Amount', 'To', 'Status', 'Transaction'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, list.map((w) => {
          const [label, cls] = STATUS[w.status] || [w.status, ''];
          return h('tr', { 'data-withdrawal': w.id, 'data-status': w.status },
            h('td', {}, date(w.created_at)),
            h('td', { class: 'num', 'data-units': w.amount }, lai(w.amount, 9)),
            h('td', {}, h('code', { title: w.to }, shortAddr(w.to))),
            h('td', {}, h('span', { class: `badge ${cls}`, title: w.reason || '' }, label), w.reason ? h('span', { class: 'small muted' }, ` ${w.reason}`) : null),
            h('td', {}, w.tx_hash ? h('code', { class: 'tx', title: w.tx_hash }, shortAddr(w.tx_hash)) : h('span', { class: 'muted' }, '—')));
        })))));
  }

  async function withdraw() {
    const u = parseLai(withdrawAmount.value);
    if (u === null || u === 0n) {
      replace(withdrawStatus, h('div', { class: 'notice error', role: 'alert' }, 'The amount is an amount of LAI, like 2.5.'));
      return;
    }
    const to = withdrawTo.value.trim();
    if (!/^0x[0-9a-fA-F]{40}$/.test(to)) {
      replace(withdrawStatus, h('div', { class: 'notice error', role: 'alert' }, 'The destination is an address: 0x followed by 40 hex digits.'));
      return;
    }
    withdrawButton.disabled = true;
    try {
      const r = await api('/lattice/v1/account/withdrawals', { method: 'POST', body: { amount: u.toString(), to } });
      withdrawAmount.value = '';
      replace(withdrawStatus, h('div', { class: 'notice ok' }, `${lai(r.withdrawal.amount, 9)} taken off your credit; it is on its way to `, h('code', {}, r.withdrawal.to), '.'));
      await ctx.refreshAccount();
      renderBalance();
      loadChain();
      loadWithdrawals();
    } catch (e) {
      replace(withdrawStatus, errorBox(e));
      loadWithdrawals(); // a refused one is listed as rejected
    } finally {
      withdrawButton.disabled = false;
    }
  }

  async function claim() {
    const s = balanceEl.querySelector('#faucet-status');
    try {
      const r = await api('/lattice/v1/account/faucet', { method: 'POST' });
      const f = r.faucet;
      replace(s, f.status === 'granted' ? `Added ${lai(f.amount)}.` : f.status === 'already_claimed' ? 'Already claimed for this account.' : 'The faucet is busy; try again later.');
      await ctx.refreshAccount();
      renderBalance();
    } catch (e) {
      replace(s, e.message);
    }
  }

  async function loadUsage() {
    const group = groupSel.value;
    const metric = metricSel.value;
    const to = new Date();
    const from = new Date(Date.now() - 29 * 86400e3);
    try {
      const r = await api(`/lattice/v1/usage?from=${isoDay(from)}&to=${isoDay(to)}&group=${group}`);
      const data = r.data || [];
      if (!data.length) {
        replace(usageEl, emptyState('No usage yet', 'Requests you make appear here, by day, model, key or node.', h('a', { class: 'button', href: '#/chat' }, 'Open the chat')));
        return;
      }
      const value = (row) => (metric === 'cost' ? Number(units(row.cost)) / 1e18 : metric === 'tokens' ? row.prompt_tokens + row.completion_tokens : row.requests);
      const fmt = (v) => (metric === 'cost' ? `${num(v, 6)} LAI` : num(v));
      let rows;
      if (group === 'day') {
        const byDay = new Map(data.map((d) => [d.group, d]));
        rows = [];
        for (let t = from.getTime(); t <= to.getTime() + 1; t += 86400e3) {
          const d = isoDay(new Date(t));
          const row = byDay.get(d);
          rows.push({ label: d, short: d.slice(5), value: row ? value(row) : 0 });
        }
      } else {
        rows = data.map((d) => ({ label: d.group || '(none)', short: shortAddr(d.group || '—').slice(0, 14), value: value(d) }));
      }
      const total = data.reduce((a, d) => a + units(d.cost), 0n);
      const reqs = data.reduce((a, d) => a + d.requests, 0);
      replace(usageEl,
        h('p', { class: 'muted', id: 'usage-total' }, `${num(reqs)} request${reqs === 1 ? '' : 's'} · ${lai(total, 9)} in total`),
        barChart(rows, { format: fmt, title: `${metricSel.selectedOptions[0].text} ${groupSel.selectedOptions[0].text.toLowerCase()}` }),
        h('details', {}, h('summary', {}, 'Show as a table'),
          h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Usage table' },
            h('table', {}, h('thead', {}, h('tr', {}, [group === 'key' ? 'Key' : group[0].toUpperCase() + group.slice(1), 'Requests', 'Prompt tokens', 'Completion tokens', 'Cost'].map((t) => h('th', { scope: 'col' }, t)))),
              h('tbody', {}, data.map((d) => h('tr', {}, h('td', {}, d.group || '(none)'), h('td', { class: 'num' }, num(d.requests)),
                h('td', { class: 'num' }, num(d.prompt_tokens)), h('td', { class: 'num' }, num(d.completion_tokens)), h('td', { class: 'num' }, lai(d.cost, 9)))))))));
    } catch (e) {
      replace(usageEl, errorBox(e));
    }
  }

  async function loadKeys() {
    try {
      const r = await api('/lattice/v1/keys');
      const keys = (r.data || []).filter((k) => !k.revoked_at);
      const revoked = (r.data || []).filter((k) => k.revoked_at);
      if (!keys.length && !revoked.length) {
        replace(keysEl, h('p', { class: 'muted' }, 'No API keys yet. Create one to call the API from scripts and apps.'));
        return;
      }
      const row = (k) => h('tr', { 'data-key': k.id },
        h('td', {}, h('strong', {}, k.name)),
        h('td', { class: 'mono' }, `${k.prefix}…`),
        h('td', {}, date(k.created_at)),
        h('td', { class: 'num' }, lai(k.spent, 9)),
        h('td', {}, k.spend_limit ? lai(k.spend_limit) : '—', ' / ', k.rpm_limit ? `${k.rpm_limit} rpm` : '—'),
        h('td', {}, k.revoked_at ? h('span', { class: 'badge' }, `Revoked ${date(k.revoked_at)}`)
          : h('button', { type: 'button', class: 'danger', 'aria-label': `Revoke key ${k.name}`, onclick: () => revoke(k) }, 'Revoke')));
      replace(keysEl, h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'API keys' },
        h('table', {}, h('thead', {}, h('tr', {}, ['Name', 'Key', 'Created', 'Spent', 'Limits', ''].map((t) => h('th', { scope: 'col' }, t)))),
          h('tbody', {}, keys.map(row), revoked.map(row)))));
    } catch (e) {
      replace(keysEl, errorBox(e));
    }
  }

  async function createKey() {
    const body = { name: keyName.value.trim() || 'API key' };
    if (keyLimit.value.trim()) {
      const u = parseLai(keyLimit.value);
      if (u === null) { replace(newKeyEl, h('div', { class: 'notice error', role: 'alert' }, 'The spending limit is an amount of LAI, like 2.5.')); return; }
      body.spend_limit = u.toString();
    }
    if (keyRpm.value.trim()) {
      const n = Number(keyRpm.value);
      if (!Number.isInteger(n) || n < 1) { replace(newKeyEl, h('div', { class: 'notice error', role: 'alert' }, 'Requests per minute is a whole number, at least 1.')); return; }
      body.rpm_limit = n;
    }
    let firstModel = 'smollm2-135m';
    try {
      firstModel = (await api('/v1/models')).data?.find((x) => !x.dimensions)?.id || firstModel;
    } catch { /* the example keeps the default model */ }
    try {
      const k = await api('/lattice/v1/keys', { method: 'POST', body });
      keyForm.reset();
      replace(newKeyEl, h('div', { class: 'notice ok' },
        h('p', {}, h('strong', {}, `Key “${k.name}” created.`), ' Copy it now: it is not shown again.'),
        h('div', { class: 'secret' }, h('code', { id: 'new-key-secret' }, k.secret), copyButton(() => k.secret)),
        h('p', { class: 'small' }, 'Try it: ', h('code', {}, `curl ${location.origin}/v1/chat/completions -H "Authorization: Bearer ${k.secret}" -H "Content-Type: application/json" -d '{"model":"${firstModel}","messages":[{"role":"user","content":"Hello!"}]}'`))));
      loadKeys();
    } catch (e) {
      replace(newKeyEl, errorBox(e));
    }
  }

  async function revoke(k) {
    if (!confirm(`Revoke “${k.name}”? Apps using it stop working at once.`)) return;
    try {
      await api(`/lattice/v1/keys/${encodeURIComponent(k.id)}`, { method: 'DELETE' });
      replace(newKeyEl, h('div', { class: 'notice' }, `Key “${k.name}” revoked.`));
      loadKeys();
    } catch (e) {
      replace(newKeyEl, errorBox(e));
    }
  }

  groupSel.addEventListener('change', loadUsage);
  metricSel.addEventListener('change', loadUsage);
  await ctx.refreshAccount();
  renderBalance();
  loadChain();
  loadWithdrawals();
  loadUsage();
  loadKeys();
  const poll = setInterval(async () => {
    if (document.hidden) return;
    await ctx.refreshAccount();
    renderBalance();
    loadChain();
    loadWithdrawals();
  }, 10000);
  return () => { clearInterval(poll); clearTimeout(withdrawTimer); };
}
