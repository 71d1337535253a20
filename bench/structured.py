#!/usr/bin/env python3
"""Decode speed with and without an output grammar or log probabilities, on one server.

    python3 bench/structured.py --url http://127.0.0.1:8080 --model smollm2-135m [--runs 5]

Greedy, one request at a time, the same prompt for every format: free text, JSON mode
(`json_object`) and a `json_schema` whose one string property lets the model write as long as
free text does. Prints completion tokens per second of wall time (median of --runs) for each
format and its ratio to free text; `logprobs` is free text with `logprobs: true` and
`top_logprobs: 20` (each token's log probability and its 20 most likely alternatives; the
answer's tokens are checked to spell its text). Stdlib only.
"""
import argparse
import json
import statistics
import time
import urllib.request

PROMPT = "Write a long story about a robot who learns to paint."
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 40}, "story": {"type": "string"}},
    "required": ["title", "story"],
    "additionalProperties": False,
}
FORMATS = {
    "text": None,
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}},
    "logprobs": "logprobs",
}


def one(url, model, fmt, max_tokens, api_key):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if fmt is None or fmt == "logprobs":
        body["ignore_eos"] = True
    else:
        body["response_format"] = fmt
    if fmt == "logprobs":
        body.update(logprobs=True, top_logprobs=20)
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"content-type": "application/json",
                 **({"authorization": f"Bearer {api_key}"} if api_key else {})},
    )
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.load(r)
    elapsed = time.perf_counter() - t
    tokens = answer["usage"]["completion_tokens"]
    if fmt == "logprobs":
        listed = answer["choices"][0]["logprobs"]["content"]
        assert len(listed) >= 1 and all(len(t["top_logprobs"]) == 20 for t in listed), listed[:1]
    elif fmt is not None and answer["choices"][0]["finish_reason"] == "stop":
        json.loads(answer["choices"][0]["message"]["content"])  # a finished answer must parse
    return tokens / elapsed, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args()
    one(args.url, args.model, None, 8, args.api_key)  # warm-up
    results = {}
    for name, fmt in FORMATS.items():
        runs = [one(args.url, args.model, fmt, args.max_tokens, args.api_key) for _ in range(args.runs)]
        results[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
    base = results["text"][0]
    for name, (tps, tokens) in results.items():
        print(f"{name:12} {tps:7.1f} tok/s  ({tokens:.0f} tokens)  {tps / base:.2f}x free text")


if __name__ == "__main__":
    main()
