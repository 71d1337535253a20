#!/usr/bin/env python3
"""Throughput benchmark client for any OpenAI-compatible chat server.

Python 3.11 stdlib only (http.client + threads). Measures, with streaming
/v1/chat/completions (stream=true, stream_options.include_usage=true,
temperature 0, ignore_eos=true so the decode length is fixed):

  prompt   single stream: a ~500-token unique prompt, max_tokens=1;
           prompt_tokens / time-to-first-token. Median of --runs.
  decode   single stream: max_tokens=128 on a short unique prompt;
           (completion_tokens - 1) / (t_last_token - t_first_token). Median.
  agg      --concurrency streams (default 4) started together, max_tokens=128:
           sum(completion_tokens) / (last token of all - first token of any).
           Median of --rounds.

Every prompt starts with a random nonce (in a system message, ahead of the
user text) so no server can reuse a cached KV prefix beyond the template's
first few tokens.

Token counts come from the usage chunk; if a server sends none, the number of
content chunks is used instead (and the result says so).

Usage:
  bench.py --url http://127.0.0.1:8080 --model NAME [--label llama-server]
           [--runs 5] [--rounds 3] [--out result.json] [--wait-health 300]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import string
import sys
import threading
import time
import urllib.parse

# Plain common English words: with BPE tokenizers of small chat models each is
# roughly one token, and the prompt length is calibrated from the server's
# reported prompt_tokens anyway.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this "
    "which have had are were but not all been one their there when who will "
    "more would about into can time only new some could these other than then "
    "its two first after over also many where most may any people such years "
    "under through city world made state while long same part during great "
    "house water small light river stone market winter summer garden window "
    "letter number morning evening station mountain village kitchen table "
    "school teacher doctor family friend animal forest island bridge road "
    "travel simple quiet early later music paper story history science money "
    "language country night power field street color order game play rain"
).split()


def now() -> float:
    return time.perf_counter()


def nonce(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(12))


class Server:
    def __init__(self, url: str, model: str, timeout: float, api_key: str | None):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", ""):
            raise SystemExit(f"only http:// URLs are supported, got {url!r}")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        base = u.path.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        self.base = base
        self.model = model
        self.timeout = timeout
        self.api_key = api_key

    def conn(self) -> http.client.HTTPConnection:
        c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        c.connect()
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return c

    def get(self, path: str) -> tuple[int, bytes]:
        c = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            c.request("GET", self.base + path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def wait_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                status, body = self.get("/health")
                if status == 200:
                    return
                last = f"HTTP {status} {body[:200]!r}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.5)
        raise SystemExit(f"server at {self.host}:{self.port} not healthy after {timeout}s: {last}")

    def stream_chat(self, messages: list[dict], max_tokens: int,
                    start_barrier: threading.Barrier | None = None) -> dict:
        """One streaming chat completion. Returns timings (perf_counter) and counts."""
        body = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        c = self.conn()
        try:
            if start_barrier is not None:
                start_barrier.wait()
            t_send = now()
            c.request("POST", self.base + "/v1/chat/completions", body=data, headers=headers)
            r = c.getresponse()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]!r}")
            t_first = t_last = t_finish = None
            content_chunks = 0
            usage = None
            timings = None
            text = []
            finish_reason = None
            while True:
                line = r.readline()
                if not line:
                    break
                t = now()
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                ev = json.loads(payload)
                if "error" in ev:
                    raise RuntimeError(f"server error: {ev['error']}")
                if ev.get("usage"):
                    usage = ev["usage"]
                if ev.get("timings"):
                    timings = ev["timings"]
                for ch in ev.get("choices") or []:
                    delta = ch.get("delta") or {}
                    piece = delta.get("content") or delta.get("reasoning_content")
                    if piece:
                        content_chunks += 1
                        text.append(piece)
                        if t_first is None:
                            t_first = t
                        t_last = t
                    if ch.get("finish_reason"):
                        finish_reason = ch["finish_reason"]
                        t_finish = t
            t_end = now()
        finally:
            c.close()
        if t_first is None:  # no visible text (e.g. one special token): use the finish chunk
            t_first = t_last = t_finish or t_end
        out = {
            "t_send": t_send,
            "t_first": t_first,
            "t_last": t_last,
            "t_end": t_end,
            "content_chunks": content_chunks,
            "finish_reason": finish_reason,
            "text_chars": sum(len(s) for s in text),
        }
        if usage:
            out["prompt_tokens"] = usage.get("prompt_tokens")
            out["completion_tokens"] = usage.get("completion_tokens")
            out["tokens_from"] = "usage"
        else:
            out["prompt_tokens"] = None
            out["completion_tokens"] = content_chunks
            out["tokens_from"] = "content_chunks"
        if timings:
            out["server_timings"] = timings
        return out


def cpu_idle_fraction(seconds: float = 3.0) -> float | None:
    """Fraction of all CPUs idle over `seconds` (from /proc/stat), or None if unknown.
    Measured while the server under test is idle, it shows whether something
    else is competing for the cores (results are not comparable if so)."""
    def snap():
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
        return f[3] + (f[4] if len(f) > 4 else 0), sum(f[:8])  # idle+iowait, total
    try:
        i0, t0 = snap()
        time.sleep(seconds)
        i1, t1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (i1 - i0) / (t1 - t0) if t1 > t0 else None


def wait_quiet(limit_s: float, min_idle: float) -> float | None:
    deadline = time.monotonic() + limit_s
    idle = cpu_idle_fraction()
    while idle is not None and idle < min_idle and time.monotonic() < deadline:
        log(f"[bench] machine busy ({idle:.0%} idle < {min_idle:.0%}); waiting")
        idle = cpu_idle_fraction(5.0)
    return idle


def make_prompt(rng: random.Random, n_words: int) -> list[dict]:
    words = " ".join(rng.choice(WORDS) for _ in range(n_words))
    return [
        {"role": "system", "content": f"Session {nonce(rng)}. You are a helpful assistant."},
        {"role": "user", "content": f"Summarise the following notes in one sentence.\n\n{words}"},
    ]


def make_decode_prompt(rng: random.Random) -> list[dict]:
    topic = " ".join(rng.choice(WORDS) for _ in range(6))
    return [
        {"role": "system", "content": f"Session {nonce(rng)}. You are a helpful assistant."},
        {"role": "user", "content": f"Write a long, detailed story about {topic}."},
    ]


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summary(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2),
            "max": round(max(xs), 2), "runs": [round(x, 2) for x in xs]}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def calibrate_words(srv: Server, rng: random.Random, target: int) -> tuple[int, int | None]:
    """Pick the word count so that prompt_tokens ~= target (one short request)."""
    n = int(target * 0.9)
    r = srv.stream_chat(make_prompt(rng, n), 1)
    pt = r.get("prompt_tokens")
    if not pt:
        return n, None
    per_word = pt / n  # includes the fixed template overhead; good enough
    n2 = max(16, int(round(n * target / pt)))
    r = srv.stream_chat(make_prompt(rng, n2), 1)
    return n2, r.get("prompt_tokens") or int(n2 * per_word)


def bench_prompt(srv, rng, n_words, runs):
    rows = []
    for i in range(runs):
        r = srv.stream_chat(make_prompt(rng, n_words), 1)
        ttft = r["t_first"] - r["t_send"]
        pt = r["prompt_tokens"]
        tps = pt / ttft if pt else None
        rows.append({"prompt_tokens": pt, "ttft_s": round(ttft, 4), "tok_s": tps,
                     "server_timings": r.get("server_timings")})
        log(f"  prompt run {i + 1}/{runs}: {pt} tokens, TTFT {ttft * 1000:.0f} ms"
            + (f" -> {tps:.1f} tok/s" if tps else ""))
    return rows


def bench_decode(srv, rng, max_tokens, runs):
    rows = []
    for i in range(runs):
        r = srv.stream_chat(make_decode_prompt(rng), max_tokens)
        span = r["t_last"] - r["t_first"]
        ct = r["completion_tokens"]
        tps = (ct - 1) / span if ct and ct > 1 and span > 0 else None
        rows.append({"completion_tokens": ct, "tokens_from": r["tokens_from"],
                     "content_chunks": r["content_chunks"], "decode_s": round(span, 4),
                     "ttft_s": round(r["t_first"] - r["t_send"], 4), "tok_s": tps,
                     "finish_reason": r["finish_reason"], "server_timings": r.get("server_timings")})
        log(f"  decode run {i + 1}/{runs}: {ct} tokens ({r['tokens_from']}) in {span:.2f} s"
            + (f" -> {tps:.1f} tok/s" if tps else ""))
    return rows


def bench_aggregate(srv, rng, max_tokens, concurrency, rounds):
    rows = []
    for i in range(rounds):
        barrier = threading.Barrier(concurrency)
        results: list = [None] * concurrency
        errors: list = []
        prompts = [make_decode_prompt(rng) for _ in range(concurrency)]

        def work(k):
            try:
                results[k] = srv.stream_chat(prompts[k], max_tokens, barrier)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                barrier.abort()

        ths = [threading.Thread(target=work, args=(k,)) for k in range(concurrency)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        if errors:
            raise RuntimeError(f"aggregate round failed: {errors[0]!r}")
        first = min(r["t_first"] for r in results)
        last = max(r["t_last"] for r in results)
        total = sum(r["completion_tokens"] or 0 for r in results)
        span = last - first
        tps = total / span if span > 0 else None
        e2e = max(r["t_end"] for r in results) - min(r["t_send"] for r in results)
        per_stream = [((r["completion_tokens"] or 0) - 1) / (r["t_last"] - r["t_first"])
                      if r["t_last"] > r["t_first"] else None for r in results]
        rows.append({"completion_tokens": total, "span_s": round(span, 4), "tok_s": tps,
                     "e2e_s": round(e2e, 4), "e2e_tok_s": total / e2e if e2e > 0 else None,
                     "per_stream_tok_s": [round(x, 2) if x else None for x in per_stream],
                     "tokens_from": sorted({r["tokens_from"] for r in results})})
        log(f"  aggregate round {i + 1}/{rounds}: {total} tokens over {concurrency} streams in "
            f"{span:.2f} s -> {tps:.1f} tok/s (per stream: "
            + ", ".join(f"{x:.1f}" if x else "-" for x in per_stream) + ")")
    return rows


def print_table(res: dict, file=sys.stdout) -> None:
    m = res["metrics"]
    lbl = res.get("label") or res["url"]

    def f(x):
        return "-" if x is None else f"{x:.1f}"

    print(f"\n{lbl}  (model {res['model']}, {res['url']})", file=file)
    print(f"{'metric':<44} {'median':>9} {'min':>9} {'max':>9}", file=file)
    for key, name in (
        ("prompt_tok_s", f"prompt tok/s (1 stream, ~{res['params']['prompt_tokens_actual']} tok)"),
        ("decode_tok_s", f"decode tok/s (1 stream, {res['params']['decode_tokens']} tok)"),
        ("agg_decode_tok_s", f"aggregate decode tok/s ({res['params']['concurrency']} streams)"),
    ):
        s = m[key]
        print(f"{name:<44} {f(s['median']):>9} {f(s['min']):>9} {f(s['max']):>9}", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--model", required=True,
                    help="model name sent in requests ('auto': first id of GET /v1/models)")
    ap.add_argument("--label", default=None, help="name for this server in the output")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--runs", type=int, default=5, help="runs for prompt and decode (median)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the concurrent test")
    ap.add_argument("--prompt-tokens", type=int, default=500)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600, help="per-request socket timeout (s)")
    ap.add_argument("--wait-health", type=float, default=0,
                    help="first poll GET /health until 200, up to this many seconds")
    ap.add_argument("--wait-quiet", type=float, default=0,
                    help="before measuring, wait up to this many seconds for the CPUs to be "
                         "--min-idle idle (the idle fraction is recorded either way)")
    ap.add_argument("--min-idle", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=None, help="prompt RNG seed (default: random)")
    ap.add_argument("--skip", default="", help="comma list of tests to skip: prompt,decode,agg")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    a = ap.parse_args(argv)

    srv = Server(a.url, a.model, a.timeout, a.api_key)
    if a.wait_health:
        srv.wait_health(a.wait_health)
    if a.model == "auto":  # first id from GET /v1/models
        status, body = srv.get("/v1/models")
        ids = [m.get("id") for m in json.loads(body).get("data", [])] if status == 200 else []
        if not ids:
            raise SystemExit(f"--model auto: GET /v1/models gave HTTP {status} and no model ids")
        srv.model = a.model = ids[0]
        log(f"[bench] model: {a.model}")
    rng = random.Random(a.seed)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}

    idle_before = wait_quiet(a.wait_quiet, a.min_idle)
    if idle_before is not None:
        log(f"[bench] CPUs {idle_before:.0%} idle before the run"
            + ("" if idle_before >= a.min_idle else " -- BUSY: numbers will be low and noisy"))
    load_before = os.getloadavg()

    log(f"[bench] {a.label or a.url}: warm-up + calibrating a ~{a.prompt_tokens}-token prompt")
    srv.stream_chat(make_decode_prompt(rng), 8)  # warm-up
    n_words, pt_actual = calibrate_words(srv, rng, a.prompt_tokens)
    log(f"[bench] using {n_words} words -> {pt_actual} prompt tokens")

    t0 = time.time()
    prompt_rows = decode_rows = agg_rows = []
    if "prompt" not in skip:
        log("[bench] prompt throughput (single stream, max_tokens=1)")
        prompt_rows = bench_prompt(srv, rng, n_words, a.runs)
    if "decode" not in skip:
        log(f"[bench] decode throughput (single stream, max_tokens={a.decode_tokens})")
        decode_rows = bench_decode(srv, rng, a.decode_tokens, a.runs)
    if "agg" not in skip:
        log(f"[bench] aggregate decode ({a.concurrency} concurrent streams, "
            f"max_tokens={a.decode_tokens})")
        agg_rows = bench_aggregate(srv, rng, a.decode_tokens, a.concurrency, a.rounds)

    res = {
        "label": a.label,
        "url": a.url,
        "model": a.model,
        "started_unix": round(t0, 1),
        "host": {"cpu_idle_before": None if idle_before is None else round(idle_before, 3),
                 "loadavg_before": [round(x, 2) for x in load_before],
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                 "ncpu": os.cpu_count()},
        "params": {"runs": a.runs, "rounds": a.rounds, "prompt_tokens_target": a.prompt_tokens,
                   "prompt_tokens_actual": pt_actual, "prompt_words": n_words,
                   "decode_tokens": a.decode_tokens, "concurrency": a.concurrency,
                   "temperature": 0, "ignore_eos": True},
        "metrics": {
            "prompt_tok_s": summary([r["tok_s"] for r in prompt_rows]),
            "decode_tok_s": summary([r["tok_s"] for r in decode_rows]),
            "agg_decode_tok_s": summary([r["tok_s"] for r in agg_rows]),
            "ttft_ms_prompt": summary([r["ttft_s"] * 1000 for r in prompt_rows]),
            "agg_e2e_tok_s": summary([r["e2e_tok_s"] for r in agg_rows]),
        },
        "runs": {"prompt": prompt_rows, "decode": decode_rows, "aggregate": agg_rows},
    }
    # sanity: did the server honour max_tokens / ignore_eos?
    if idle_before is not None and idle_before < a.min_idle:
        res.setdefault("warnings", []).append(
            f"CPUs only {idle_before:.0%} idle before the run: another process competed")
    short = [r["completion_tokens"] for r in decode_rows if r["completion_tokens"] != a.decode_tokens]
    if short:
        res.setdefault("warnings", []).append(f"decode runs returned {short} tokens, not {a.decode_tokens} "
                           "(ignore_eos not honoured?)")
        log("[bench] WARNING: " + res["warnings"][-1])
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=2)
        log(f"[bench] wrote {a.out}")
    print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
