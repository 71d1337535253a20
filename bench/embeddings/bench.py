"""Load for /v1/embeddings, the same for every server (see run.sh).

    python bench.py run --url URL --name NAME --out FILE [--requests 20 --batch 64 --clients 4 --singles 200]
    python bench.py report FILE…
"""
import argparse
import json
import random
import statistics
import sys
import threading
import time
import urllib.request

WORDS = ("the a network node model answer request token price cluster private data never leaves "
         "machine quick brown fox jumps over lazy dog river mountain city market stock fell rose "
         "sharply today yesterday engineer builds ships tests measures reports honest figures "
         "cat sits mat sitting paris capital france history of science music art").split()


def texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))).capitalize() + "."
            for _ in range(n)]


def post(url, body):
    req = urllib.request.Request(f"{url}/embeddings", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def run(a):
    model = "all-minilm-l6-v2"
    batches = [texts(a.batch, seed=i) for i in range(a.requests)]
    for b in batches[:2]:
        post(a.url, {"model": model, "input": b})  # warm-up
    t0 = time.perf_counter()
    tokens = 0
    first = None
    for b in batches:
        r = post(a.url, {"model": model, "input": b})
        assert len(r["data"]) == len(b)
        tokens += r["usage"]["prompt_tokens"]
        first = first or [d["embedding"] for d in r["data"]]
    batch_s = time.perf_counter() - t0

    singles = texts(a.singles, seed=10_000)
    lat, lock, it = [], threading.Lock(), iter(singles)

    def client():
        while True:
            with lock:
                t = next(it, None)
            if t is None:
                return
            s = time.perf_counter()
            r = post(a.url, {"model": model, "input": t})
            assert len(r["data"]) == 1
            with lock:
                lat.append(time.perf_counter() - s)

    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    single_s = time.perf_counter() - t0
    lat.sort()
    out = {
        "name": a.name,
        "batch": a.batch, "requests": a.requests, "clients": a.clients, "singles": a.singles,
        "batch_texts_per_s": a.requests * a.batch / batch_s,
        "batch_tokens_per_s": tokens / batch_s,
        "single_req_per_s": a.singles / single_s,
        "single_p50_ms": 1000 * statistics.median(lat),
        "single_p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "first_batch": first,
    }
    json.dump(out, open(a.out, "w"))
    print(f"{a.name}: {out['batch_texts_per_s']:.1f} texts/s in batches of {a.batch} "
          f"({out['batch_tokens_per_s']:.0f} tokens/s); single texts, {a.clients} clients: "
          f"{out['single_req_per_s']:.1f} req/s, p50 {out['single_p50_ms']:.1f} ms, "
          f"p99 {out['single_p99_ms']:.1f} ms")


def report(files):
    rs = [json.load(open(f)) for f in files]
    ours = next(r for r in rs if r["name"] == "lattice")
    peer = next(r for r in rs if r["name"] != "lattice")
    cos = min(sum(x * y for x, y in zip(u, v)) for u, v in zip(ours["first_batch"], peer["first_batch"]))
    print(f"| server | texts/s, batches of {ours['batch']} | tokens/s | single texts req/s "
          f"({ours['clients']} clients) | p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for r in (ours, peer):
        print(f"| {r['name']} | {r['batch_texts_per_s']:.1f} | {r['batch_tokens_per_s']:.0f} | "
              f"{r['single_req_per_s']:.1f} | {r['single_p50_ms']:.1f} / {r['single_p99_ms']:.1f} |")
    print(f"\nlattice / {peer['name']}: batches {ours['batch_texts_per_s'] / peer['batch_texts_per_s']:.2f}x, "
          f"single texts {ours['single_req_per_s'] / peer['single_req_per_s']:.2f}x; "
          f"lowest cosine between the two servers' vectors of the first batch: {cos:.6f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--url", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--requests", type=int, default=20)
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--clients", type=int, default=4)
    r.add_argument("--singles", type=int, default=200)
    q = sub.add_parser("report")
    q.add_argument("files", nargs="+")
    a = p.parse_args()
    run(a) if a.cmd == "run" else report(a.files)
