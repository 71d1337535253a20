// The same-origin API. Browser sessions are the HttpOnly `lattice_session` cookie that the
// sign-in endpoints set: fetch sends it, and scripts never see the token.

export class ApiError extends Error {
  constructor(status, message, { code = null, type = null, retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.type = type;
    this.retryAfter = retryAfter;
  }
  get offline() { return this.status === 0; }
}

const listeners = new Set();
/** Called with every ApiError (the app shows a banner for a lost connection, drops a dead session). */
export function onApiError(fn) { listeners.add(fn); }
function report(e) { for (const fn of listeners) fn(e); }

/** A friendly message for an HTTP error, keeping the server's words where they help. */
function explain(status, raw, code) {
  const message = raw && !/[.!?]$/.test(raw.trim()) ? `${raw.trim()}.` : raw;
  switch (status) {
    case 401: return code === 'invalid_api_key' || /sign in|session/i.test(message) ? 'You are signed out. Sign in to continue.' : message;
    case 402: return `Not enough credit. ${message}`;
    case 429: return `Too many requests: ${message}`;
    case 503: return message || 'The network is busy; retry shortly.';
    default: return message || `The server answered ${status}.`;
  }
}

/** Turns a non-2xx response into an ApiError (OpenAI envelope `{error:{message,type,code}}`). */
export async function errorFrom(resp) {
  let message = '';
  let code = null;
  let type = null;
  try {
    const body = await resp.json();
    message = body?.error?.message || '';
    code = body?.error?.code || null;
    type = body?.error?.type || null;
  } catch { /* not JSON */ }
  const e = new ApiError(resp.status, explain(resp.status, message, code), {
    code, type, retryAfter: resp.headers.get('retry-after'),
  });
  return e;
}

/** fetch() that never rejects with a bare TypeError: a lost connection is ApiError(0). */
export async function request(path, { method = 'GET', body, headers = {}, signal } = {}) {
  const init = { method, headers: { ...headers }, signal, credentials: 'same-origin' };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['content-type'] = 'application/json';
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    if (err?.name === 'AbortError') throw err;
    const e = new ApiError(0, 'Cannot reach Nexus: it may be down, or your connection was lost.');
    report(e);
    throw e;
  }
  if (!resp.ok) {
    const e = await errorFrom(resp);
    report(e);
    throw e;
  }
  report(null);
  return resp;
}

export async function api(path, opts) {
  const resp = await request(path, opts);
  if (resp.status === 204) return null;
  return resp.json();
}

/**
 * Streams a chat completion (SSE). Calls onDelta(text) as text arrives; resolves with
 * {usage, finish, node, requestId} or rejects with ApiError / AbortError.
 */
export async function streamChat({ model, messages, preference, conversation, signal, maxTokens }, onDelta) {
  const headers = { 'x-lattice-preference': preference || 'latency' };
  if (conversation) headers['x-lattice-conversation'] = conversation;
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  if (maxTokens) body.max_tokens = maxTokens;
  const resp = await request('/v1/chat/completions', { method: 'POST', body, headers, signal });
  const node = resp.headers.get('x-lattice-node');
  const requestId = resp.headers.get('x-request-id');
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let usage = null;
  let finish = null;
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (err?.name === 'AbortError' || signal?.aborted) throw new DOMException('aborted', 'AbortError');
      throw new ApiError(0, 'The connection to Nexus was lost mid-answer.');
    }
    if (chunk.done) break;
    buf += decoder.decode(chunk.value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of event.split('\n')) {
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6);
        if (data === '[DONE]') return { usage, finish, node, requestId };
        let json;
        try { json = JSON.parse(data); } catch { continue; }
        if (json.error) throw new ApiError(502, json.error.message || 'The node failed mid-answer.', { code: json.error.code });
        const choice = json.choices?.[0];
        if (choice?.delta?.content) onDelta(choice.delta.content);
        if (choice?.finish_reason) finish = choice.finish_reason;
        if (json.usage) usage = json.usage;
      }
    }
  }
  if (!usage) throw new ApiError(502, 'The answer ended early.');
  return { usage, finish, node, requestId };
}
