"""The DPO(+NLL) loss of LIDR as pure functions of log-probabilities (docs/method.md §1.5).

    loss = −log σ(β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])
           + α · ( −log π(y_c|x) / |y_c| )                         # the NLL term: lidr/train.py
    losses, chosen_rewards, rejected_rewards = preference_loss("sigmoid", policy_chosen_logps,
        policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, beta)

With h the log-ratio difference above: sigmoid −log σ(β·h) (DPO, the paper's); ipo (h_ln − 1/(2β))²
per token; robust (−(1−ε)·log σ(β·h) + ε·log σ(−β·h)) / (1−2ε); sigmoid with ε: cDPO; hinge max(0, 1 − β·h); each
log-ratio divided by |y| with --length-normalize (LN-DPO). Rewards are β·log-ratio, detached.
`hidden_sequence_logps` never makes the full [B, T, vocab] logits: it projects the response
positions only, a chunk at a time, recomputed in backward. python train_dpo.py --loss ipo ...
Sources of each variant and how this compares with torchtune, LLaMA-Factory and TRL: docs/method.md §5.10.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lidr.settings import LOSSES

# positions per chunk when upcasting logits: 256 positions × 128k vocabulary × 4 bytes = 128 MiB
CHUNK_POSITIONS = 256


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] in fp32: logits [..., V] (any float dtype), labels [...] -> [...]."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor):
    """(Σ_t log π(labels[b, t]) over the masked positions, number of masked positions), both [B].

    logits [B, T, V] predict labels [B, T] (already shifted: logits[:, t] scores labels[:, t]);
    loss_mask [B, T] is True at response tokens, False at prompt tokens and padding. Labels under
    a False mask may hold anything in [0, V).
    """
    per_token = torch.cat(
        [
            _maybe_checkpoint(token_logps, logits[:, i : i + CHUNK_POSITIONS], labels[:, i : i + CHUNK_POSITIONS])
            for i in range(0, logits.shape[1], CHUNK_POSITIONS)
        ],
        dim=1,
    )
    mask = loss_mask.bool()
    return (per_token * mask).sum(-1), mask.sum(-1)


def hidden_sequence_logps(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels, sequence_ids, n_sequences: int):
    """Per-sequence (Σ log π, number of tokens), [n_sequences] each, from hidden states, without the full logits.

    hidden [R, T, dim] are the final normed hidden states (`model(..., return_hidden=True)`), rows
    that may hold several packed sequences; labels [R, T] the next tokens; sequence_ids [R, T] the
    sequence a position's label is a response token of, −1 where it is not (prompt, padding).
    Only those positions go through the output matrix, CHUNK_POSITIONS at a time, and a chunk's
    logits are recomputed in backward rather than stored. With one sequence per row,
    `sequence_ids = where(loss_mask, row, −1)`, this is
    `sequence_logps(hidden @ lm_head_weightᵀ, labels, loss_mask)`.
    """
    rows, cols = (sequence_ids >= 0).nonzero(as_tuple=True)
    picked_hidden, picked_labels, picked_ids = hidden[rows, cols], labels[rows, cols], sequence_ids[rows, cols]
    per_token = torch.cat(
        [
            _maybe_checkpoint(
                _linear_token_logps,
                picked_hidden[i : i + CHUNK_POSITIONS],
                lm_head_weight,
                picked_labels[i : i + CHUNK_POSITIONS],
            )
            for i in range(0, len(rows), CHUNK_POSITIONS)
        ]
        or [hidden.new_zeros(0, dtype=torch.float32)]
    )
    sums = torch.zeros(n_sequences, dtype=torch.float32, device=hidden.device).index_add(0, picked_ids, per_token)
    counts = torch.zeros(n_sequences, dtype=torch.long, device=hidden.device).index_add(0, picked_ids, torch.ones_like(picked_ids))
    return sums, counts


def _linear_token_logps(hidden, weight, labels):
    return token_logps(F.linear(hidden, weight), labels)


def _maybe_checkpoint(fn, *args):
    """fn(*args), recomputed in backward (so its fp32 intermediates are not kept) when grads flow."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             label_smoothing: float = 0.0):
    """Sigmoid DPO per pair: (losses, chosen_rewards, rejected_rewards), each [B]; rewards detached.

    reward(y) = β·(log π(y|x) − log π_ref(y|x));  loss = −log σ(reward(y_c) − reward(y_r)). With ε = label_smoothing,
    conservative DPO (cDPO): each label flipped with probability ε, loss = −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             chosen_lengths, rejected_lengths):
    """IPO per pair on per-token log-ratios: (losses, chosen_rewards, rejected_rewards), rewards detached.

    loss = ((log-ratio(y_c) / |y_c| − log-ratio(y_r) / |y_r|) − 1/(2β))²; reward(y) = β·log-ratio(y).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    per_token = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    losses = (per_token - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
                    label_smoothing: float):
    """Robust DPO per pair, ε = label_smoothing the assumed rate of flipped preferences (0 ≤ ε < 0.5).

    loss = (−(1−ε)·log σ(β·h) + ε·log σ(−β·h)) / (1−2ε): unbiased for the clean loss under flipped labels;
    ε 0 is sigmoid DPO.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """SLiC's hinge per pair: max(0, 1 − β·h); rewards β·log-ratio, detached."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def preference_loss(loss: str, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    chosen_lengths, rejected_lengths, beta: float, length_normalize: bool = False,
                    label_smoothing: float = 0.0):
    """The loss named `loss` (one of LOSSES) per pair: (losses, chosen_rewards, rejected_rewards), each [B].

    length_normalize: every log-prob (policy and reference) is divided by its response's length
    |y| (chosen_lengths, rejected_lengths), so each log-ratio is per token (LN-DPO); not for ipo,
    which is per token already.
    """
    if length_normalize:
        if loss == "ipo":
            raise ValueError("--length-normalize does not apply to the ipo loss: its log-ratios are per token already")
        chosen_lengths, rejected_lengths = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
        policy_chosen_logps, ref_chosen_logps = policy_chosen_logps / chosen_lengths, ref_chosen_logps / chosen_lengths
        policy_rejected_logps = policy_rejected_logps / rejected_lengths
        ref_rejected_logps = ref_rejected_logps / rejected_lengths
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if loss == "sigmoid":
        return dpo_loss(*logps, beta, label_smoothing)
    if loss == "ipo":
        return ipo_loss(*logps, beta, chosen_lengths, rejected_lengths)
    if loss == "robust":
        return robust_dpo_loss(*logps, beta, label_smoothing)
    if loss == "hinge":
        return hinge_loss(*logps, beta)
    raise ValueError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")
