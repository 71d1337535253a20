"""/v1/embeddings with the official OpenAI Python client: a node running all-MiniLM-L6-v2, and
the same through Nexus (routed, metered, charged). The vectors are checked against an independent
numpy implementation of the model (bert_reference.py) reading the same weights."""
import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
from openai import OpenAI

from bert_reference import Bert
from conftest import EMBEDDING_MODEL, MODEL

TEXTS = [
    "The cat sits on the mat.",
    "A cat is sitting on a mat.",
    "Stock markets fell sharply on Monday.",
    "Lattice routes each request to the best node.",
]


@pytest.fixture(scope="module")
def reference():
    cache = Path(os.environ.get("LATTICE_CACHE_DIR", os.path.expanduser("~/.cache/lattice")))
    models = cache / "models"
    return Bert(
        models / "all-MiniLM-L6-v2.safetensors",
        models / "all-MiniLM-L6-v2.tokenizer.json",
        models / "all-MiniLM-L6-v2.config.json",
    )


@pytest.fixture()
def embedder(embedding_node_url):
    return OpenAI(base_url=f"{embedding_node_url}/v1", api_key="standalone", max_retries=0, timeout=120)


def test_vectors_match_the_reference_implementation(embedder, reference):
    # The official client asks for base64 and decodes it; this checks that path end to end.
    r = embedder.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS)
    assert r.object == "list" and r.model == EMBEDDING_MODEL
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    for text, d in zip(TEXTS, r.data):
        got = np.array(d.embedding, dtype=np.float64)
        want = reference.embed(text)
        assert got.shape == (384,)
        assert abs(np.linalg.norm(got) - 1) < 1e-4
        cos = float(got @ want)
        assert cos > 0.9999, f"{text!r}: cosine {cos} to the reference"
        assert np.max(np.abs(got - want)) < 2e-3
    assert r.usage.prompt_tokens == sum(len(reference.tokens(t)) for t in TEXTS)
    assert r.usage.total_tokens == r.usage.prompt_tokens


def test_float_and_base64_give_the_same_vectors(embedder):
    b64 = embedder.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS[0])
    flt = embedder.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS[0], encoding_format="float")
    assert len(b64.data) == len(flt.data) == 1
    # Floats are written as the shortest decimals that read back as the same f32s (base64
    # carries the f32 bits): equal once both are read as f32.
    assert np.array_equal(np.array(b64.data[0].embedding, dtype=np.float32),
                          np.array(flt.data[0].embedding, dtype=np.float32))
    # Same model, same text, same vector: nothing random in an embedding.
    again = embedder.embeddings.create(model=EMBEDDING_MODEL, input=[TEXTS[0]], dimensions=384)
    assert again.data[0].embedding == b64.data[0].embedding


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input"),
        ({"input": [[101, 2023, 102]]}, "input"),
        ({"input": "word " * 300}, "input"),
        ({"input": ["ok", "a" * 9000]}, "input"),
        ({"input": "x", "dimensions": 128}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_requests_are_clear_400s(embedder, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        embedder.embeddings.create(model=EMBEDDING_MODEL, **kwargs)
    assert e.value.status_code == 400
    body = e.value.body
    assert body["message"]
    assert body["param"] == param
    if isinstance(kwargs["input"], str) and kwargs["input"].startswith("word"):
        assert "256" in body["message"], body


def test_an_unknown_model_is_a_404(embedder):
    with pytest.raises(openai.NotFoundError) as e:
        embedder.embeddings.create(model=MODEL, input="x")
    assert e.value.code == "model_not_found"


# Through Nexus.


def _balance(url, key):
    req = urllib.request.Request(f"{url}/lattice/v1/account", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["balance"]


def test_embeddings_through_nexus_are_routed_and_charged(nexus_url, reference):
    url, key = nexus_url
    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    listed = {m.id: m for m in client.models.list().data}
    assert {MODEL, EMBEDDING_MODEL} <= set(listed)
    # Extension: an embedding model says its vector length, a text model says none.
    assert listed[EMBEDDING_MODEL].dimensions == 384
    assert getattr(listed[MODEL], "dimensions", None) is None
    before = int(_balance(url, key)["available"])
    r = client.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS)
    assert len(r.data) == len(TEXTS)
    for text, d in zip(TEXTS, r.data):
        assert float(np.array(d.embedding) @ reference.embed(text)) > 0.9999
    assert r.usage.prompt_tokens == sum(len(reference.tokens(t)) for t in TEXTS)
    after = _balance(url, key)
    # Node default price: 0.1 LAI per 1M prompt tokens; an embedding has no completion.
    assert before - int(after["available"]) == r.usage.prompt_tokens * 10**17 // 10**6
    assert after["held"] == "0"


def test_nexus_keeps_embedding_and_text_models_apart(nexus_url):
    url, key = nexus_url
    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    before = _balance(url, key)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="x")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=EMBEDDING_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "embedding" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBEDDING_MODEL, input=["ok", ""])
    # Refused requests cost nothing and hold nothing.
    assert _balance(url, key) == before


