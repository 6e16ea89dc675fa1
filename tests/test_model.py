"""lidr's Llama against transformers' LlamaForCausalLM on tiny random weights (fp32)."""

import pytest
import torch
from helpers import VARIANTS, make_tiny_checkpoint

from lidr.checkpoint import load_model


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(lidr model, transformers model) with the same random weights, one per variant."""
    from transformers import LlamaForCausalLM

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, load_model(folder), LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def test_logits_match_transformers(pair):
    variant, ours, ref = pair
    # Llama 3.1's tiny config has original_max_position_embeddings=32: go well past it
    T = 100 if variant == "llama31" else 24
    tokens = torch.randint(0, ours.cfg.vocab_size, (3, T), generator=torch.Generator().manual_seed(1))
    assert max_rel_err(ours(tokens), ref(tokens).logits) <= 1e-5


@torch.no_grad()
def test_left_padded_batch_matches_each_prompt_alone(pair):
    _, ours, ref = pair
    g = torch.Generator().manual_seed(2)
    lengths = [5, 12, 9]
    prompts = [torch.randint(0, ours.cfg.vocab_size, (n,), generator=g) for n in lengths]
    T = max(lengths)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):], mask[i, T - len(p):] = p, 1
    batched = ours(tokens, attention_mask=mask)
    assert torch.isfinite(batched).all()  # padding rows attend to themselves, never to nothing
    for i, p in enumerate(prompts):
        alone = ref(p[None]).logits[0]
        assert max_rel_err(batched[i, T - len(p):], alone) <= 1e-5


def test_tied_embedding_is_one_parameter(pair):
    variant, ours, ref = pair
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == (variant == "tied")
    assert ours.num_params() == ref.num_parameters()
