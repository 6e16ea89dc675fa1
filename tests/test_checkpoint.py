"""Loading and saving HF folders: sharded and single-file, round trips, and broken checkpoints."""

import json
import shutil
import sys

import pytest
import torch
from helpers import make_tiny_checkpoint, run_subprocess
from safetensors.torch import load_file, save_file

from lidr.checkpoint import INDEX_FILE, SINGLE_FILE, load, load_model, save
from lidr.harness.outputs import folder_identity


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny Llama 3 saved by transformers, once as one file and once in several shards."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("ckpt")
    single = make_tiny_checkpoint(root / "single", "llama3")
    sharded = make_tiny_checkpoint(root / "sharded", "llama3", max_shard_size="8MB")
    return single, sharded, LlamaForCausalLM.from_pretrained(single, dtype=torch.float32).eval()


TOKENS = torch.randint(0, 128256, (2, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_single_and_sharded_folders_load_to_transformers_logits(reference):
    single, sharded, ref = reference
    assert (sharded / INDEX_FILE).is_file() and not (sharded / SINGLE_FILE).exists()
    expected = ref(TOKENS).logits
    for folder in (single, sharded):
        model, tokenizer = load(folder)
        assert torch.allclose(model(TOKENS), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
        assert tokenizer.chat_format == "llama3"


@pytest.mark.parametrize("max_shard_bytes", [2**40, 3 * 2**20])
@torch.no_grad()
def test_save_load_round_trip_is_bit_identical_and_transformers_reads_it(reference, tmp_path, max_shard_bytes):
    from transformers import LlamaForCausalLM

    single, _, _ = reference
    model = load_model(single)
    out = tmp_path / "saved"
    save(out, model.cfg, model.state_dict(), tokenizer_from=single, max_shard_bytes=max_shard_bytes)
    assert (out / INDEX_FILE).is_file() == (max_shard_bytes < 2**40)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    again = load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    theirs = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(theirs(TOKENS).logits, LlamaForCausalLM.from_pretrained(single).eval()(TOKENS).logits)


def test_save_replaces_an_existing_folder_whole(reference, tmp_path):
    single, _, _ = reference
    model = load_model(single)
    out = tmp_path / "saved"
    out.mkdir()
    (out / "stale.txt").write_text("from an older save")
    save(out, model.cfg, model.state_dict())
    assert not (out / "stale.txt").exists() and (out / SINGLE_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary folders left behind


def test_load_in_bfloat16(reference):
    single, _, _ = reference
    model = load_model(single, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32  # rope angles stay fp32


# -----------------------------------------------------------------------------
# broken checkpoints fail loudly, naming the file and the tensor


@pytest.fixture
def broken(reference, tmp_path):
    single, sharded, _ = reference
    return shutil.copytree(single, tmp_path / "single"), shutil.copytree(sharded, tmp_path / "sharded")


def rewrite(folder, edit):
    tensors = load_file(folder / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})


def test_missing_tensor(broken):
    folder, _ = broken
    rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder)


def test_misshapen_tensor(broken):
    folder, _ = broken
    rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                         r"has shape \(64, 64\), the config implies \(32, 64\)"):
        load_model(folder)


def test_unexpected_tensor(broken):
    folder, _ = broken
    rewrite(folder, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.7\.mlp\.up_proj\.weight'"):
        load_model(folder)


def test_shard_listed_in_index_but_absent(broken):
    _, folder = broken
    shard = json.loads((folder / INDEX_FILE).read_text())["weight_map"]["model.norm.weight"]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{INDEX_FILE} names shard\(s\) that are not in the folder: {shard}"):
        load_model(folder)


def test_tokenizer_larger_than_embedding(broken):
    folder, _ = broken
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 1000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer\.json: 128256 tokens do not fit .*embed_tokens\.weight has 1000 rows"):
        load(folder)


def test_unsupported_config_is_refused(broken):
    folder, _ = broken
    config = json.loads((folder / "config.json").read_text())
    config["attention_bias"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: attention_bias=True is not supported"):
        load_model(folder)


def test_config_without_a_key_is_named(broken):
    folder, _ = broken
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: the config lacks the key 'hidden_size'"):
        load(folder)


def test_truncated_safetensors_file_is_named(broken):
    folder, sharded = broken
    for path in (folder / SINGLE_FILE, sorted(sharded.glob("model-*.safetensors"))[-1]):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # a copy that stopped half way
        with pytest.raises(ValueError, match=rf"{path.name}: not a readable safetensors file .*copied whole"):
            load_model(path.parent)


def test_missing_folder_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no_such_model: no such checkpoint folder"):
        load(tmp_path / "no_such_model")
    with pytest.raises(SystemExit, match=r"no_such_model: no such model folder"):
        folder_identity(tmp_path / "no_such_model")


def test_folder_identity_follows_the_files_and_not_the_path_spelling(reference, tmp_path, monkeypatch):
    single, _, _ = reference
    copy = shutil.copytree(single, tmp_path / "copy")
    identity = folder_identity(copy)
    monkeypatch.chdir(tmp_path)
    assert folder_identity("copy") == identity == folder_identity(tmp_path / "." / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert folder_identity(copy)["files"]["config.json"] != identity["files"]["config.json"]


# -----------------------------------------------------------------------------
# one reading of a folder: no two sets of weights, no quantized tensors, a config whose values are what they say


def test_a_folder_with_both_single_file_and_sharded_weights_is_refused_naming_both(broken, tmp_path):
    """transformers reads one of the two sets, lidr would read the other: neither may be chosen silently."""
    single, sharded = broken
    both = shutil.copytree(sharded, tmp_path / "both")
    shutil.copy(single / SINGLE_FILE, both / SINGLE_FILE)
    with pytest.raises(ValueError, match=rf"both: holds both {SINGLE_FILE} and {INDEX_FILE} \(with its shards\); "
                                         r"which are the weights is ambiguous"):
        load(both)
    result = run_subprocess([sys.executable, "-m", "lidr.cli.generate", "--model", str(both), "--prompt", "Hi",
                             "--max-new-tokens", "2"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("move one of them out of the folder")


@pytest.mark.parametrize("dtype,name", [(torch.int8, "I8"), (torch.uint8, "U8"), (torch.float8_e4m3fn, "F8_E4M3"),
                                        (torch.int64, "I64")])
def test_a_quantized_or_integer_tensor_is_refused_naming_it(broken, dtype, name):
    folder, _ = broken
    key = "model.layers.0.mlp.down_proj.weight"

    def quantize(tensors):
        tensors[key] = tensors[key].clamp(-1, 1).to(dtype)

    rewrite(folder, quantize)
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{key}' is {name}; lidr reads float weights "
                                         r"only"):
        load(folder)


@torch.no_grad()
def test_floats_of_other_widths_load_as_transformers_loads_them(reference, tmp_path):
    from transformers import LlamaForCausalLM

    single, _, _ = reference
    half = tmp_path / "half"
    LlamaForCausalLM.from_pretrained(single, dtype=torch.float32).to(torch.float16).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(single / name, half / name)
    expected = LlamaForCausalLM.from_pretrained(half, dtype=torch.float32).eval()(TOKENS).logits
    model, _ = load(half)
    assert torch.allclose(model(TOKENS), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("edit,message", [
    (dict(num_hidden_layers="2"), "num_hidden_layers is '2'; expected a whole number above 0"),
    (dict(hidden_size=64.5), "hidden_size is 64.5; expected a whole number above 0"),
    (dict(vocab_size=None), "vocab_size is None; expected a whole number above 0"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps is '1e-5'; expected a number above 0"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings is 'false'; expected true or false"),
    (dict(eos_token_id=["128009"]), "bos_token_id and eos_token_id must be token ids"),
    (dict(num_key_value_heads=3), "4 attention heads do not split into 3 key-value heads"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "rope_scaling lacks low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 32}), "rope_scaling.factor is '8'; expected a number"),
    (dict(rope_scaling=[8.0]), r"rope_scaling is \[8.0\]; expected an object or null"),
])
def test_a_config_value_of_the_wrong_type_is_named(broken, edit, message):
    folder, _ = broken
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=rf"config\.json: {message}"):
        load(folder)
    if "num_hidden_layers" in edit:  # and a command says it in one line (it was a TypeError deep in the model)
        result = run_subprocess([sys.executable, "-m", "lidr.cli.generate", "--model", str(folder), "--prompt", "Hi",
                                 "--max-new-tokens", "2"])
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines() == [f"{folder / 'config.json'}: {message}"]
