// The web UI in a real browser against a real network: `lattice nexus` on a free loopback port,
// opened as http://localhost:PORT (passkeys refuse IP addresses), and a real `lattice node` with
// SmolLM2-135M. Headless Debian Chromium is driven by playwright-core; axe-core checks each page.
//
//   LATTICE_BIN=…/release/lattice node tests/ui/run.mjs
//
// Screenshots of every page go to tests/ui/artifacts/.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { chromium } from 'playwright-core';

const HERE = dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = join(HERE, 'artifacts');
const MODEL = 'smollm2-135m';
const BIN = process.env.LATTICE_BIN || join(process.env.CARGO_TARGET_DIR
  || join(process.env.LATTICE_CACHE_DIR || join(homedir(), '.cache/lattice'), 'target'), 'release/lattice');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const AXE = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');
const LONG = 180_000; // generous waits: a cold model load, a slow CI machine

const procs = [];
const dir = mkdtempSync(join(tmpdir(), 'lattice-ui-'));
mkdirSync(ARTIFACTS, { recursive: true });

/**
 * Starts `lattice ARGS`; resolves with {child, url, log} once it prints `listening on URL`.
 * With `capture`, its stderr (the log) is kept in `log.text` as well as shown.
 */
function lattice(args, name, { capture = false } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(BIN, args, {
      stdio: ['ignore', 'pipe', capture ? 'pipe' : 'inherit'],
      env: { ...process.env, LATTICE_LOG: 'warn', NO_COLOR: '1' },
    });
    procs.push(child);
    const log = { text: '' };
    if (capture) {
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (d) => { log.text += d; process.stderr.write(d); });
    }
    const timer = setTimeout(() => reject(new Error(`${name} did not start`)), LONG);
    let buf = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d) => {
      buf += d;
      const m = /listening on (\S+)/.exec(buf);
      if (m) {
        clearTimeout(timer);
        buf = '';
        resolve({ child, url: m[1], log });
      }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`${name} exited (${code}) before listening`)); });
  });
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

async function waitFor(what, fn, ms = LONG) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) { last = e; }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
}

function nodeArgs(nexus, key, extra = []) {
  return ['node', '--nexus', nexus, '--model', MODEL, '--port', '0', '--threads', '1', '--parallel', '2',
    '--ctx-per-slot', '1024', '--key', key, ...extra];
}

async function json(url, init) {
  const r = await fetch(url, init);
  return { status: r.status, headers: r.headers, body: await r.json().catch(() => null) };
}

async function metric(base, name, match) {
  const text = await (await fetch(`${base}/metrics`)).text();
  return text.split('\n').filter((l) => l.startsWith(name) && l.includes(match))
    .reduce((a, l) => a + Number(l.split(' ').pop()), 0);
}

let nexus; // {child, url}
let base; // http://localhost:PORT — what the browser opens
let api; // http://127.0.0.1:PORT — what the test's own HTTP calls use
let node1;
let context;
let page;
const problems = []; // console errors and CSP violations seen by the browser

async function shot(name) {
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/** axe-core on the current page: no serious or critical violation. */
async function accessible(name) {
  await page.evaluate(AXE); // CDP evaluation: not subject to the page's CSP
  const result = await page.evaluate(async () => {
    // eslint-disable-next-line no-undef
    const r = await axe.run(document, { resultTypes: ['violations'] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.map((n) => n.target.join(' ')).slice(0, 3) }));
  });
  const bad = result.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  assert.deepEqual(bad, [], `${name}: accessibility violations ${JSON.stringify(bad)}`);
}

async function go(route, heading) {
  await page.goto(`${base}/#/${route}`);
  if (heading) await page.getByRole('heading', { name: heading, level: 1 }).waitFor({ timeout: 30_000 });
}

/** Short answers keep the test fast: the UI's chat requests get a max_tokens (the test adds it). */
async function shortAnswers(maxTokens = 48) {
  await page.route('**/v1/chat/completions', async (route) => {
    const body = JSON.parse(route.request().postData());
    await route.continue({ postData: JSON.stringify({ ...body, max_tokens: maxTokens }) });
  });
}

async function balanceUnits() {
  const a = await page.evaluate(async () => (await fetch('/lattice/v1/account')).json());
  return BigInt(a.balance.available);
}

