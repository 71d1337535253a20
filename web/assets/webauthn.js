// Passkeys: the JSON the server sends (webauthn-rs, base64url byte fields) to the browser's
// WebAuthn API and the credential back to JSON.

import { api } from './api.js';

function fromB64url(s) {
  const b64 = s.replace(/-/g, '+').replace(/_/g, '/');
  const bin = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i += 1) out[i] = bin.charCodeAt(i);
  return out.buffer;
}

function toB64url(buf) {
  const bytes = new Uint8Array(buf);
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

export function supported() {
  return Boolean(window.PublicKeyCredential && navigator.credentials);
}

function creationOptions(o) {
  const pk = { ...o.publicKey };
  pk.challenge = fromB64url(pk.challenge);
  pk.user = { ...pk.user, id: fromB64url(pk.user.id) };
  pk.excludeCredentials = (pk.excludeCredentials || []).map((c) => ({ ...c, id: fromB64url(c.id) }));
  return { publicKey: pk };
}

function requestOptions(o) {
  const pk = { ...o.publicKey };
  pk.challenge = fromB64url(pk.challenge);
  pk.allowCredentials = (pk.allowCredentials || []).map((c) => ({ ...c, id: fromB64url(c.id) }));
  return { publicKey: pk };
}

function friendly(err) {
  if (err?.name === 'NotAllowedError') return new Error('The passkey prompt was cancelled or timed out.');
  if (err?.name === 'InvalidStateError') return new Error('This device already has a passkey for that account.');
  if (err?.name === 'SecurityError') return new Error('Passkeys need a domain name: open Nexus at http://localhost:PORT, not an IP address.');
  return err;
}

/** Creates an account (or adds a passkey to the signed-in one); resolves with the sign-in result. */
export async function register(name) {
  const start = await api('/lattice/v1/auth/passkey/register/start', { method: 'POST', body: { name } });
  let cred;
  try {
    cred = await navigator.credentials.create(creationOptions(start.options));
  } catch (e) { throw friendly(e); }
  const credential = {
    id: cred.id,
    rawId: toB64url(cred.rawId),
    type: cred.type,
    response: {
      attestationObject: toB64url(cred.response.attestationObject),
      clientDataJSON: toB64url(cred.response.clientDataJSON),
    },
    extensions: cred.getClientExtensionResults(),
  };
  return api('/lattice/v1/auth/passkey/register/finish', { method: 'POST', body: { challenge: start.challenge, credential } });
}

export async function signIn(name) {
  const start = await api('/lattice/v1/auth/passkey/login/start', { method: 'POST', body: { name } });
  let cred;
  try {
    cred = await navigator.credentials.get(requestOptions(start.options));
  } catch (e) { throw friendly(e); }
  const r = cred.response;
  const credential = {
    id: cred.id,
    rawId: toB64url(cred.rawId),
    type: cred.type,
    response: {
      authenticatorData: toB64url(r.authenticatorData),
      clientDataJSON: toB64url(r.clientDataJSON),
      signature: toB64url(r.signature),
      userHandle: r.userHandle ? toB64url(r.userHandle) : null,
    },
    extensions: cred.getClientExtensionResults(),
  };
  return api('/lattice/v1/auth/passkey/login/finish', { method: 'POST', body: { challenge: start.challenge, credential } });
}
