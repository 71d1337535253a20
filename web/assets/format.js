// Numbers, money and time for people. Money is an integer count of the smallest LAI unit
// (10⁻¹⁸ LAI) carried as a decimal string: BigInt arithmetic only, never floats.

const UNIT = 10n ** 18n;

export function units(v) {
  try { return BigInt(v ?? 0); } catch { return 0n; }
}

/** "12.5 LAI" with up to `digits` decimals, trailing zeros dropped; tiny amounts keep precision. */
export function lai(v, digits = 6) {
  let u = units(v);
  const neg = u < 0n;
  if (neg) u = -u;
  const whole = u / UNIT;
  let frac = (u % UNIT).toString().padStart(18, '0');
  let shown = frac.slice(0, digits).replace(/0+$/, '');
  if (!shown && u > 0n && whole === 0n) {
    // Below the shown precision: show the first significant digits instead of "0".
    const first = frac.search(/[1-9]/);
    shown = frac.slice(0, Math.min(18, first + 3)).replace(/0+$/, '');
  }
  const w = whole.toLocaleString('en-US');
  return `${neg ? '−' : ''}${w}${shown ? '.' + shown : ''} LAI`;
}

/** Parses "0.25" (LAI) into units; null when it is not a non-negative decimal. */
export function parseLai(s) {
  const m = /^\s*(\d{0,12})(?:\.(\d{0,18}))?\s*$/.exec(String(s));
  if (!m || (m[1] === '' && (m[2] ?? '') === '')) return null;
  return BigInt(m[1] || '0') * UNIT + BigInt((m[2] || '').padEnd(18, '0') || '0');
}

/** Cost of a request: (prompt × price_in + completion × price_out) / 10⁶, rounded down. */
export function cost(usage, price) {
  if (!usage || !price) return null;
  return (BigInt(usage.prompt_tokens) * units(price.input_per_mtok)
    + BigInt(usage.completion_tokens) * units(price.output_per_mtok)) / 1_000_000n;
}

export function num(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return '—';
  return Number(n).toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function shortAddr(a) {
  return a && a.length > 14 ? `${a.slice(0, 6)}…${a.slice(-4)}` : (a || '');
}

export function duration(s) {
  s = Math.max(0, Math.floor(s || 0));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

/** "5 minutes ago" for a unix time in seconds. */
export function ago(unix) {
  if (!unix) return '—';
  const s = Math.floor(Date.now() / 1000 - unix);
  if (s < 5) return 'just now';
  return `${duration(s).split(' ')[0].replace(/s$/, ' s').replace(/m$/, ' min').replace(/h$/, ' h').replace(/d$/, ' d')} ago`;
}

export function date(unix) {
  if (!unix) return '—';
  return new Date(unix * 1000).toLocaleString('en-GB', { dateStyle: 'medium', timeStyle: 'short' });
}

/** An expected APY (a fraction, 0.12 = 12 %) as a percentage; "—" when there is none. */
export function apy(v) {
  if (v === null || v === undefined || Number.isNaN(Number(v))) return '—';
  return `${Number(v * 100).toLocaleString('en-US', { maximumFractionDigits: 2 })} %`;
}

/** On-chain reputation in basis points as the explorer's 0–1 scale. */
export function bps(v) {
  return num((Number(v) || 0) / 10000, 2);
}
