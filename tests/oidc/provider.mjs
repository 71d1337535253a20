// Minimal local OpenID Provider for end-to-end tests (oidc-provider by panva).
// Usage: node provider.mjs [port]    (port 0 / unset => ephemeral)
// Env:   PORT, OIDC_CLIENT_ID, OIDC_CLIENT_SECRET, OIDC_REDIRECT_URIS (space/comma separated)
// Prints "READY <issuer>" on stdout once listening.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import Provider from 'oidc-provider';

const HOST = '127.0.0.1';
const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
const clientId = process.env.OIDC_CLIENT_ID ?? 'test-client';
const clientSecret = process.env.OIDC_CLIENT_SECRET ?? 'test-secret';
const redirectUris = (process.env.OIDC_REDIRECT_URIS ?? 'http://127.0.0.1:9/callback')
  .split(/[\s,]+/).filter(Boolean);

// Own signing key (avoids the "quick start development-only signing keys" warning).
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', use: 'sig', alg: 'RS256' };

// Bind first so an ephemeral port is known before the issuer (which must match discovery) is fixed.
const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, HOST, resolve);
});
const issuer = `http://${HOST}:${server.address().port}`;

const configuration = {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: redirectUris,
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  jwks: { keys: [jwk] },
  cookies: { keys: [randomBytes(32).toString('hex')] }, // signed cookies
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
  },
  scopes: ['openid', 'email', 'profile'],
  // Put scope-requested claims into the ID token as well (default true => only via userinfo for code flow).
  conformIdTokenClaims: false,
  pkce: { required: () => true }, // S256 is the only method allowed by default
  features: {
    devInteractions: { enabled: true }, // built-in login (prompt=login, login, password) + consent (prompt=consent) forms
  },
  // Silence "default clientBasedCORS function called" NOTICE; no browser CORS in tests.
  clientBasedCORS: () => false,
  async findAccount(ctx, id) {
    const sub = String(id);
    return {
      accountId: sub,
      async claims(_use, _scope) {
        return { sub, email: `${sub}@example.test`, email_verified: true, name: `Test User ${sub}` };
      },
    };
  },
};

const provider = new Provider(issuer, configuration);
provider.on('server_error', (ctx, err) => console.error('server_error', err));
server.on('request', provider.callback());

console.log(`READY ${issuer}`);

const shutdown = () => server.close(() => process.exit(0));
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
// Optionally exit when the parent (test) closes our stdin, so no orphan survives a crashed test.
if (process.env.OIDC_EXIT_ON_STDIN_EOF) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.resume();
}