describe('web UI', { timeout: 20 * 60_000 }, () => {
  before(async () => {
    const port = await freePort();
    base = `http://localhost:${port}`;
    api = `http://127.0.0.1:${port}`;
    nexus = await lattice(['nexus', '--listen', `127.0.0.1:${port}`, '--public-url', base, '--db', join(dir, 'nexus.db'),
      // One faucet grant per client address and hour: the first account gets its credit, a
      // second one from this address gets none (a real 402 below).
      '--probe-interval', '5', '--faucet-per-client-per-hour', '1'], 'nexus');
    node1 = await lattice(nodeArgs(api, join(dir, 'node1.key'), ['--label', 'ui-node-1']), 'node');
    await waitFor('the node to pass calibration', async () => {
      const m = await json(`${api}/v1/models`);
      return m.body?.data?.some((x) => x.id === MODEL);
    });
    // A fresh profile for every run.
    context = await chromium.launchPersistentContext(join(dir, 'chromium'), {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      viewport: { width: 1280, height: 860 },
    });
    page = context.pages()[0] || await context.newPage();
    page.on('console', (m) => { if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) problems.push(m.text()); });
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('dialog', (d) => d.accept());
    const cdp = await context.newCDPSession(page);
    await cdp.send('WebAuthn.enable');
    await cdp.send('WebAuthn.addVirtualAuthenticator', {
      options: { protocol: 'ctap2', transport: 'internal', hasResidentKey: true, hasUserVerification: true, isUserVerified: true },
    });
  });

  after(async () => {
    await context?.close().catch(() => {});
    for (const p of procs) p.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });

  it('serves the app with a strict content security policy', async () => {
    const r = await fetch(`${api}/`);
    assert.equal(r.status, 200);
    assert.match(r.headers.get('content-type'), /text\/html/);
    assert.match(r.headers.get('content-security-policy'), /script-src 'self'/);
    assert.equal(r.headers.get('x-content-type-options'), 'nosniff');
    const js = await fetch(`${api}/assets/app.js`);
    assert.match(js.headers.get('content-type'), /text\/javascript/);
    assert.equal((await fetch(`${api}/assets/missing.js`)).status, 404);
  });

  it('signed out: the sign-in page and an inviting chat page', async () => {
    await go('chat');
    await page.getByText('Sign in to chat').waitFor();
    await shot('chat-signed-out');
    await go('signin', 'Sign in to Lattice');
    await shot('signin');
    await accessible('signin');
  });

  it('signs up with a passkey and lands on the faucet credit', async () => {
    await page.fill('#username', 'ada.ui');
    await page.click('#passkey-signup');
    await page.getByRole('heading', { name: 'Welcome to Lattice' }).waitFor({ timeout: 30_000 });
    assert.equal(await page.textContent('#faucet-amount'), '10 LAI');
    assert.match(await page.textContent('#balance'), /10 LAI/);
    assert.equal(await balanceUnits(), 10n * 10n ** 18n);
    await shot('welcome');
    await accessible('welcome');
  });

  it('signs out and back in with the same passkey', async () => {
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByRole('heading', { name: 'Sign in to Lattice' }).waitFor();
    await page.fill('#username', 'ada.ui');
    await page.click('#passkey-signin');
    await page.locator('#balance').waitFor();
    assert.match(page.url(), /#\/chat$/);
    assert.equal(await balanceUnits(), 10n * 10n ** 18n, 'the same account, credited once');
  });

  it('chats with streaming, shows the node and the cost, and the balance drops by exactly that', async () => {
    await go('chat');
    await page.locator(`#model option[value="${MODEL}"]`).waitFor({ state: 'attached' });
    const nodes = await json(`${api}/lattice/v1/nodes`);
    const address = nodes.body.online[0].address;
    const before = await balanceUnits();
    // Record every distinct text the answer shows while it streams.
    await page.evaluate(() => {
      window.__seen = [];
      new MutationObserver(() => {
        const b = document.querySelector('.msg.assistant:last-child .body');
        const t = b?.textContent || '';
        if (t && window.__seen[window.__seen.length - 1] !== t) window.__seen.push(t);
      }).observe(document.getElementById('messages'), { childList: true, subtree: true, characterData: true });
    });
    await page.fill('#prompt', 'Which city is the capital of France? Answer in a short paragraph.');
    await page.press('#prompt', 'Enter');
    const meta = page.locator('.msg.assistant .meta .cost');
    await meta.waitFor({ timeout: 120_000 });
    const answer = await page.textContent('.msg.assistant .body');
    assert.ok(answer.trim().length > 0, 'an answer');
    const seen = await page.evaluate(() => window.__seen);
    assert.equal(seen[seen.length - 1], answer, 'the last streamed state is the answer');
    assert.ok(seen.length >= 3, `the answer should render as it streams, saw ${seen.length} states`);
    assert.ok(seen.every((t, i) => i === 0 || t.startsWith(seen[i - 1].slice(0, 1))), 'the text grows');
    assert.equal(await page.getAttribute('.msg.assistant .meta .node', 'title'), address, 'which node answered');
    const cost = BigInt(await meta.getAttribute('data-units'));
    assert.ok(cost > 0n, 'a priced answer costs something');
    const after = await waitFor('the charge', async () => { const b = await balanceUnits(); return b < before ? b : null; }, 30_000);
    assert.equal(before - after, cost, 'the cost shown is exactly what was charged');
    await waitFor('the top bar balance', async () => BigInt(await page.getAttribute('#balance', 'data-units')) === after, 30_000);
    await shot('chat');
    await accessible('chat');
  });

  it('renders model Markdown safely', async () => {
    // The renderer itself, in the page: markup in model output stays text.
    const r = await page.evaluate(async () => {
      const { render } = await import('/assets/markdown.js');
      const div = document.createElement('div');
      div.append(render('**bold** and `<b>code</b>`\n\n<img src=x onerror="window.__xss=1">\n\n```js\nlet a = "<script>";\n```\n- one\n- two'));
      return { html: div.innerHTML, img: div.querySelector('img'), strong: div.querySelector('strong')?.textContent, li: div.querySelectorAll('li').length, pre: div.querySelector('pre code')?.textContent, xss: window.__xss };
    });
    assert.equal(r.img, null);
    assert.equal(r.xss, undefined);
    assert.equal(r.strong, 'bold');
    assert.equal(r.li, 2);
    assert.equal(r.pre, 'let a = "<script>";');
    assert.match(r.html, /&lt;img src=x/);
  });

  it('stops a generation: the request is cut short and nothing is charged', async () => {
    // A long answer for sure: the test adds max_tokens and ignore_eos to the UI's request.
    await page.route('**/v1/chat/completions', async (route) => {
      const body = JSON.parse(route.request().postData());
      await route.continue({ postData: JSON.stringify({ ...body, max_tokens: 900, ignore_eos: true }) });
    });
    const cancelledBefore = await metric(api, 'lattice_nexus_requests_total', 'status="cancelled"');
    const tokensBefore = await metric(api, 'lattice_nexus_completion_tokens_total', '');
    const before = await balanceUnits();
    await page.click('#new-chat');
    await page.fill('#prompt', 'Tell me a very long story about a lighthouse keeper.');
    await page.click('#send');
    await page.locator('#stop').waitFor({ state: 'visible' });
    await waitFor('some streamed text', async () => ((await page.textContent('.msg.assistant:last-child .body')) || '').length > 40, 120_000);
    await page.click('#stop');
    await page.getByText('Stopped · not charged').waitFor();
    const stoppedAt = (await page.textContent('.msg.assistant:last-child .body')).length;
    await waitFor('Nexus to count the cancelled request', async () =>
      (await metric(api, 'lattice_nexus_requests_total', 'status="cancelled"')) === cancelledBefore + 1, 30_000);
    // The node's slot is freed (it stopped generating), no tokens were counted as completed,
    // the hold is released and nothing was charged.
    await waitFor('the node to be idle', async () => (await json(`${api}/lattice/v1/nodes`)).body.online.every((n) => n.busy === 0 && n.inflight === 0), 30_000);
    assert.equal(await metric(api, 'lattice_nexus_completion_tokens_total', ''), tokensBefore);
    const acct = await page.evaluate(async () => (await fetch('/lattice/v1/account')).json());
    assert.equal(BigInt(acct.balance.available), before, 'a stopped answer is not charged');
    assert.equal(acct.balance.held, '0');
    assert.equal((await page.textContent('.msg.assistant:last-child .body')).length, stoppedAt, 'no text after stop');
    assert.ok(await page.locator('#send').isEnabled());
    await page.unroute('**/v1/chat/completions');
    await shot('chat-stopped');
  });

  it('a real 402: an account without credit is told so in the chat', async () => {
    // The faucet grants one account per client address and hour here (Nexus's
    // --faucet-per-client-per-hour 1): ada got it, so a second account gets nothing and its
    // balance of 0 cannot cover the hold of any request.
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByRole('heading', { name: 'Sign in to Lattice' }).waitFor();
    await page.fill('#username', 'bob.broke');
    await page.click('#passkey-signup');
    await page.getByRole('heading', { name: 'Welcome to Lattice' }).waitFor({ timeout: 30_000 });
    await page.getByText('The faucet is busy right now').waitFor();
    assert.equal(await balanceUnits(), 0n);
    await go('chat');
    await page.locator(`#model option[value="${MODEL}"]`).waitFor({ state: 'attached' });
    const answered = page.waitForResponse('**/v1/chat/completions');
    await page.fill('#prompt', 'hello');
    await page.press('#prompt', 'Enter');
    const resp = await answered;
    assert.equal(resp.status(), 402);
    assert.equal((await resp.json()).error.code, 'insufficient_credits');
    const alert = page.locator('.msg.assistant [role=alert]');
    await alert.waitFor();
    assert.match(await alert.textContent(),
      /^Not enough credit\. Insufficient credits: this request may cost up to [0-9.]+ LAI and your balance is 0 LAI\. Lower max_tokens or add credits\. See your balance$/);
    assert.equal(await alert.getByRole('link', { name: 'See your balance' }).getAttribute('href'), '#/account');
    const acct = await page.evaluate(async () => (await fetch('/lattice/v1/account')).json());
    assert.equal(acct.balance.available, '0');
    assert.equal(acct.balance.held, '0', 'a refused request holds nothing');
    await shot('chat-402');
    await accessible('chat-402');
    // Back to the first account.
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByRole('heading', { name: 'Sign in to Lattice' }).waitFor();
    await page.fill('#username', 'ada.ui');
    await page.click('#passkey-signin');
    await page.locator('#balance').waitFor();
    assert.ok(await balanceUnits() > 0n);
  });

  it('a real 429: an API key over its requests-per-minute limit, through the chat page', async () => {
    // Nexus rate-limits API keys (rpm_limit), not browser sessions: the page's chat requests
    // carry a key limited to 1 request per minute, created on the account page.
    await go('account', 'Account');
    await page.fill('#key-name', 'one per minute');
    await page.fill('#key-rpm', '1');
    await page.click('#create-key button[type=submit]');
    const secret = (await page.locator('#new-key-secret').textContent()).trim();
    await page.route('**/v1/chat/completions', async (route) => {
      const body = JSON.parse(route.request().postData());
      await route.continue({
        headers: { ...route.request().headers(), authorization: `Bearer ${secret}` },
        postData: JSON.stringify({ ...body, max_tokens: 8 }),
      });
    });
    try {
      // The limit counts per wall-clock minute: both requests go in the same one.
      const sec = new Date().getUTCSeconds();
      if (sec > 35) await new Promise((r) => setTimeout(r, (61 - sec) * 1000));
      await go('chat');
      await page.locator(`#model option[value="${MODEL}"]`).waitFor({ state: 'attached' });
      await page.click('#new-chat');
      const first = page.waitForResponse('**/v1/chat/completions');
      await page.fill('#prompt', 'Say one word.');
      await page.press('#prompt', 'Enter');
      assert.equal((await first).status(), 200, 'the first request of the minute is served');
      await page.locator('.msg.assistant:last-child .meta .cost').waitFor({ timeout: 120_000 });
      const second = page.waitForResponse('**/v1/chat/completions');
      await page.fill('#prompt', 'And one more.');
      await page.press('#prompt', 'Enter');
      const resp = await second;
      assert.equal(resp.status(), 429);
      assert.equal((await resp.json()).error.code, 'rate_limit_exceeded');
      const alert = page.locator('.msg.assistant:last-child [role=alert]');
      await alert.waitFor();
      assert.equal(await alert.textContent(),
        "Too many requests: This API key's requests-per-minute limit is reached; retry in a minute. Wait a moment and regenerate.");
      await shot('chat-429');
    } finally {
      await page.unroute('**/v1/chat/completions');
    }
  });

  it('creates an API key shown once, which works with curl-like calls until revoked', async () => {
    await go('account', 'Account');
    await page.fill('#key-name', 'ui test key');
    await page.click('#create-key button[type=submit]');
    const secret = (await page.locator('#new-key-secret').textContent()).trim();
    assert.match(secret, /^lk_/);
    const call = () => json(`${api}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${secret}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'Say hi.' }], max_tokens: 8 }),
    });
    const ok = await call();
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.ok(ok.body.choices[0].message.content.length > 0);
    assert.match(ok.headers.get('x-lattice-node'), /^0x[0-9a-f]{40}$/);
    const row = page.locator('tr', { hasText: 'ui test key' });
    await row.waitFor();
    await shot('account');
    await accessible('account');
    // After a reload the secret is gone for good.
    await page.reload();
    await page.locator('tr', { hasText: 'ui test key' }).waitFor();
    assert.equal(await page.locator('#new-key-secret').count(), 0);
    assert.equal(await page.getByText(secret).count(), 0);
    await page.getByRole('button', { name: 'Revoke key ui test key' }).click();
    await page.getByText('Key “ui test key” revoked.').waitFor();
    const revoked = await call();
    assert.equal(revoked.status, 401);
    assert.equal(revoked.body.error.code, 'invalid_api_key');
  });

  it('the account page shows the account on-chain and how to deposit', async () => {
    await go('account', 'Account');
    const acct = await page.evaluate(async () => (await fetch('/lattice/v1/account')).json());
    await page.locator('#chain-address').waitFor();
    assert.equal(await page.textContent('#chain-address'), acct.user.address.toLowerCase());
    // Settlement runs every 5 s: wait until the chats are settled and the faucet credit minted.
    await waitFor('the ledger and the chain to agree', async () => {
      const c = await page.evaluate(async () => (await fetch('/lattice/v1/account/chain')).json());
      return c.in_sync && c.position.unsettled === '0' && c.position.unminted === '0';
    }, 60_000);
    const c = await page.evaluate(async () => (await fetch('/lattice/v1/account/chain')).json());
    assert.ok(BigInt(c.position.settled) > 0n, 'the chats were settled on-chain');
    await page.reload();
    await page.locator('#chain-sync', { hasText: 'Ledger and chain agree' }).waitFor({ timeout: 30_000 });
    const custody = BigInt(await page.getAttribute('#chain-custody .value', 'data-units'));
    const offChain = BigInt(await page.getAttribute('#chain-offchain .value', 'data-units'));
    assert.equal(custody, BigInt(c.on_chain.custody), 'custody as the chain says');
    assert.equal(custody, offChain, 'everything off-chain is settled: custody = credit');
    assert.equal(BigInt(await page.getAttribute('#chain-settled .value', 'data-units')), BigInt(c.position.settled));
    assert.match(await page.textContent('#chain-pending'), /Everything credited to you off-chain is reflected on-chain/);
    assert.equal(await page.textContent('#faucet-command'), `lattice chain faucet ${acct.user.address.toLowerCase()} 10`);
    const deposit = await page.$$eval('#deposit-calls li', (lis) => lis.map((li) => li.textContent));
    assert.deepEqual(deposit, [`approve(${c.chain.users}, amount) to the LAI token ${c.chain.token}`,
      `depositFor(${acct.user.address.toLowerCase()}, amount) to the UserRegistry ${c.chain.users}`]);
    assert.match(await page.textContent('#withdraw-note'), /use “Withdraw” below/);
    await shot('account-onchain');
    await accessible('account-onchain');
  });

  it('withdraws credit: the balance drops at once, the withdrawal is confirmed and the LAI is in the wallet', async () => {
    const acct = await page.evaluate(async () => (await fetch('/lattice/v1/account')).json());
    const me = acct.user.address.toLowerCase();
    const dest = '0x00000000000000000000000000000000000000d1';
    await page.locator('#withdrawals-empty').waitFor();
    assert.match(await page.textContent('#withdrawals-empty'), /No withdrawals yet/);
    assert.equal(await page.inputValue('#withdraw-to'), me, 'the destination defaults to the account address');
    await accessible('account-withdraw-empty');
    const before = BigInt(acct.balance.available);

    // Bad input is caught in the page; more than the credit is the server's 402, shown plainly.
    await page.fill('#withdraw-amount', 'lots');
    await page.click('#withdraw-submit');
    await page.locator('#withdraw-status [role=alert]', { hasText: 'an amount of LAI' }).waitFor();
    await page.fill('#withdraw-amount', '1000000');
    await page.fill('#withdraw-to', dest);
    await page.click('#withdraw-submit');
    await page.locator('#withdraw-status [role=alert]', { hasText: 'Not enough credit' }).waitFor();
    await page.locator('#withdrawals-table tr[data-status="rejected"]').waitFor();
    assert.equal(await balanceUnits(), before, 'a refused withdrawal changes nothing');
    await shot('account-withdraw-402');
    await accessible('account-withdraw-402');

    // 1.5 LAI to a fresh address: off the balance at once, then confirmed on-chain.
    const amount = 15n * 10n ** 17n;
    assert.equal((await json(`${api}/lattice/v1/chain/accounts/${dest}`)).body.wallet, '0');
    await page.fill('#withdraw-amount', '1.5');
    await page.click('#withdraw-submit');
    await page.locator('#withdraw-status .notice.ok').waitFor();
    await waitFor('the page to show the debit', async () =>
      BigInt(await page.getAttribute('#available', 'data-units')) === before - amount, 5_000);
    assert.equal(await balanceUnits(), before - amount);
    const row = page.locator('#withdrawals-table tr[data-status="confirmed"]');
    await row.waitFor({ timeout: 60_000 });
    assert.equal(await row.locator('td.num').getAttribute('data-units'), amount.toString());
    const listed = (await page.evaluate(async () => (await fetch('/lattice/v1/account/withdrawals')).json())).data;
    const w = listed.find((x) => x.status === 'confirmed');
    assert.equal(w.to, dest);
    assert.match(w.tx_hash, /^0x[0-9a-f]{64}$/);
    assert.equal(await row.locator('code.tx').getAttribute('title'), w.tx_hash, 'the transaction that paid it');
    const onchain = (await json(`${api}/lattice/v1/chain/accounts/${dest}`)).body;
    assert.equal(BigInt(onchain.wallet), amount, 'the destination holds the LAI');
    assert.equal(onchain.custody, '0');
    // Custody went down by the same amount: ledger and chain still agree.
    await waitFor('the ledger and the chain to agree', async () => {
      const c = await page.evaluate(async () => (await fetch('/lattice/v1/account/chain')).json());
      return c.in_sync && BigInt(c.position.withdrawn) === amount && c.position.withdrawing === '0'
        && BigInt(c.on_chain.custody) === BigInt(c.off_chain.available);
    }, 60_000);
    await page.locator('#chain-sync', { hasText: 'Ledger and chain agree' }).waitFor({ timeout: 30_000 });
    await shot('account-withdrawn');
    await accessible('account-withdrawn');
  });

  it('shows usage over time as a chart', async () => {
    await page.locator('#usage svg.chart rect.bar').first().waitFor({ state: 'attached' });
    const heights = await page.$$eval('#usage svg.chart rect.bar', (rs) => rs.map((r) => Number(r.getAttribute('height'))));
    assert.ok(heights.some((x) => x > 0), 'a bar for today');
    await page.selectOption('#usage-group', 'model');
    await page.locator('#usage svg.chart text', { hasText: MODEL }).waitFor();
  });

  it('keeps chat history only after opting in, and deleting it works', async () => {
    await shortAnswers();
    await page.check('#keep-history');
    await page.getByText('Saved: new chats are kept.').waitFor();
    await go('chat');
    await page.locator(`#model option[value="${MODEL}"]`).waitFor({ state: 'attached' });
    await page.click('#new-chat');
    await page.fill('#prompt', 'Name a colour of the sky.');
    await page.press('#prompt', 'Enter');
    await page.locator('.msg.assistant .meta .cost').waitFor({ timeout: 120_000 });
    const item = page.locator('#conversations li', { hasText: 'Name a colour of the sky.' });
    await item.waitFor();
    await shot('chat-history');
    await item.getByRole('button', { name: /Delete conversation/ }).click();
    await page.getByText('Conversation deleted.').waitFor();
    const list = await page.evaluate(async () => (await fetch('/lattice/v1/history')).json());
    assert.equal(list.data.length, 0);
    await page.unroute('**/v1/chat/completions');
  });

  it('the network explorer shows live nodes and the settlement state', async () => {
    await go('network', 'Network');
    const row = page.locator('#nodes tr', { hasText: 'ui-node-1' });
    await row.waitFor();
    await row.getByText('Healthy').waitFor();
    await page.locator('#chain').getByText('Pending batches').waitFor();
    // Each node on-chain: the operator sponsored its stake when it registered, so it is active
    // with the minimum stake, and nothing is staked in its pool yet (no APY).
    const address = (await json(`${api}/lattice/v1/nodes`)).body.online[0].address.toLowerCase();
    const onchain = (await json(`${api}/lattice/v1/chain/accounts/${address}`)).body;
    const chainRow = page.locator(`#onchain-nodes tr[data-address="${address}"]`);
    await chainRow.waitFor({ timeout: 30_000 });
    assert.match(await chainRow.textContent(), /ui-node-1/);
    assert.equal(await chainRow.locator('.chain-status').textContent(), 'Active');
    const stake = BigInt(await chainRow.locator('.chain-stake').getAttribute('data-units'));
    assert.ok(stake > 0n, 'the node has stake on-chain');
    assert.equal(stake, BigInt(onchain.node.stake));
    assert.equal(stake, BigInt(onchain.min_stake));
    assert.equal(await chainRow.locator('.chain-pool').getAttribute('data-units'), '0');
    assert.equal(await chainRow.locator('.chain-apy').textContent(), '—');
    // Updated without a reload.
    const t1 = await page.textContent('#live');
    await waitFor('a refresh', async () => (await page.textContent('#live')) !== t1, 30_000);
    await shot('network');
    await accessible('network');
  });

  it('run a node: a node token in the exact command; the node appears under "Your nodes", calibrates, and is refused once revoked', async () => {
    await go('node', 'Run a node');
    const cmd = await page.textContent('#node-command');
    assert.equal(cmd, `lattice node --nexus ${base} --model ${MODEL} --price-in 100000000000000000 --price-out 200000000000000000`);
    await page.locator('#my-nodes-empty').getByText('No nodes yet').waitFor();
    await page.locator('#node-tokens').getByText('No node tokens yet.').waitFor();
    await page.fill('#price-out', '0.3');
    await page.fill('#node-label', 'ui-node-2');
    await page.click('#create-node-token');
    await page.locator('#node-token-created').waitFor();
    const mine = (await page.textContent('#node-command')).split(' ');
    assert.deepEqual(mine.slice(0, 2), ['lattice', 'node']);
    assert.ok(mine.join(' ').includes('--price-out 300000000000000000 --label ui-node-2 --token lnt_'), mine.join(' '));
    const secret = mine[mine.indexOf('--token') + 1];
    assert.match(secret, /^lnt_[A-Za-z0-9_-]{43}$/);
    // Listed by its label and prefix, never the secret; not used yet.
    const tokenRow = page.locator('#node-tokens tr', { hasText: 'ui-node-2' });
    await tokenRow.getByText('not used yet').waitFor();
    assert.ok(!(await page.textContent('#node-tokens')).includes(secret));
    await page.locator('#my-nodes-empty').getByText('Waiting for your node to link').waitFor();
    await accessible('run-a-node-token');
    // Every status the row shows, in order.
    await page.evaluate(() => {
      window.__statuses = [];
      new MutationObserver(() => {
        const s = document.querySelector('#my-nodes tr[data-address]')?.dataset.status;
        if (s && window.__statuses[window.__statuses.length - 1] !== s) window.__statuses.push(s);
      }).observe(document.getElementById('my-nodes'), { childList: true, subtree: true, attributes: true });
    });
    // Run exactly that command (plus a key file and a free port for this test).
    const node2 = await lattice([...mine.slice(1), '--port', '0', '--threads', '1', '--ctx-per-slot', '1024', '--key', join(dir, 'node2.key')], 'node 2', { capture: true });
    const row = page.locator('#my-nodes tr[data-address]');
    await row.waitFor({ timeout: LONG });
    const address = await row.getAttribute('data-address');
    await page.locator(`#my-nodes tr[data-address="${address}"][data-status="healthy"]`).waitFor({ timeout: LONG });
    const statuses = await page.evaluate(() => window.__statuses);
    assert.equal(statuses[statuses.length - 1], 'healthy');
    assert.ok(statuses.every((x) => ['calibrating', 'healthy'].includes(x)), `appears, calibrates, healthy: ${statuses}`);
    assert.match(await row.textContent(), /ui-node-2/);
    // Bound to this account: the API says so, and the token names the node.
    const acct = await page.evaluate(async () => (await fetch('/lattice/v1/account')).json());
    const online = (await json(`${api}/lattice/v1/nodes`)).body.online;
    assert.equal(online.find((n) => n.address === address)?.owner, acct.user.address.toLowerCase());
    assert.equal(online.find((n) => n.label === 'ui-node-1')?.owner, null, 'a node without a token has no owner');
    await tokenRow.locator(`[title="${address}"]`).waitFor();
    // Earnings as the ledger has them, and the stake the operator sponsored on-chain.
    const earnings = (await json(`${api}/lattice/v1/nodes/${address}/earnings`)).body;
    assert.equal(await row.locator('.node-earned').getAttribute('data-units'), earnings.earned);
    await row.locator('.node-stake .badge', { hasText: 'Active' }).waitFor({ timeout: 30_000 });
    const onchain = (await json(`${api}/lattice/v1/chain/accounts/${address}`)).body;
    assert.equal(await row.locator('.node-stake').getAttribute('data-units'), onchain.node.stake);
    assert.ok(BigInt(onchain.node.stake) > 0n);
    await shot('run-a-node');
    await accessible('run-a-node');
    // The explorer marks it as the signed-in user's.
    await go('network', 'Network');
    await page.locator('#nodes tr', { hasText: 'ui-node-2' }).locator('.owner', { hasText: 'Your node' }).waitFor();
    // Revoke the token: the node is disconnected at once and refused when it reconnects.
    await go('node', 'Run a node');
    await page.getByRole('button', { name: 'Revoke node token ui-node-2' }).click();
    await page.locator('#node-token-revoked').getByText(/revoked\. Node .* was disconnected/).waitFor();
    const gone = page.locator(`#my-nodes tr[data-address="${address}"][data-status="offline"]`);
    await gone.waitFor({ timeout: 30_000 });
    await gone.getByText('token revoked').waitFor();
    await waitFor('Nexus to refuse the revoked token', async () =>
      node2.log.text.includes('node token refused: this node token was revoked'), 60_000);
    const tries = (node2.log.text.match(/this node token was revoked/g) || []).length;
    await waitFor('the node to try again and be refused again', async () =>
      (node2.log.text.match(/this node token was revoked/g) || []).length > tries, 30_000);
    assert.ok(!(await json(`${api}/lattice/v1/nodes`)).body.online.some((n) => n.address === address), 'not online');
    await shot('run-a-node-revoked');
    // And the explorer shows it offline.
    await go('network', 'Network');
    await page.locator('#known tr', { hasText: 'ui-node-2' }).waitFor({ timeout: 60_000 });
    assert.equal(await page.locator('#nodes tr', { hasText: 'ui-node-2' }).count(), 0);
    await page.locator('#nodes tr', { hasText: 'ui-node-1' }).waitFor();
    await shot('network-node-offline');
    node2.child.kill('SIGKILL');
  });

  it('run a node: each pool with its expected APY, the exact staking calls, and a wallet sends them', async () => {
    await go('node', 'Run a node');
    const address = (await json(`${api}/lattice/v1/nodes`)).body.online[0].address.toLowerCase();
    await page.locator(`#stake-node option[value="${address}"]`).waitFor({ state: 'attached' });
    await page.selectOption('#stake-node', address);
    await page.locator('#stake-calls li').nth(1).waitFor();
    assert.equal(await page.textContent('#stake-apy'), '—', 'nothing staked: no APY');
    assert.equal(await page.textContent('#stake-command'), `lattice chain stake ${address} 10`);
    assert.match(await page.textContent('#wallet-none'), /no RPC endpoint a wallet could send to/);
    assert.equal(await page.locator('#stake-wallet').count(), 0, 'no wallet button on the embedded chain');
    const calls = (await json(`${api}/lattice/v1/chain/calls/stake?to=${address}&amount=${10n * 10n ** 18n}`)).body;
    const shown = await page.$$eval('#stake-calls li', (lis) => lis.map((li) => li.querySelector('code.calldata').textContent));
    assert.deepEqual(shown, calls.transactions.map((t) => t.data));
    assert.match(calls.transactions[0].data, /^0x095ea7b3/, 'approve first');
    await shot('run-a-node-stake');

    // A wallet on an RPC chain (simulated: an injected EIP-1193 provider that records what it is
    // asked to send, and the chain reported as "rpc"): the page sends exactly the two calls.
    const p2 = await context.newPage();
    try {
      await p2.addInitScript((chainId) => {
        window.__sent = [];
        window.ethereum = {
          request: async ({ method, params }) => {
            if (method === 'eth_requestAccounts') return ['0x00000000000000000000000000000000000000aa'];
            if (method === 'eth_chainId') return `0x${chainId.toString(16)}`;
            if (method === 'eth_sendTransaction') { window.__sent.push(params[0]); return `0x${String(window.__sent.length).padStart(64, '0')}`; }
            throw new Error(`unexpected ${method}`);
          },
        };
      }, calls.chain_id);
      await p2.route('**/lattice/v1/chain/nodes', async (route) => {
        const r = await route.fetch();
        const body = await r.json();
        body.chain.kind = 'rpc';
        await route.fulfill({ response: r, json: body });
      });
      await p2.goto(`${base}/#/node`);
      await p2.locator(`#stake-node option[value="${address}"]`).waitFor({ state: 'attached' });
      await p2.selectOption('#stake-node', address);
      await p2.fill('#stake-amount', '10');
      await p2.locator('#stake-wallet').click();
      await p2.locator('#stake-sent').waitFor();
      const sent = await p2.evaluate(() => window.__sent);
      assert.deepEqual(sent, calls.transactions.map((t) => ({ from: '0x00000000000000000000000000000000000000aa', to: t.to, data: t.data })));
      await p2.evaluate(() => window.scrollTo(0, 0));
      await p2.screenshot({ path: join(ARTIFACTS, 'run-a-node-wallet.png'), fullPage: true });
    } finally {
      await p2.close();
    }
  });

  it('fits a phone screen', async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    try {
      for (const route of ['chat', 'network', 'account', 'node', 'signin']) {
        await go(route);
        await page.locator('main .page').waitFor();
        await page.waitForLoadState('networkidle');
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
        await shot(`phone-${route}`);
        assert.ok(overflow <= 1, `${route} overflows a phone screen by ${overflow}px`);
      }
    } finally {
      await page.setViewportSize({ width: 1280, height: 860 });
    }
  });

  it('is usable by keyboard', async () => {
    await go('chat');
    await page.locator(`#model option[value="${MODEL}"]`).waitFor({ state: 'attached' });
    // Tab through the whole page: every control is reached, the skip link among them.
    const reached = new Set();
    for (let i = 0; i < 60; i += 1) {
      await page.keyboard.press('Tab');
      reached.add(await page.evaluate(() => document.activeElement.id || document.activeElement.textContent.trim().slice(0, 20)));
    }
    for (const id of ['Skip to content', 'model', 'preference', 'prompt', 'send', 'new-chat']) assert.ok(reached.has(id), `Tab reaches ${id}: ${[...reached]}`);
    // Typing and Enter send.
    await shortAnswers();
    await page.focus('#prompt');
    await page.keyboard.type('Say one word.');
    await page.keyboard.press('Enter');
    await page.locator('.msg.user', { hasText: 'Say one word.' }).waitFor();
    await page.locator('.msg.assistant:last-child .meta').waitFor({ timeout: 120_000 });
    await page.unroute('**/v1/chat/completions');
  });

  it('shows when Nexus is down, the node gone offline, and no console errors', async () => {
    await go('network', 'Network');
    await page.locator('#nodes tr', { hasText: 'ui-node-1' }).waitFor();
    node1.child.kill('SIGKILL');
    await page.getByText('No node is online').waitFor({ timeout: 60_000 });
    nexus.child.kill('SIGKILL');
    await page.locator('#banner').getByText('Cannot reach Nexus').waitFor({ timeout: 30_000 });
    await page.locator('#live').getByText('Connection lost').waitFor();
    await shot('network-down');
    const real = problems.filter((p) => !/net::ERR_CONNECTION_REFUSED|Failed to fetch/.test(p));
    assert.deepEqual(real, [], 'console errors or CSP violations in the browser');
  });

  // Last: cookies are per host, not per port, so this Nexus's session replaces the first one's.
  it('signs in with an OpenID provider when one is configured', async () => {
    const port = await freePort();
    const base2 = `http://localhost:${port}`;
    const provider = await new Promise((resolve, reject) => {
      const child = spawn('node', ['provider.mjs', '0'], {
        cwd: join(HERE, '../oidc'), stdio: ['pipe', 'pipe', 'ignore'],
        env: { ...process.env, OIDC_CLIENT_ID: 'ui-client', OIDC_CLIENT_SECRET: 'ui-secret',
          OIDC_REDIRECT_URIS: `${base2}/lattice/v1/auth/oidc/callback`, OIDC_EXIT_ON_STDIN_EOF: '1' },
      });
      procs.push(child);
      let buf = '';
      child.stdout.setEncoding('utf8');
      child.stdout.on('data', (d) => {
        buf += d;
        const m = /READY (\S+)/.exec(buf);
        if (m) resolve(m[1]);
      });
      child.on('exit', (code) => reject(new Error(`the OpenID provider exited (${code})`)));
    });
    // A directory of its own: the embedded chain lives beside the database, and two databases
    // settling to one chain do not reconcile (Nexus reports it).
    const dir2 = join(dir, 'oidc');
    mkdirSync(dir2, { recursive: true });
    await lattice(['nexus', '--listen', `127.0.0.1:${port}`, '--public-url', base2, '--db', join(dir2, 'nexus.db'),
      '--oidc-issuer', provider, '--oidc-client-id', 'ui-client', '--oidc-client-secret', 'ui-secret'], 'nexus 2');
    await page.goto(`${base2}/#/signin`);
    await page.getByRole('heading', { name: 'Sign in to Lattice', level: 1 }).waitFor();
    await page.click('#oidc');
    // The provider's own login and consent forms.
    await page.locator('input[name=login]').fill('grace');
    await page.locator('input[name=password]').fill('any-password');
    await page.locator('button[type=submit]').click();
    await page.locator('button[type=submit]').click(); // consent
    await page.getByRole('heading', { name: 'Welcome to Lattice' }).waitFor({ timeout: 30_000 });
    assert.equal(await page.textContent('#faucet-amount'), '10 LAI');
    const a = await page.evaluate(async () => (await fetch('/lattice/v1/account')).json());
    assert.ok(a.identities.some((i) => i.kind.startsWith('oidc:')), JSON.stringify(a.identities));
    await shot('welcome-oidc');
  });
});
