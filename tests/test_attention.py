"""Packed rows attending sequence by sequence (`Documents`) against the dense block-diagonal mask (fp32, CPU).

Reference: the dense-mask path of the same model and batch. Both must give the same hidden states
at every position (padding included), the same per-sequence log-probs, and the same gradient for
every parameter. The tiny model has grouped-query attention (4 heads, 2 kv heads); the micro-batch
packs into rows of different fill, so the last row carries padding. End to end, a training run
attending sequence by sequence (the CUDA default) ends with the weights of the dense-mask run.
"""

import pytest
import torch
from conftest import assert_same_weights, train_args, weights

import lidr.train
from lidr.checkpoint import load_model
from lidr.dpo import hidden_sequence_logps
from lidr.model import Documents
from lidr.tokenizer import Tokenizer
from lidr.train import Example, pack


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
    monkeypatch.setattr(lidr.train, "dense_mask_default", lambda device: False)
    out = tmp_path / "documents"
    lidr.train.main(train_args(tiny_dir, data, out, "--batch-size", "2", "--grad-accum", "2"))
    assert "packed rows attending sequence by sequence" in capsys.readouterr().out
    assert_same_weights(weights(out), weights(one_process), atol=1e-5)
