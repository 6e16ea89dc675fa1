"""Packed rows attending sequence by sequence (`Documents`) or through flex attention's document mask
against the dense block-diagonal mask (fp32, CPU), and decode attention over a KV cache against masked SDPA.

Reference: the dense-mask path of the same model and batch. Both must give the same hidden states
at every position (padding included), the same per-sequence log-probs, and the same gradient for
every parameter. The tiny model has grouped-query attention (4 heads, 2 kv heads); the micro-batch
packs into rows of different fill, so the last row carries padding. End to end, a training run
attending sequence by sequence (the CUDA default) ends with the weights of the dense-mask run.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_weights, train_args, weights

import lidr.cli.train
import lidr.train
from lidr.checkpoint import load_model
from lidr.dpo import hidden_sequence_logps
import lidr.kernels.attention
from lidr.kernels.attention import FLEX_BLOCK, Documents, Filled, decode_attention, filled_block_mask, flex_attention
from lidr.tokenizer import Tokenizer
from lidr.train import Example, pack

if flex_attention is not None:
    from torch.nn.attention.flex_attention import create_mask


def micro_batch(tokenizer: Tokenizer) -> list[Example]:
    eot = tokenizer.tok.token_to_id("<|eot_id|>")
    examples = []
    for i in range(5):
        prompt = tokenizer.encode_chat([{"role": "user", "content": f"Question {i}: what is {i} plus {i}?" + " Explain." * i}])
        chosen = tokenizer.encode(f"It is {2 * i}." + " Indeed." * (3 - i % 3)) + [eot]
        rejected = tokenizer.encode(f"Maybe {2 * i + 1}?") + [eot]
        examples.append(Example(i + 1, prompt, [chosen, rejected]))
    return examples


def logps_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    hidden = model(batch.tokens, batch.positions, batch.attention_mask, return_hidden=True)
    logps, counts = hidden_sequence_logps(hidden, model.lm_head.weight, batch.labels, batch.sequence_ids, batch.n_sequences)
    weights = torch.linspace(0.5, 1.5, len(logps))  # every sequence with its own weight in the loss
    (logps * weights).sum().backward()
    return hidden.detach(), logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_documents_match_the_dense_mask_in_log_probs_and_gradients(tiny_dir):
    tokenizer = Tokenizer.from_folder(tiny_dir)
    model = load_model(tiny_dir, dtype=torch.float32).train()
    for p in model.parameters():
        p.requires_grad_(True)
    examples = micro_batch(tokenizer)
    longest = max(len(ex.prompt) + max(map(len, ex.responses)) for ex in examples)
    dense = pack(examples, tokenizer.pad_id, longest + 20, "cpu", dense_mask=True)
    documents = pack(examples, tokenizer.pad_id, longest + 20, "cpu", dense_mask=False)
    assert isinstance(documents.attention_mask, Documents) and dense.attention_mask.dim() == 3
    lengths = documents.attention_mask.lengths
    assert len(lengths) >= 3 and any(len(row) > 1 for row in lengths)  # several sequences share a row
    width = dense.tokens.shape[1]
    assert min(map(sum, lengths)) < width  # a row with padding
    for a, b in zip((dense.tokens, dense.positions, dense.labels, dense.sequence_ids),
                    (documents.tokens, documents.positions, documents.labels, documents.sequence_ids)):
        assert torch.equal(a, b)

    dense_hidden, dense_logps, dense_counts, dense_grads = logps_and_grads(model, dense)
    hidden, logps, counts, grads = logps_and_grads(model, documents)
    torch.testing.assert_close(hidden, dense_hidden, rtol=0, atol=1e-5)  # padding positions too
    assert torch.equal(counts, dense_counts)
    torch.testing.assert_close(logps, dense_logps, rtol=1e-6, atol=1e-5)
    assert dense_grads.keys() == grads.keys()
    for name in grads:
        scale = dense_grads[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads[name], dense_grads[name], rtol=0, atol=1e-5 * scale, msg=name)


def test_a_row_of_one_sequence_is_plain_causal_attention(tiny_dir):
    """One sequence filling its row: Documents and the model's default causal path agree."""
    model = load_model(tiny_dir, dtype=torch.float32)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(17).expand(2, 17)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, positions, Documents(((17,), (17,)))), model(tokens), rtol=0, atol=1e-5)


@pytest.mark.slow  # two whole training runs
def test_training_sequence_by_sequence_gives_the_weights_of_the_dense_mask(one_process, tiny_dir, data, tmp_path,
                                                                           monkeypatch, capsys):
    import lidr.harness.training

    for module in (lidr.train, lidr.harness.training):  # how rows pack, and what the run says of it
        monkeypatch.setattr(module, "dense_mask_default", lambda device: False)
    out = tmp_path / "documents"
    lidr.cli.train.main(train_args(tiny_dir, data, out, "--batch-size", "2", "--grad-accum", "2"))
    assert "packed rows attending sequence by sequence" in capsys.readouterr().out
    assert_same_weights(weights(out), weights(one_process), atol=1e-5)


