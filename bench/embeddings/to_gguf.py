"""Writes all-MiniLM-L6-v2 (safetensors + tokenizer.json + config.json, as `lattice model pull
all-minilm-l6-v2` stores them) as an F32 GGUF that llama.cpp's llama-server can serve for
/v1/embeddings: the peer of the node's candle engine in bench/embeddings/run.sh.

llama.cpp's own converter needs torch and transformers, which this machine does not have, so
this follows its BertModel conversion with gguf-py alone: the same tensor names (gguf-py's
name map), the WordPiece vocabulary in llama.cpp's "phantom space" form, special tokens as
control tokens, mean pooling, non-causal attention.

    python to_gguf.py MODELS_DIR OUT.gguf   (needs numpy and llama.cpp's gguf-py on sys.path)
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf


def tensors(path: Path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] != "F32":
            continue
        start, end = t["data_offsets"]
        yield name, np.frombuffer(data[start:end], dtype="<f4").reshape(t["shape"])


def main(models: Path, out: Path) -> None:
    stem = models / "all-MiniLM-L6-v2"
    cfg = json.loads(Path(f"{stem}.config.json").read_text())
    tok = json.loads(Path(f"{stem}.tokenizer.json").read_text())
    arch = gguf.MODEL_ARCH.BERT
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name("all-MiniLM-L6-v2")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tok["model"]["vocab"]  # token -> id
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id)))
    special = {t["content"] for t in tok["added_tokens"] if t.get("special")}
    tokens, types = [], []
    for t, _ in by_id:
        if t in special:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL)
        elif t.startswith("##"):
            tokens.append(t[2:])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append("\u2581" + t)
            types.append(gguf.TokenType.NORMAL)
    w.add_token_type_count(cfg["type_vocab_size"])
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(vocab["[CLS]"])
    w.add_eos_token_id(vocab["[SEP]"])
    w.add_sep_token_id(vocab["[SEP]"])
    w.add_unk_token_id(vocab["[UNK]"])
    w.add_pad_token_id(vocab["[PAD]"])
    w.add_mask_token_id(vocab["[MASK]"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)

    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    for name, a in tensors(Path(f"{stem}.safetensors")):
        if name.startswith("pooler."):
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            sys.exit(f"no GGUF name for {name}")
        w.add_tensor(mapped, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
