// The single-page app: hash routes, the signed-in account, the top bar and the error banner.

import { api, onApiError } from './api.js';
import { h, replace } from './dom.js';
import { lai } from './format.js';

const pages = {
  chat: () => import('./pages/chat.js'),
  network: () => import('./pages/network.js'),
  account: () => import('./pages/account.js'),
  node: () => import('./pages/node.js'),
  signin: () => import('./pages/signin.js'),
  welcome: () => import('./pages/signin.js'),
};
const titles = {
  chat: 'Chat', network: 'Network', account: 'Account', node: 'Run a node', signin: 'Sign in', welcome: 'Welcome',
};

const state = {
  account: null, // GET /lattice/v1/account, or null when signed out
  config: { oidc: false, passkeys: true },
  cleanup: null,
  route: null,
};

const main = document.getElementById('main');
const sessionEl = document.getElementById('session');
const banner = document.getElementById('banner');

export const ctx = {
  get account() { return state.account; },
  get config() { return state.config; },
  /** Reloads the account (balance, holds); updates the top bar. */
  async refreshAccount() {
    try {
      state.account = await api('/lattice/v1/account');
    } catch (e) {
      if (e.status === 401) state.account = null;
    }
    renderSession();
    return state.account;
  },
  signedIn(account) {
    state.account = account;
    renderSession();
  },
  navigate(route) {
    if (location.hash === `#/${route}`) show();
    else location.hash = `#/${route}`;
  },
};

function renderSession() {
  const a = state.account;
  if (!a) {
    replace(sessionEl, h('a', { class: 'button primary', href: '#/signin' }, 'Sign in'));
    return;
  }
  const held = BigInt(a.balance?.held || '0');
  replace(sessionEl,
    h('a', { class: 'pill', href: '#/account', id: 'balance', title: 'Available credit', 'data-units': a.balance?.available || '0' },
      h('span', { class: 'dot live', 'aria-hidden': 'true' }),
      lai(a.balance?.available),
      held > 0n ? h('span', { class: 'muted' }, ` · ${lai(held)} held`) : null),
    h('button', { type: 'button', class: 'ghost', onclick: signOut }, 'Sign out'));
}

async function signOut() {
  try { await api('/lattice/v1/auth/logout', { method: 'POST' }); } catch { /* signed out anyway */ }
  state.account = null;
  renderSession();
  ctx.navigate('signin');
}

onApiError((e) => {
  if (!e) {
    banner.hidden = true;
    return;
  }
  if (e.offline) {
    banner.textContent = 'Cannot reach Nexus — the network may be down. Retrying…';
    banner.hidden = false;
  } else if (e.status === 401 && state.account) {
    // The session ended (expired, or signed out elsewhere).
    state.account = null;
    renderSession();
  }
});

async function show() {
  const [name] = (location.hash.replace(/^#\/?/, '') || 'chat').split('/');
  const route = pages[name] ? name : 'chat';
  if (state.cleanup) {
    try { state.cleanup(); } catch { /* ignore */ }
    state.cleanup = null;
  }
  state.route = route;
  for (const a of document.querySelectorAll('.nav a')) {
    if (a.dataset.route === route) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.title = `${titles[route]} · Lattice`;
  replace(main, h('p', { class: 'loading' }, 'Loading…'));
  try {
    const mod = await pages[route]();
    if (state.route !== route) return;
    const root = h('div', { class: `page page-${route}` });
    replace(main, root);
    state.cleanup = (await mod.mount(root, ctx, route)) || null;
  } catch (e) {
    replace(main, h('div', { class: 'notice error', role: 'alert' }, `This page failed to load: ${e.message}`));
  }
}

async function start() {
  try {
    state.config = await api('/assets/config.json');
  } catch { /* defaults */ }
  await ctx.refreshAccount();
  window.addEventListener('hashchange', show);
  // First visit after a provider (OpenID Connect) sign-in of a new account: the welcome page.
  const a = state.account;
  if (a && !location.hash && Date.now() / 1000 - a.user.created_at < 600
      && !localStorage.getItem(`lattice.welcomed.${a.user.id}`)) {
    location.hash = '#/welcome';
  }
  show();
}

start();
