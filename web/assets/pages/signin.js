// Sign up / sign in: passkey, OpenID Connect (when configured), wallet (SIWE, when the browser
// has an EIP-1193 wallet). A new account lands on the welcome page with its faucet credit.

import { api } from '../api.js';
import { h, replace, errorBox } from '../dom.js';
import { lai } from '../format.js';
import * as passkey from '../webauthn.js';

const NAME_RE = /^[A-Za-z0-9._@-]{3,64}$/;

function hex(s) {
  return '0x' + Array.from(new TextEncoder().encode(s), (b) => b.toString(16).padStart(2, '0')).join('');
}

async function siwe() {
  const eth = window.ethereum;
  const [address] = await eth.request({ method: 'eth_requestAccounts' });
  if (!address) throw new Error('The wallet shared no account.');
  const n = await api('/lattice/v1/auth/siwe/nonce');
  const message = [
    `${n.domain} wants you to sign in with your Ethereum account:`,
    address,
    '',
    n.statement,
    '',
    `URI: ${location.origin}`,
    'Version: 1',
    `Chain ID: ${n.chain_id}`,
    `Nonce: ${n.nonce}`,
    `Issued At: ${new Date().toISOString().replace(/\.\d{3}Z$/, 'Z')}`,
  ].join('\n');
  const signature = await eth.request({ method: 'personal_sign', params: [hex(message), address] });
  return api('/lattice/v1/auth/siwe', { method: 'POST', body: { message, signature } });
}

function welcome(root, ctx, faucet) {
  const a = ctx.account;
  if (a) localStorage.setItem(`lattice.welcomed.${a.user.id}`, '1');
  const granted = faucet?.status === 'granted';
  const amount = granted ? faucet.amount : a?.balance?.available;
  replace(root, h('section', { class: 'auth welcome' },
    h('div', { class: 'card' },
      h('h1', {}, 'Welcome to Lattice'),
      granted || BigInt(amount || '0') > 0n
        ? [h('p', { class: 'muted' }, granted ? 'Your account is ready. You received free credit to try the network:' : 'Your account is ready. Your credit:'),
          h('p', { class: 'amount', id: 'faucet-amount' }, lai(amount))]
        : h('div', { class: 'notice warn' },
          faucet?.status === 'rate_limited'
            ? 'The faucet is busy right now; claim your free credit later from the Account page.'
            : 'No free credit was added to this account.'),
      h('p', { class: 'muted small' }, 'Every answer is paid per token to the node that served it. You can see each message’s cost in the chat and your usage on the Account page.'),
      h('div', { class: 'row' },
        h('a', { class: 'button primary', href: '#/chat' }, 'Start chatting'),
        h('a', { class: 'button', href: '#/account' }, 'Create an API key')))));
}

export async function mount(root, ctx, route) {
  if (route === 'welcome') {
    const stored = sessionStorage.getItem('lattice.faucet');
    sessionStorage.removeItem('lattice.faucet');
    welcome(root, ctx, stored ? JSON.parse(stored) : null);
    return null;
  }
  if (ctx.account) {
    replace(root, h('section', { class: 'auth' }, h('div', { class: 'card' },
      h('h1', {}, 'You are signed in'),
      h('p', { class: 'muted' }, 'Account ', h('code', {}, ctx.account.user.address)),
      h('div', { class: 'row' }, h('a', { class: 'button primary', href: '#/chat' }, 'Go to chat'),
        h('a', { class: 'button', href: '#/account' }, 'Account')))));
    return null;
  }
  const status = h('div', { 'aria-live': 'polite' });
  const name = h('input', {
    id: 'username', name: 'username', autocomplete: 'username webauthn', required: true,
    minlength: '3', maxlength: '64', pattern: '[A-Za-z0-9._@\\-]{3,64}', placeholder: 'e.g. ada',
    'aria-describedby': 'username-hint',
  });
  const busy = (on) => { for (const b of root.querySelectorAll('button')) b.disabled = on; };

  async function done(result) {
    await ctx.refreshAccount();
    if (result.new_user) {
      sessionStorage.setItem('lattice.faucet', JSON.stringify(result.faucet));
      ctx.navigate('welcome');
    } else {
      ctx.navigate('chat');
    }
  }

  async function run(label, fn) {
    busy(true);
    replace(status, h('p', { class: 'muted' }, label));
    try {
      await done(await fn());
    } catch (e) {
      replace(status, errorBox(e));
    } finally {
      busy(false);
    }
  }

  function checkName() {
    const v = name.value.trim();
    if (!NAME_RE.test(v)) {
      replace(status, h('div', { class: 'notice error', role: 'alert' }, 'A user name is 3 to 64 letters, digits or . _ @ -'));
      name.focus();
      return null;
    }
    return v;
  }

  const form = h('form', { novalidate: true, onsubmit: (ev) => {
    ev.preventDefault();
    const v = checkName();
    if (v) run('Waiting for your passkey…', () => passkey.signIn(v));
  } },
  h('div', { class: 'field' },
    h('label', { for: 'username' }, 'User name'),
    name,
    h('span', { class: 'hint', id: 'username-hint' }, 'New here? Pick a name and create an account. No password: your device’s passkey signs you in.')),
  h('div', { class: 'stack' },
    h('button', { type: 'submit', class: 'primary full', id: 'passkey-signin' }, 'Sign in with a passkey'),
    h('button', { type: 'button', class: 'full', id: 'passkey-signup', onclick: () => {
      const v = checkName();
      if (v) run('Creating your passkey…', () => passkey.register(v));
    } }, 'Create an account with a passkey')));

  const others = [];
  if (ctx.config.oidc) {
    others.push(h('a', { class: 'button full', href: '/lattice/v1/auth/oidc/start', id: 'oidc' }, 'Continue with your identity provider'));
  }
  if (window.ethereum?.request) {
    others.push(h('button', { type: 'button', class: 'full', id: 'wallet', onclick: () => run('Confirm the sign-in in your wallet…', siwe) }, 'Sign in with your wallet'));
  }

  replace(root, h('section', { class: 'auth' },
    h('div', { class: 'card' },
      h('h1', {}, 'Sign in to Lattice'),
      h('p', { class: 'muted' }, 'Chat with open models served by people’s machines, pay per token. New accounts get free credit.'),
      !passkey.supported() || !ctx.config.passkeys
        ? h('div', { class: 'notice warn' }, ctx.config.passkeys
          ? 'This browser does not support passkeys.'
          : 'Passkeys are off on this Nexus: it must be opened at a domain name such as http://localhost:PORT (see --public-url).')
        : form,
      others.length ? [h('div', { class: 'divider' }, 'or'), h('div', { class: 'stack' }, others)] : null,
      !window.ethereum ? h('p', { class: 'muted small wallet-note' }, 'Have an Ethereum wallet? Install a browser wallet to sign in with it (Sign-In with Ethereum).') : null,
      status)));
  return null;
}