# -----------------------------------------------------------------------------
# flex attention's document mask (the CUDA default where torch has it) and decode attention over a KV cache


def dense_document_mask(lengths, T: int) -> torch.Tensor:
    """[B, 1, T, T]: same sequence (the padding after the last one is one more) & key not after query."""
    ids = torch.full((len(lengths), T), -1)
    for b, row in enumerate(lengths):
        ids[b, : sum(row)] = torch.arange(len(row)).repeat_interleave(torch.tensor(row))
    return ((ids[:, :, None] == ids[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]


@pytest.mark.skipif(flex_attention is None, reason="this torch has no flex attention")
def test_flex_document_mask_matches_the_dense_mask(tiny_dir, monkeypatch):
    """Forward only, through lidr's own compiled flex call: torch 2.13 has no flex attention backward on CPU
    (it refuses inputs that require grad); tests/test_cuda_paths_cpu.py checks the gradients through a
    stand-in compiler backend. fp32 tight; bf16 within 2e-2."""
    tokenizer = Tokenizer.from_folder(tiny_dir)
    model = load_model(tiny_dir, dtype=torch.float32)
    examples = micro_batch(tokenizer)
    longest = max(len(ex.prompt) + max(map(len, ex.responses)) for ex in examples)
    dense = pack(examples, tokenizer.pad_id, longest + 20, "cpu", dense_mask=True)
    documents = pack(examples, tokenizer.pad_id, longest + 20, "cpu", dense_mask=False)
    T = dense.tokens.shape[1]
    block_mask = lidr.kernels.attention.document_block_mask(documents.attention_mask, T, "cpu")
    as_dense = create_mask(block_mask.mask_mod, len(documents.attention_mask.lengths), 1, T, T, device="cpu")
    assert torch.equal(as_dense, dense_document_mask(documents.attention_mask.lengths, T))
    assert torch.equal(as_dense, dense.attention_mask[:, None])

    monkeypatch.setattr(lidr.kernels.attention, "flex_documents", lambda device: True)
    monkeypatch.setattr(lidr.kernels.attention, "compiled_flex_attention", flex_attention)  # eager: compiled, CPU needs minutes
    with torch.no_grad():
        want = model(dense.tokens, dense.positions, dense.attention_mask, return_hidden=True)
        got = model(documents.tokens, documents.positions, documents.attention_mask, return_hidden=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        model.to(torch.bfloat16)
        got_bf16 = model(documents.tokens, documents.positions, documents.attention_mask, return_hidden=True)
    assert ((got_bf16.float() - want).abs().max() / want.abs().max()).item() <= 2e-2


def reference_decode_attention(q, k, v, lengths):
    """The former decode attention: SDPA with `enable_gqa` under a [B, 1, 1, L] mask of filled positions."""
    filled = torch.arange(k.shape[2]) < lengths[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=filled[:, None, None], enable_gqa=True)


@pytest.mark.parametrize("heads", [(4, 2), (8, 8), (9, 3)], ids=["gqa", "mha", "smollm2"])
def test_decode_attention_matches_masked_sdpa(heads):
    """Grouped SDPA and flex attention's block mask against the former path: fp32 within 1e-6, bf16 within 2e-2."""
    H, KV = heads
    g = torch.Generator().manual_seed(0)
    B, L, D = 3, 2 * FLEX_BLOCK, 16
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, KV, L, D, generator=g), torch.randn(B, KV, L, D, generator=g)
    lengths = torch.tensor([1, 130, L])  # one position, a block and two, the whole cache
    want = reference_decode_attention(q, k, v, lengths)
    paths = {"grouped sdpa": lambda q, k, v: decode_attention(q, k, v, Filled(lengths))}
    if flex_attention is not None:
        paths["flex"] = lambda q, k, v: decode_attention(q, k, v, Filled(lengths, filled_block_mask(lengths, L)))
    for name, attend in paths.items():
        torch.testing.assert_close(attend(q, k, v), want, rtol=0, atol=1e-6, msg=name)
        got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
        assert (got - want).abs().max().item() <= 2e-2, name
    # a bucket of the cache (the eager step): the same as the whole cache
    bucket = 192
    in_bucket = lengths.clamp(max=bucket)
    torch.testing.assert_close(decode_attention(q, k[:, :, :bucket], v[:, :, :bucket], Filled(in_bucket)),
                               reference_decode_attention(q, k, v, in_bucket), rtol=0, atol=1e-6)
