"""Starts real `lattice` nodes (SmolLM2-135M on llama.cpp, all-MiniLM-L6-v2 on candle) and a Nexus
on free loopback ports."""
import os
import subprocess
import sys
import threading

import pytest

MODEL = "smollm2-135m"
EMBEDDING_MODEL = "all-minilm-l6-v2"


def _binary() -> str:
    explicit = os.environ.get("LATTICE_BIN")
    if explicit:
        return explicit
    cache = os.environ.get("LATTICE_CACHE_DIR", os.path.expanduser("~/.cache/lattice"))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(cache, "target"))
    return os.path.join(target, "release", "lattice")


def _start(args):
    """Starts `lattice ARGS`; returns (process, url) once it prints `listening on URL`."""
    proc = subprocess.Popen([_binary(), *args], stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
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
        raise RuntimeError(f"lattice {args} did not start (exit code {proc.wait()})")
    # Keep draining stdout so the process never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, url


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def node_url():
    proc, url = _start(["node", "--standalone", "--model", MODEL, "--port", "0",
                        "--parallel", "2", "--ctx-per-slot", "1024"])
    yield url
    _stop(proc)


@pytest.fixture(scope="session")
def upstream_node_url(node_url):
    """A node whose engine is the session's node, as an OpenAI-compatible upstream that reports
    log probabilities."""
    proc, url = _start(["node", "--standalone", "--upstream", f"{node_url}/v1", "--upstream-model", MODEL,
                        "--model-id", "via-upstream", "--upstream-logprobs", "--port", "0"])
    yield url
    _stop(proc)


@pytest.fixture(scope="session")
def plain_upstream_node_url(node_url):
    """The same, with an upstream not said to report log probabilities."""
    proc, url = _start(["node", "--standalone", "--upstream", f"{node_url}/v1", "--upstream-model", MODEL,
                        "--model-id", "plain-upstream", "--port", "0"])
    yield url
    _stop(proc)


@pytest.fixture(scope="session")
def nexus_url(tmp_path_factory):
    """A real network: Nexus plus one linked node, ready once the node passed calibration."""
    import json
    import time
    import urllib.request

    d = tmp_path_factory.mktemp("net")
    key_file = d / "operator.key"
    nexus, url = _start(["nexus", "--listen", "127.0.0.1:0", "--db", str(d / "nexus.db"),
                         "--operator-key-file", str(key_file)])
    node, _ = _start(["node", "--nexus", url, "--model", MODEL, "--port", "0", "--parallel", "2",
                      "--ctx-per-slot", "1024", "--key", str(d / "node.key")])
    embedder, _ = _start(["node", "--nexus", url, "--model", EMBEDDING_MODEL, "--port", "0",
                          "--key", str(d / "embedder.key")])
    deadline = time.time() + 120
    while True:
        with urllib.request.urlopen(f"{url}/v1/models") as r:
            if {MODEL, EMBEDDING_MODEL} <= {m["id"] for m in json.load(r)["data"]}:
                break
        if time.time() > deadline:
            raise RuntimeError("nodes never became healthy behind Nexus")
        time.sleep(0.2)
    yield url, key_file.read_text().strip()
    _stop(embedder)
    _stop(node)
    _stop(nexus)


@pytest.fixture(scope="session")
def embedding_node_url():
    """A standalone node serving the sentence-embedding model."""
    proc, url = _start(["node", "--standalone", "--model", EMBEDDING_MODEL, "--port", "0"])
    yield url
    _stop(proc)


@pytest.fixture(scope="session")
def embedding_upstream_node_url(embedding_node_url):
    """A node whose engine is the embedding node, as an OpenAI-compatible upstream."""
    proc, url = _start(["node", "--standalone", "--upstream", f"{embedding_node_url}/v1",
                        "--upstream-model", EMBEDDING_MODEL, "--model-id", "embed-via-upstream",
                        "--upstream-dimensions", "384", "--port", "0"])
    yield url
    _stop(proc)


@pytest.fixture()
def client(node_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{node_url}/v1", api_key="not-needed-standalone", max_retries=0, timeout=120)
