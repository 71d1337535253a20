"""Starts a real `lattice node` (SmolLM2-135M on llama.cpp) on a free loopback port."""
import os
import subprocess
import sys
import threading

import pytest

MODEL = "smollm2-135m"


def _binary() -> str:
    explicit = os.environ.get("LATTICE_BIN")
    if explicit:
        return explicit
    cache = os.environ.get("LATTICE_CACHE_DIR", os.path.expanduser("~/.cache/lattice"))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(cache, "target"))
    return os.path.join(target, "release", "lattice")


@pytest.fixture(scope="session")
def node_url():
    cmd = [_binary(), "node", "--standalone", "--model", MODEL, "--port", "0",
           "--parallel", "2", "--ctx-per-slot", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    url = None
    timer = threading.Timer(120, proc.kill)  # loading must not hang the suite
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith("listening on "):
                url = line.split()[-1].strip()
                break
    finally:
        timer.cancel()
    if url is None:
        proc.kill()
        raise RuntimeError(f"node did not start (exit code {proc.wait()})")
    # Keep draining stdout so the node never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture()
def client(node_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{node_url}/v1", api_key="not-needed-standalone", max_retries=0, timeout=120)
