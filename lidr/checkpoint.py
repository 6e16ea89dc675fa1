"""HF checkpoint folders, the one currency of lidr: load them into `Llama`, and write them back.

    model, tokenizer = load("Meta-Llama-3-8B-Instruct", device="cuda", dtype=torch.bfloat16)
    save("out/M1", model.cfg, model.state_dict(), tokenizer_from="Meta-Llama-3-8B-Instruct")

A folder holds config.json, model.safetensors (or shards with model.safetensors.index.json) and
the tokenizer files. Loading builds the model on the meta device and fills it tensor by tensor,
straight into the requested dtype and device (an 8B model loads in about 16 GB in bf16). A
missing, unexpected, misshapen or non-float (quantized) tensor, a shard the index names but the
folder lacks, a folder with both one file and shards, a config that lacks a key or holds a value
of the wrong type, a truncated safetensors file and a tokenizer that does not belong to the model
stop the load, naming file and tensor. `check` does all of this from the files' headers without
reading weights. What `save` writes (atomically), transformers' from_pretrained reads.
No remote code, no hub, no quantized or pickled (.bin) weights: docs/method.md §5.11.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lidr.model import Llama, LlamaConfig, rope_inv_freq
from lidr.tokenizer import CHAT_FORMATS, Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DEFAULT_SHARD_BYTES = 5 * 2**30
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes a weight may be stored in


def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU, fp32 elsewhere (CPU tests and demos)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def read_config(folder: str | os.PathLike) -> LlamaConfig:
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is {folder} an HF checkpoint folder?")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: not a JSON object")
    try:
        return LlamaConfig.from_hf(hf, source=str(path))
    except KeyError as e:
        raise ValueError(f"{path}: the config lacks the key {e.args[0]!r}") from None
    except (TypeError, ZeroDivisionError) as e:  # e.g. "num_attention_heads": null or 0
        raise ValueError(f"{path}: a value of the config is not usable ({e})") from None


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, or model.safetensors."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file() and (folder / SINGLE_FILE).is_file():  # lidr would read one, transformers the other
        raise ValueError(f"{folder}: holds both {SINGLE_FILE} and {INDEX_FILE} (with its shards); which are the "
                         f"weights is ambiguous: move one of them out of the folder")
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map)") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are not in the folder: {', '.join(missing)}")
        return [folder / n for n in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE}")


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor):
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def weight_plan(folder, cfg: LlamaConfig) -> dict[Path, list[tuple[str, str]]]:
    """{file: [(key in the file, lidr's name)]} after checking every tensor's name and shape against
    the config from the files' headers (no tensor data is read); an error names the file and tensor."""
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # a tied weight once
    plan, found = {}, set()
    for file in weight_files(folder):
        plan[file] = []
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = key.removeprefix("model.")
                    if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints carry
                        continue
                    if cfg.tie_embeddings and name == "lm_head.weight":
                        continue  # tied: the output matrix is the embedding
                    if name not in expected:
                        raise ValueError(f"{file}: unexpected tensor {key!r} for this config")
                    shape, dtype = tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()
                    if dtype not in FLOAT_DTYPES:  # a quantized or integer tensor cast to float is garbage
                        raise ValueError(f"{file}: tensor {key!r} is {dtype}; lidr reads float weights only "
                                         f"({', '.join(FLOAT_DTYPES)}), not quantized or integer ones")
                    if shape != expected[name]:
                        raise ValueError(f"{file}: tensor {key!r} has shape {shape}, "
                                         f"the config implies {expected[name]}")
                    plan[file].append((key, name))
                    found.add(name)
        except SafetensorError as e:  # a truncated or corrupt file
            raise ValueError(f"{file}: not a readable safetensors file ({e}); was it copied whole?") from None
    missing = sorted(set(expected) - found)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{folder}: checkpoint lacks tensor(s) {shown}")
    return plan


def load_model(folder, device="cpu", dtype=torch.float32) -> Llama:
    cfg = read_config(folder)
    plan = weight_plan(folder, cfg)
    with torch.device("meta"):
        model = Llama(cfg)
    for file, tensors in plan.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for key, name in tensors:
                _set_tensor(model, name, f.get_tensor(key).to(device=device, dtype=dtype))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def check(folder, chat_format: str | None = None) -> tuple[LlamaConfig, Tokenizer]:
    """(config, tokenizer) of a folder whose config, tokenizer and weight headers are all usable:
    what a stage checks before it records that its output is made from this folder."""
    cfg = read_config(folder)
    tokenizer = Tokenizer.from_folder(folder, chat_format=chat_format)
    check_tokenizer_fits(folder, cfg, tokenizer)
    weight_plan(folder, cfg)
    return cfg, tokenizer


def check_tokenizer_fits(folder, cfg: LlamaConfig, tokenizer: Tokenizer):
    """ValueError, naming the file, unless the tokenizer belongs to the model: its vocabulary fits
    the embedding, the chat format's tokens are special tokens of it, and config.json's bos and
    eos ids are special tokens there (each eos id one a turn ends with). A tokenizer copied from
    another model passes none of these and would make the model answer with empty or foreign text."""
    path, config = Path(folder) / "tokenizer.json", Path(folder) / "config.json"
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path}: {tokenizer.vocab_size} tokens do not fit the model's embedding (embed_tokens.weight "
                         f"has {cfg.vocab_size} rows); tokenizer and weights do not match")
    special = {i: t.content for i, t in tokenizer.tok.get_added_tokens_decoder().items() if t.special}
    for token in CHAT_FORMATS[tokenizer.chat_format]["tokens"]:
        if tokenizer.tok.token_to_id(token) not in special:
            raise ValueError(f"{path}: the {tokenizer.chat_format} chat format needs the special token {token!r}, "
                             f"which this tokenizer lacks or reads as plain text; tokenizer and model do not match")
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    turn_ends = f"a token a {tokenizer.chat_format} turn ends with"
    for name, ids, allowed, kind in (("bos_token_id", [cfg.bos_token_id], special, "a special token"),
                                     ("eos_token_id", eos, tokenizer.stop_ids, turn_ends)):
        for token_id in ids:
            if token_id is not None and token_id not in allowed:
                token = tokenizer.tok.id_to_token(token_id) if isinstance(token_id, int) else None
                raise ValueError(f"{config}: {name} {token_id!r} is {token!r} in {path}, not {kind}; "
                                 f"tokenizer and model do not match")


def load(folder, device="cpu", dtype=torch.float32, chat_format: str | None = None):
    """(model, tokenizer) from an HF folder; the tokenizer must fit the model's embedding."""
    _, tokenizer = check(folder, chat_format)
    return load_model(folder, device, dtype), tokenizer


def save(out_dir, cfg: LlamaConfig, state_dict: dict, tokenizer_from=None, max_shard_bytes=DEFAULT_SHARD_BYTES):
    """Write an HF folder atomically: config.json, safetensors (sharded above max_shard_bytes), tokenizer files.

    state_dict uses lidr's names (those of `Llama.state_dict()`); a tied lm_head is not written.
    The folder appears complete or not at all: it is built beside out_dir and renamed into place.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for name, t in state_dict.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        hf_name = name if name == "lm_head.weight" else "model." + name
        tensors[hf_name] = t.detach().to("cpu").contiguous()
    shards, sizes = [[]], [0]
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    if len(shards) == 1:
        save_file(tensors, tmp / SINGLE_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    dtype = next(iter(tensors.values())).dtype
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2))
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    old = out_dir.with_name(out_dir.name + f".old{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