def test_a_node_passes_embeddings_on_to_an_upstream(embedder, embedding_upstream_node_url):
    via = OpenAI(base_url=f"{embedding_upstream_node_url}/v1", api_key="standalone", max_retries=0,
                 timeout=120)
    direct = embedder.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS, encoding_format="float")
    r = via.embeddings.create(model="embed-via-upstream", input=TEXTS)
    assert r.model == "embed-via-upstream"
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    for a, b in zip(direct.data, r.data):
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)
    assert r.usage.prompt_tokens == direct.usage.prompt_tokens > 0
    models = {m.id: m for m in via.models.list().data}
    assert models["embed-via-upstream"].model_extra.get("dimensions") == 384
    # The upstream's refusals come back as the same 400s (this node has no tokenizer: the
    # upstream counts the tokens); text endpoints refuse the model.
    with pytest.raises(openai.BadRequestError) as e:
        via.embeddings.create(model="embed-via-upstream", input=["ok", "word " * 300])
    assert "input 1 has 302 tokens" in e.value.body["message"]
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as e:
        via.chat.completions.create(model="embed-via-upstream", messages=[{"role": "user", "content": "hi"}])
    assert "embedding" in e.value.body["message"]


def test_an_upstream_giving_vectors_of_another_length_fails_the_request(embedding_node_url):
    from conftest import _start, _stop

    proc, url = _start(["node", "--standalone", "--upstream", f"{embedding_node_url}/v1",
                        "--upstream-model", EMBEDDING_MODEL, "--model-id", "wrong-length",
                        "--upstream-dimensions", "768", "--port", "0"])
    try:
        via = OpenAI(base_url=f"{url}/v1", api_key="standalone", max_retries=0, timeout=120)
        with pytest.raises(openai.APIStatusError) as e:
            via.embeddings.create(model="wrong-length", input="hello")
        assert e.value.status_code == 502
        assert "384 numbers, not 768" in e.value.body["message"]
    finally:
        _stop(proc)


def test_an_upstream_embedding_node_is_admitted_and_used_behind_nexus(tmp_path, embedding_node_url):
    import time

    from conftest import _start, _stop

    nexus, url = _start(["nexus", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "nexus.db"),
                         "--operator-key-file", str(tmp_path / "operator.key")])
    node = None
    try:
        node, _ = _start(["node", "--nexus", url, "--upstream", f"{embedding_node_url}/v1",
                          "--upstream-model", EMBEDDING_MODEL, "--model-id", "minilm-upstream",
                          "--upstream-dimensions", "384", "--port", "0", "--key", str(tmp_path / "node.key")])
        # Listed once the node passed its calibration (the paraphrase probes, through the upstream).
        deadline = time.time() + 60
        while True:
            with urllib.request.urlopen(f"{url}/v1/models") as r:
                models = {m["id"]: m for m in json.load(r)["data"]}
            if "minilm-upstream" in models:
                break
            assert time.time() < deadline, "the upstream embedding node was never admitted"
            time.sleep(0.2)
        assert models["minilm-upstream"]["dimensions"] == 384
        key = (tmp_path / "operator.key").read_text().strip()
        client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
        r = client.embeddings.create(model="minilm-upstream", input=TEXTS[:2])
        assert [len(d.embedding) for d in r.data] == [384, 384]
        assert r.usage.prompt_tokens == 9 + 10
    finally:
        if node is not None:
            _stop(node)
        _stop(nexus)
