"""The sampler: batched, KV-cached generation from a `Llama`, the engine behind every lidr stage.

    from lidr.sampler import completions, generate
    outs = generate(model, tokenizer, prompt_ids, Decoding(max_new_tokens=2400), ("</translated>",))
    outs[0].text, outs[0].tokens, outs[0].finish_reason    # "stop_token" | "stop_string" | "length"
    for i, completion in completions(model, tokenizer, prompt_ids, decoding): ...   # as rows finish

A batch is a fixed number of slots, each a row of a KV cache kept beside the model
(lidr/kernels/cache.py). A waiting prompt is prefilled alone into a free slot (no padding); each
step then decodes one token for every slot; a finished row hands its slot to the next prompt, and
once none waits the batch is compacted to the live rows. Tokens stay on the device; the host reads
them every SYNC_EVERY steps to find stops. Sampling follows vLLM: repetition penalty, temperature
(0: greedy), top-k, top-p, then a draw from the row's own seeded generator, so a row samples the
same tokens alone or in any batch. `compile=True` compiles the decode step with static shapes
(CUDA graphs on CUDA; past torch's recompile limit, eager: `CompiledStep`). Departures: docs/method.md §5.2.
"""

from dataclasses import dataclass

import torch

from lidr.kernels.attention import flex_attention
from lidr.kernels.cache import CompiledStep, Session, decode_logits, kv_cache
from lidr.model import Llama
from lidr.settings import Decoding

SYNC_EVERY = 8  # decode steps between two reads of the sampled tokens by the host
LENGTH_BUCKET = 64  # eager decode attends over the cache in multiples of this many positions
STOP_CONTEXT = 4  # tokens decoded before the new ones, so that a decoder's rules at a text's start do not apply
FINISH_REASONS = ("stop_token", "stop_string", "length")


def check_stop_strings(stop_strings):
    """Refuse, in a sentence, stop strings the sampler cannot follow (a Decoding checks its own values)."""
    if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(f"stop_strings must be a sequence of non-empty strings, got {stop_strings!r}")


@dataclass
class Completion:
    tokens: list[int]  # generated ids, without the stop token
    text: str  # decoded, cut before the stop string
    finish_reason: str  # "stop_token" | "stop_string" | "length"

    def __post_init__(self):
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


# -----------------------------------------------------------------------------
# sampling: repetition penalty, temperature, top-k, top-p, a per-row draw


def apply_repetition_penalty(logits, seen, penalty: float):
    """vLLM/transformers: a seen token's logit l becomes l / penalty if l > 0, else l * penalty."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits, top_k: int, top_p: float):
    """Set to -inf every logit outside the top k, then outside the smallest set reaching probability top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        drop = mass_before >= top_p
        drop[:, 0] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits, seen, decoding: Decoding, generators: list):
    """Next tokens [b] from logits [b, vocab] (fp32 arithmetic); seen [b, vocab] marks prompt and output tokens."""
    logits = logits.float()
    if decoding.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, decoding.repetition_penalty)
    if decoding.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / decoding.temperature, decoding.top_k, decoding.top_p)
    probs = logits.softmax(-1)
    # the exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i;
    # each row draws from its own generator so its tokens do not depend on the batch
    noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in generators])
    return (probs / noise).argmax(-1)


# -----------------------------------------------------------------------------
# the generation loop


def power_of_two_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def find_stop_string(text: str, stop_strings) -> int:
    """Index of the earliest stop string in text, or -1."""
    found = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(found, default=-1)


class Row:
    """One request in a slot: its host-side tokens and counters."""

    def __init__(self, index: int, prompt_len: int):
        self.index, self.prompt_len = index, prompt_len
        self.tokens: list[int] = []
        self.count = 1  # tokens sampled so far, including those the host has not read yet
        self.pending: list[int] = []  # sampled on the device, read at the last sync, not yet checked
        # stop strings: tokens[:complete] decode to whole characters, of which `recent` holds the last few
        self.complete = 0
        self.recent = ""

    @property
    def position(self) -> int:  # where the latest sampled token is written by the next decode step
        return self.prompt_len + self.count - 1


