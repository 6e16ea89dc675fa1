"""bench/gpu.py where it can run without a GPU: its refusal, and its tiny train_dpo.py run (here on CPU, gloo)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402

from lidr.checkpoint import load  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: bench/gpu.py would run")
@pytest.mark.slow  # a subprocess that imports torch
def test_without_cuda_it_says_so_and_exits_2():
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2
    assert "needs a CUDA GPU and this machine has none" in proc.stderr


@pytest.mark.slow
def test_its_tiny_folder_trains_and_exports_through_train_dpo(tmp_path):
    """Section 5's run, launched with plain python on this machine: the folder and tokenizer it writes work."""
    proc, out = gpu.run_torchrun(tmp_path, [sys.executable], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 rows read, 8 kept" in proc.stdout
    model, tokenizer = load(out / "model")
    assert model.cfg == gpu.TINY
    ids = tokenizer.encode_chat([{"role": "user", "content": "what is 2 plus 2?"}])
    assert tokenizer.decode(ids).split() == ["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "what",
                                             "is", "2", "plus", "2", "?", "<|eot_id|>", "<|start_header_id|>", "assistant",
                                             "<|end_header_id|>"]


def test_its_transformers_twin_holds_the_same_weights_and_gives_the_same_logits():
    """The decode section's two models (here the tiny shape, fp32): one set of tensors, equal logits."""
    model, hf = gpu.shared_weight_models(gpu.TINY, "cpu", torch.float32)
    assert model.layers[1].mlp.up_proj.weight.data_ptr() == hf.model.layers[1].mlp.up_proj.weight.data_ptr()
    tokens = torch.tensor(gpu.random_prompts(2, 20, gpu.TINY.vocab_size))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=0, atol=1e-5)
