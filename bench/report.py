#!/usr/bin/env python3
"""Combine bench.py results (llama-server and lattice), membw output and the
model file size into one JSON summary and a markdown snippet for BENCHMARKS.md.

  report.py --peer peer.json [--ours ours.json] [--membw membw.json]
            --gguf MODEL.gguf --threads 2 [--versions versions.txt]
            [--ours-note "why lattice was not run"]
            --out-json summary.json --out-md summary.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

METRICS = [
    ("prompt_tok_s", "prompt tok/s, 1 stream"),
    ("decode_tok_s", "decode tok/s, 1 stream"),
    ("agg_decode_tok_s", "aggregate decode tok/s, {c} streams"),
]


def load(p):
    if not p or not os.path.exists(p):
        return None
    with open(p) as fh:
        return json.load(fh)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def fmt(x, nd=1):
    return "–" if x is None else f"{x:.{nd}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", required=True)
    ap.add_argument("--ours")
    ap.add_argument("--ours-note", default="")
    ap.add_argument("--membw")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--model-name", default=None)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--versions")
    ap.add_argument("--note", default="", help="free text, e.g. 'machine busy with a cargo build'")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--out-md", required=True)
    a = ap.parse_args(argv)

    peer, ours, membw = load(a.peer), load(a.ours), load(a.membw)
    if peer is None:
        sys.exit(f"no peer result at {a.peer}")
    gguf_bytes = os.path.getsize(a.gguf)
    model = a.model_name or os.path.basename(a.gguf)
    conc = peer["params"]["concurrency"]

    bw = {}
    if membw:
        for r in membw.get("results", []):
            bw[r["threads"]] = r["best_gbs"]
    bw_t = bw.get(a.threads) or (max(bw.values()) if bw else None)
    ceiling = bw_t * 1e9 / gguf_bytes if bw_t else None

    rows = []
    for key, name in METRICS:
        p = peer["metrics"][key]["median"]
        o = ours["metrics"][key]["median"] if ours else None
        ratio = (o / p) if (o is not None and p) else None
        rows.append({"metric": key, "name": name.format(c=conc), "llama_server": p,
                     "lattice": o, "ratio_lattice_over_llama_server": ratio})

    versions = ""
    if a.versions and os.path.exists(a.versions):
        with open(a.versions) as fh:
            versions = "".join(l for l in fh if not l.startswith("#")).strip()

    summary = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_model(), "ncpu": os.cpu_count(), "threads": a.threads,
        "model": model, "gguf_path": a.gguf, "gguf_bytes": gguf_bytes,
        "membw_best_gbs": bw, "decode_ceiling_tok_s": ceiling,
        "decode_ceiling_basis": (f"read bandwidth at {a.threads} threads / GGUF file size "
                                 "(decode reads all weights once per token)"),
        "prompt_tokens": peer["params"]["prompt_tokens_actual"],
        "decode_tokens": peer["params"]["decode_tokens"], "concurrency": conc,
        "rows": rows, "versions": versions, "note": a.note,
        "ours_note": a.ours_note if not ours else "",
        "peer_result": a.peer, "ours_result": a.ours if ours else None,
    }
    with open(a.out_json, "w") as fh:
        json.dump(summary, fh, indent=2)

    md = []
    md.append(f"### {model} — {a.threads} thread(s), {summary['date_utc']}")
    md.append("")
    md.append(f"CPU: {summary['cpu']} ({summary['ncpu']} cores visible). "
              f"Prompt ≈{summary['prompt_tokens']} tokens (unique per request), decode "
              f"{summary['decode_tokens']} tokens with `ignore_eos`, temperature 0, streaming "
              f"`/v1/chat/completions`; medians. Both servers: {conc} slots, 2048 ctx per slot.")
    if a.note:
        md.append("")
        md.append(f"Note: {a.note}")
    md.append("")
    md.append("| metric | llama-server | lattice | lattice / llama-server |")
    md.append("|---|---:|---:|---:|")
    for r in rows:
        ratio = r["ratio_lattice_over_llama_server"]
        md.append(f"| {r['name']} | {fmt(r['llama_server'])} | {fmt(r['lattice'])} | "
                  f"{'–' if ratio is None else f'{ratio:.2f}×'} |")
    md.append("")
    busy = []
    for lbl, res in (("llama-server", peer), ("lattice", ours)):
        if not res:
            continue
        idle = (res.get("host") or {}).get("cpu_idle_before")
        if idle is not None:
            busy.append(f"{lbl} {idle:.0%}")
    if busy:
        md.append("CPUs idle just before each run (other load): " + ", ".join(busy)
                  + ". Below ~90% the numbers are not comparable.")
        md.append("")
    for lbl, res in (("llama-server", peer), ("lattice", ours)):
        for w in (res or {}).get("warnings", []):
            md.append(f"Warning ({lbl}): {w}")
            md.append("")
    if bw:
        bws = ", ".join(f"{v:.1f} GB/s ({k} thr)" for k, v in sorted(bw.items()))
        md.append(f"Memory read bandwidth (membw, best pass): {bws}. Model file "
                  f"{gguf_bytes / 1e6:.1f} MB ≈ bytes read per decoded token, so the "
                  f"single-stream decode ceiling at {a.threads} thread(s) is ≈ "
                  f"{fmt(ceiling, 0)} tok/s.")
        md.append("")
    if not ours:
        md.append(f"lattice: not measured ({a.ours_note or 'no result'}).")
        md.append("")
    if versions:
        md.append("Versions:")
        md.append("")
        md.append("```")
        md.append(versions)
        md.append("```")
    text = "\n".join(md) + "\n"
    with open(a.out_md, "w") as fh:
        fh.write(text)

    # human-readable summary on stdout
    print()
    print(f"{'metric':<40} {'llama-server':>13} {'lattice':>9} {'ratio':>7}")
    for r in rows:
        ratio = r["ratio_lattice_over_llama_server"]
        print(f"{r['name']:<40} {fmt(r['llama_server']):>13} {fmt(r['lattice']):>9} "
              f"{'-' if ratio is None else f'{ratio:.2f}x':>7}")
    if bw:
        print(f"membw best: " + ", ".join(f"{k} thr {v:.1f} GB/s" for k, v in sorted(bw.items())))
        print(f"decode ceiling ≈ {fmt(ceiling, 0)} tok/s = {bw_t:.1f} GB/s / "
              f"{gguf_bytes / 1e6:.1f} MB (GGUF file size = bytes read per token)")
    for lbl, res in (("llama-server", peer), ("lattice", ours)):
        if res:
            idle = (res.get("host") or {}).get("cpu_idle_before")
            if idle is not None:
                print(f"{lbl}: CPUs {idle:.0%} idle before its run")
            for w in res.get("warnings", []):
                print(f"{lbl}: WARNING {w}")
    if not ours:
        print(f"lattice: not measured ({a.ours_note or 'no result'})")
    print(f"\nwrote {a.out_json}\nwrote {a.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