def stop_string_end(row: Row, tokenizer, stop_strings, start: int) -> int | None:
    """The smallest end > start such that row.tokens[:end] decodes to a text holding a stop string, or
    None; every shorter prefix is known to hold none.

    Linear in the output: each new token decodes only the tokens after the last complete character
    (and STOP_CONTEXT before them), and the search covers only the text that could hold a new
    match: the last len(longest stop) - 1 complete characters and what follows them. (A run of
    bytes that never form a UTF-8 character keeps the tokens after it from counting as complete.)
    """
    longest = max(map(len, stop_strings))
    for end in range(start + 1, len(row.tokens) + 1):
        context = max(0, row.complete - STOP_CONTEXT)
        before = tokenizer.decode(row.tokens[context : row.complete])
        text = tokenizer.decode(row.tokens[context:end])
        if text.startswith(before):
            new = text[len(before):]
            window = row.recent + new
        else:  # a decoder whose rules rewrote the context: the whole text, as it decodes
            window = new = tokenizer.decode(row.tokens[:end])
        if find_stop_string(window, stop_strings) >= 0:
            return end
        if not new.endswith("\ufffd"):  # a character split across tokens decodes as U+FFFD until it is whole
            row.complete, row.recent = end, window[-(longest - 1):] if longest > 1 else ""
    return None


def finished_completion(row: Row, tokenizer, decoding: Decoding, stop_strings, stop_ids) -> Completion | None:
    """Consume row.pending: the row's Completion if it has finished, else None."""
    new, stopped = [], False
    for token in row.pending:
        if token in stop_ids:
            stopped = True
            break
        new.append(token)
    row.pending = []
    start = len(row.tokens)
    row.tokens.extend(new)
    if stop_strings and new:
        end = stop_string_end(row, tokenizer, stop_strings, start)
        if end is not None:  # the tokens end with the one that completed the stop string
            tokens = row.tokens[:end]
            text = tokenizer.decode(tokens)
            return Completion(tokens, text[: find_stop_string(text, stop_strings)], "stop_string")
    if stopped:
        return Completion(row.tokens, tokenizer.decode(row.tokens), "stop_token")
    if len(row.tokens) >= decoding.max_new_tokens:
        return Completion(row.tokens, tokenizer.decode(row.tokens), "length")
    return None


