"""The DPO loss, its variants and the log-probabilities it reads, against closed-form values, TRL's
DPOTrainer loss and plain log_softmax."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lidr.checkpoint import load
from lidr.dpo import CHUNK_POSITIONS, dpo_loss, hidden_sequence_logps, preference_loss, sequence_logps
from lidr.train import Example, forward_logps, pack


def test_dpo_loss_matches_hand_computed_values():
    policy_chosen = torch.tensor([-5.0, -10.0], requires_grad=True)
    policy_rejected = torch.tensor([-7.0, -9.0])
    ref_chosen, ref_rejected = torch.tensor([-6.0, -10.0]), torch.tensor([-6.0, -11.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    # pair 0: rewards 0.1·(−5+6) = 0.1 and 0.1·(−7+6) = −0.1; loss = −log σ(0.2) = log(1 + e^−0.2)
    # pair 1: rewards 0.1·0 = 0 and 0.1·(−9+11) = 0.2;       loss = −log σ(−0.2) = log(1 + e^0.2)
    assert chosen_rewards.tolist() == pytest.approx([0.1, 0.0], abs=1e-6)
    assert rejected_rewards.tolist() == pytest.approx([-0.1, 0.2], abs=1e-6)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.2))], abs=1e-6)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    # ∂loss/∂log π(y_c|x) = −β·σ(−β·Δ) with Δ the difference of log-ratios
    losses.sum().backward()
    sigmoid = lambda z: 1 / (1 + math.exp(-z))
    assert policy_chosen.grad.tolist() == pytest.approx([-0.1 * sigmoid(-0.2), -0.1 * sigmoid(0.2)], abs=1e-6)


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    chosen, rejected = torch.randn(8) * 50, torch.randn(8) * 50
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((8,), math.log(2)))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def trl_loss(loss_type: str, logps: torch.Tensor, lengths: torch.Tensor, beta: float, label_smoothing=0.0):
    """TRL's DPOTrainer loss (its own `_compute_loss`) for one pair: logps and lengths are (policy chosen,
    policy rejected, ref chosen, ref rejected) and (|y_c|, |y_r|). The model TRL calls is a stand-in that
    returns per-token log-probs summing to the given ones over a completion mask of the given lengths,
    and the trainer is the least object `_compute_loss` reads, so no model, data or accelerator is built."""
    trl = pytest.importorskip("trl", reason="TRL is the bench peer: pip install 'lidr[bench]'")
    width = int(lengths.max()) + 1
    completion_mask = torch.zeros(2, width, dtype=torch.long)
    log_probs = torch.zeros(2, width - 1, dtype=torch.float64)
    for i in range(2):
        completion_mask[i, 1 : 1 + lengths[i]] = 1
        log_probs[i, : lengths[i]] = logps[i] / lengths[i]
    zeros = torch.zeros(2, width - 1)
    outputs = SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    accelerator = SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2, width, dtype=torch.long), "attention_mask": torch.ones(2, width),
              "completion_mask": completion_mask, "ref_chosen_logps": logps[2:3], "ref_rejected_logps": logps[3:4]}
    return trl.DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False).item()


VARIANTS = [  # (lidr's --loss, --length-normalize, --label-smoothing, TRL's loss_type)
    ("sigmoid", False, 0.0, "sigmoid"), ("ipo", False, 0.0, "ipo"), ("robust", False, 0.2, "robust"),
    ("robust", False, 0.0, "sigmoid"), ("hinge", False, 0.0, "hinge"), ("sigmoid", True, 0.0, "sigmoid_norm"),
    # cDPO: TRL 1.16's sigmoid ignores label_smoothing; its aot loss of a single pair is −(1−ε)·log σ(β·h) − ε·log σ(−β·h)
    ("sigmoid", False, 0.2, "aot"),
]


@pytest.mark.parametrize("loss, length_normalize, label_smoothing, trl_type", VARIANTS,
                         ids=[f"{v[0]}{'-ln' if v[1] else ''}-eps{v[2]}" for v in VARIANTS])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_each_loss_equals_trls_value(loss, length_normalize, label_smoothing, trl_type, beta):
    torch.manual_seed(0)
    n = 6
    logps = -torch.rand(4, n, dtype=torch.float64) * 60  # policy chosen, policy rejected, ref chosen, ref rejected
    logps[:2] = logps[2:] + torch.randn(2, n, dtype=torch.float64) * 3  # a policy near its reference
    lengths = torch.randint(1, 40, (2, n))
    losses, chosen_rewards, rejected_rewards = preference_loss(loss, *logps, *lengths, beta=beta,
                                                               length_normalize=length_normalize,
                                                               label_smoothing=label_smoothing)
    for i in range(n):
        assert losses[i].item() == pytest.approx(trl_loss(trl_type, logps[:, i], lengths[:, i], beta, label_smoothing),
                                                 rel=1e-9, abs=1e-12), i
    scale = lengths if length_normalize else torch.ones_like(lengths)
    torch.testing.assert_close(chosen_rewards, beta * (logps[0] - logps[2]) / scale[0])
    torch.testing.assert_close(rejected_rewards, beta * (logps[1] - logps[3]) / scale[1])


@pytest.mark.parametrize("loss, label_smoothing", [("hinge", 0.0), ("robust", 0.3)])
def test_length_normalized_variants_are_trls_loss_of_the_per_token_logps(loss, label_smoothing):
    """TRL normalises only sigmoid (sigmoid_norm); hinge and robust with --length-normalize are TRL's
    loss of the log-probs divided by their lengths (one-token completions carrying the per-token value)."""
    torch.manual_seed(1)
    logps, lengths = -torch.rand(4, 5, dtype=torch.float64) * 40, torch.randint(1, 30, (2, 5))
    losses, _, _ = preference_loss(loss, *logps, *lengths, beta=0.5, length_normalize=True,
                                   label_smoothing=label_smoothing)
    per_token = logps / torch.cat([lengths, lengths])
    for i in range(5):
        want = trl_loss(loss, per_token[:, i], torch.ones(2, dtype=torch.long), 0.5, label_smoothing)
        assert losses[i].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_the_variants_at_policy_equal_reference_and_their_gradient_signs():
    """Closed forms at h = 0: sigmoid and robust ln 2, hinge 1, ipo 1/(4β²); each pushes log π(y_c) up."""
    beta = 0.25
    for loss, want in [("sigmoid", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0), ("ipo", 1 / (4 * beta**2))]:
        chosen = torch.tensor([-12.0], requires_grad=True)
        losses, _, _ = preference_loss(loss, chosen, torch.tensor([-9.0]), torch.tensor([-12.0]), torch.tensor([-9.0]),
                                       torch.tensor([4]), torch.tensor([3]), beta=beta,
                                       label_smoothing=0.1 if loss == "robust" else 0.0)
        assert losses.item() == pytest.approx(want, rel=1e-6), loss
        losses.sum().backward()
        assert chosen.grad.item() < 0, loss
    with pytest.raises(ValueError, match="ipo loss"):
        preference_loss("ipo", *torch.zeros(4, 1), *torch.ones(2, 1), beta=0.1, length_normalize=True)


def _reference_logps(logits, labels, mask):
    """Plain float64 log_softmax, gathered and summed over the mask."""
    logps = F.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)


def test_sequence_logps_matches_log_softmax_across_chunks():
    torch.manual_seed(0)
    B, T, V = 3, CHUNK_POSITIONS + 37, 50  # more positions than one chunk
    logits = torch.randn(B, T, V) * 3
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) < 0.6
    sums, counts = sequence_logps(logits, labels, mask)
    want_sums, want_counts = _reference_logps(logits, labels, mask)
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-6, atol=1e-4)
    assert counts.tolist() == want_counts.tolist()
    # bf16 logits: the sums are fp32 values of the bf16 logits, not of a bf16 log_softmax
    sums16, _ = sequence_logps(logits.bfloat16(), labels, mask)
    want16, _ = _reference_logps(logits.bfloat16(), labels, mask)
    assert sums16.dtype == torch.float32
    torch.testing.assert_close(sums16.double(), want16, rtol=1e-6, atol=1e-3)


def test_masked_positions_contribute_nothing():
    torch.manual_seed(0)
    B, T, V = 2, 12, 30
    logits = torch.randn(B, T, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 5:9] = True
    sums, _ = sequence_logps(logits, labels, mask)
    sums.sum().backward()
    assert logits.grad[~mask].abs().max() == 0 and logits.grad[mask].abs().max() > 0
    scrambled = logits.detach().clone()
    scrambled[~mask] = torch.randn_like(scrambled[~mask]) * 100
    other_labels = torch.where(mask, labels, torch.randint(0, V, (B, T)))
    torch.testing.assert_close(sequence_logps(scrambled, other_labels, mask)[0], sums.detach())


def test_hidden_sequence_logps_equals_full_logits_path_with_gradients():
    torch.manual_seed(0)
    B, T, D, V = 2, CHUNK_POSITIONS + 20, 16, 40
    hidden = torch.randn(B, T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) < 0.9
    sequence_ids = torch.where(mask, torch.arange(B)[:, None], -1)  # one sequence per row
    sums, counts = hidden_sequence_logps(hidden, weight, labels, sequence_ids, B)
    sums.sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want, want_counts = sequence_logps(hidden @ weight.T, labels, mask)
    want.sum().backward()
    torch.testing.assert_close(sums, want)
    assert counts.tolist() == want_counts.tolist()
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)
    # two sequences in one row: each sums its own positions
    ids = torch.full((1, T), -1)
    ids[0, 3:10], ids[0, 15:40] = 1, 0
    sums, counts = hidden_sequence_logps(hidden[:1], weight, labels[:1], ids, 2)
    full = torch.log_softmax((hidden[0] @ weight.T).double(), -1).gather(-1, labels[0, :, None]).squeeze(-1)
    torch.testing.assert_close(sums.double(), torch.stack([full[15:40].sum(), full[3:10].sum()]).detach())
    assert counts.tolist() == [25, 7]


# -----------------------------------------------------------------------------
# on a model: the trainer's batches


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load(tiny_dir, dtype=torch.float32)


def _examples(tokenizer):
    def make(prompt, chosen, rejected):
        eot = tokenizer.tok.token_to_id("<|eot_id|>")
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return Example(0, prompt_ids, [tokenizer.encode(chosen) + [eot], tokenizer.encode(rejected) + [eot]])

    return [
        make("What is two plus two?", "Four.", "Five, I think."),
        make("Name a colour of the sky on a clear day, and explain why it looks that way.",
             "Blue: air scatters short wavelengths of sunlight more than long ones.", "Green."),
        make("Hi", "Hello! How can I help you today?", "Go away."),
    ]


def test_a_sequence_logp_does_not_depend_on_the_rest_of_the_batch(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    with torch.no_grad():
        alone, alone_counts = forward_logps(model, pack(examples[:1], tokenizer.pad_id, 1000, "cpu"))
        packed = pack(examples, tokenizer.pad_id, 1000, "cpu")  # all six sequences share one row
        assert packed.tokens.shape[0] == 1
        batched, batched_counts = forward_logps(model, packed)
        rows = pack(examples, tokenizer.pad_id, 64, "cpu")  # several rows, with padding
        assert rows.tokens.shape[0] > 1 and (rows.tokens == tokenizer.pad_id).any()
        in_rows, _ = forward_logps(model, rows)
    # sequences: chosen of every example, then rejected of every example
    torch.testing.assert_close(batched[[0, 3]], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_rows, batched, rtol=0, atol=1e-5)
    assert batched_counts[[0, 3]].tolist() == alone_counts.tolist()


def test_only_response_tokens_count_and_packing_matches_a_plain_forward(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    packed = pack(examples, tokenizer.pad_id, 1000, "cpu")
    with torch.no_grad():
        got, counts = forward_logps(model, packed)
    for k in range(2):
        for j, ex in enumerate(examples):
            i = k * len(examples) + j
            # the positions of sequence i predict exactly its response tokens, end-of-turn included
            assert packed.labels[packed.sequence_ids == i].tolist() == ex.responses[k]
            # and its log-prob is that of the sequence alone in a plain forward (no mask, no packing)
            ids = torch.tensor([ex.prompt + ex.responses[k]])
            with torch.no_grad():
                logits = model(ids)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(ex.prompt) - 1 : -1] = True
            labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
            want = _reference_logps(logits, labels, mask)[0]
            torch.testing.assert_close(got[i : i + 1].double(), want, rtol=0, atol=1e-4)
            assert counts[i] == len(ex.responses[k])
