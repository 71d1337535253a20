"""An independent reference for sentence embeddings: a BERT encoder written out in numpy from the
published architecture (Hugging Face's BertModel), reading the same safetensors file, with
Hugging Face's own tokenizer, then mean pooling and unit length as sentence-transformers does.
Slow and simple on purpose: it shares no code with the Rust engine (candle) it checks."""

import json
import math
import struct
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


def load_safetensors(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] != "F32":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype="<f4").reshape(t["shape"])
    return out


_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


class Bert:
    def __init__(self, weights: Path, tokenizer: Path, config: Path):
        self.w = load_safetensors(weights)
        self.cfg = json.loads(config.read_text())
        self.tok = Tokenizer.from_file(str(tokenizer))
        self.tok.no_truncation()
        self.tok.no_padding()

    def tokens(self, text: str) -> list:
        return self.tok.encode(text).ids

    def embed(self, text: str) -> np.ndarray:
        w, cfg = self.w, self.cfg
        eps = cfg["layer_norm_eps"]
        heads = cfg["num_attention_heads"]
        ids = self.tokens(text)
        n = len(ids)
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)

        def dense(x, name):
            return x @ w[name + ".weight"].T + w[name + ".bias"]

        for layer in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{layer}."
            d = x.shape[-1] // heads
            q = dense(x, p + "attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
            k = dense(x, p + "attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
            v = dense(x, p + "attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(1, 0, 2).reshape(n, heads * d)
            x = layer_norm(
                dense(ctx, p + "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                eps,
            )
            inner = gelu(dense(x, p + "intermediate.dense"))
            x = layer_norm(
                dense(inner, p + "output.dense") + x,
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
                eps,
            )
        mean = x.mean(0)
        return mean / np.linalg.norm(mean)