@torch.inference_mode()
def completions(model: Llama, tokenizer, prompts: list[list[int]], decoding: Decoding, stop_strings=(),
                batch_size: int = 16, seeds: list[int] | None = None, compile: bool = False):
    """Yield (i, Completion) for every prompt i (token ids) as its row finishes (out of input order).

    decoding: max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed (its `system` is
    the prompt's business). stop_strings: a row ends at the token that completes one. seeds: one
    per prompt (default decoding.seed + i). compile: torch.compile the decode step.
    """
    check_stop_strings(stop_strings)
    vocab = model.cfg.vocab_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        if not 0 <= min(prompt) <= max(prompt) < vocab:
            raise ValueError(f"prompt {i} holds token id {min(prompt) if min(prompt) < 0 else max(prompt)}, "
                             f"outside the model's vocabulary of {vocab}")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if not prompts:
        return
    stop_strings = tuple(stop_strings)
    seeds = [decoding.seed + i for i in range(len(prompts))] if seeds is None else seeds
    device = model.embed_tokens.weight.device
    stop_ids = frozenset(tokenizer.stop_ids)
    # compiled: static shapes, a power of two of slots unless batch_size says fewer
    batch_size = max(1, min(batch_size, power_of_two_at_least(len(prompts)) if compile else len(prompts)))
    cuda_graphs = compile and device.type == "cuda"
    flex = cuda_graphs and flex_attention is not None
    step_fn = CompiledStep(cuda_graphs) if compile else decode_logits
    max_len = max(map(len, prompts)) + decoding.max_new_tokens

    waiting = list(range(len(prompts)))[::-1]  # popped from the end: input order
    rows: list[Row | None] = [None] * batch_size  # the request in each slot
    generators = [torch.Generator(device) for _ in range(batch_size)]
    tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # the latest sampled token per slot
    positions = torch.zeros(batch_size, dtype=torch.long, device=device)
    live = torch.zeros(batch_size, dtype=torch.long, device=device)  # 1 for slots holding a running row
    seen = torch.zeros(batch_size, vocab, dtype=torch.bool, device=device)  # for the repetition penalty
    recent = torch.zeros(batch_size, SYNC_EVERY, dtype=torch.long, device=device)

    def fill(session: Session, slot: int) -> list:
        """Prefill waiting prompts into an empty slot until one is still running (or none waits); the
        (i, Completion) of those that finished at their first token."""
        finished = []
        while rows[slot] is None and waiting:
            index = waiting.pop()
            prompt = torch.tensor(prompts[index], dtype=torch.long, device=device)
            rows[slot] = Row(index, len(prompt))
            generators[slot].manual_seed(seeds[index])
            seen[slot] = False
            seen[slot, prompt] = True
            logits = session.prefill(slot, prompt)
            first = sample(logits, seen[slot : slot + 1], decoding, generators[slot : slot + 1])
            tokens[slot] = first[0]
            seen[slot, first[0]] = True
            positions[slot] = len(prompt)
            rows[slot].pending = [int(first[0])]
            done = finished_completion(rows[slot], tokenizer, decoding, stop_strings, stop_ids)
            if done is not None:
                finished.append((index, done))
                rows[slot] = None
        live[slot] = rows[slot] is not None
        return finished

    cache = kv_cache(model, batch_size, max_len)  # kept for the next generation; nothing in `model` changes
    cache.in_use = True
    try:
        session = Session(model, cache)
        for slot in range(batch_size):
            yield from fill(session, slot)
        step = 0
        while any(rows):
            running = [row for row in rows if row is not None]
            length = cache.length
            if not compile:  # attend over the filled part of the cache, rounded up to a bucket
                filled = max(row.position for row in running) + 1
                length = min(cache.length, -(-filled // LENGTH_BUCKET) * LENGTH_BUCKET)
            logits = session.decode(tokens, positions, length, step_fn, flex)
            tokens = sample(logits, seen, decoding, generators)
            seen.scatter_(1, tokens[:, None], True)
            recent[:, step] = tokens
            positions = positions + live  # an idle slot rewrites its last position
            for row in running:
                row.count += 1
            step += 1
            if step < SYNC_EVERY and all(r.count < decoding.max_new_tokens for r in running):
                continue
            # the host reads the sampled tokens: stops, refills, compaction
            sampled = recent[:, :step].tolist()
            step = 0
            if cuda_graphs:
                step_fn.check()
            for slot, row in enumerate(rows):
                if row is None:
                    continue
                row.pending = sampled[slot]
                done = finished_completion(row, tokenizer, decoding, stop_strings, stop_ids)
                if done is not None:
                    rows[slot] = None
                    yield row.index, done
                    yield from fill(session, slot)
            running_slots = [slot for slot, row in enumerate(rows) if row is not None]
            # compiled: keep a power of two of slots (idle ones fill it up), so that few shapes are compiled
            n_keep = power_of_two_at_least(len(running_slots)) if compile else len(running_slots)
            if not waiting and running_slots and n_keep <= len(rows) // 2:
                idle_slots = [slot for slot, row in enumerate(rows) if row is None]
                keep = running_slots + idle_slots[: n_keep - len(running_slots)]
                index = torch.tensor(keep, device=device)
                session.keep(index)
                rows = [rows[slot] for slot in keep]
                generators = [generators[slot] for slot in keep]
                tokens, positions, live, seen = tokens[index], positions[index], live[index], seen[index]
                recent = recent[index]
    finally:
        cache.in_use = False


def generate(model: Llama, tokenizer, prompts: list[list[int]], decoding: Decoding, stop_strings=(),
             batch_size: int = 16, seeds: list[int] | None = None, compile: bool = False) -> list[Completion]:
    """One Completion per prompt (token ids), in input order (`completions`, collected)."""
    results = [None] * len(prompts)
    for i, completion in completions(model, tokenizer, prompts, decoding, stop_strings, batch_size, seeds, compile):
        results[i] = completion
    return results
