"""Incremental stop-string detection against the rule it replaces (decode every prefix at each read).

Reference: the sampler's former rule, written out below (`prefix_rule`): at each read of the
sampled tokens, decode the whole output; if it holds a stop string, find the shortest prefix
that does. The incremental rule must end every row at the same token with the same text, on
random outputs of the real Llama 3 tokenizer (accents, CJK, emoji and random ids whose bytes
split characters across tokens), and its work must grow linearly with the output.
"""

import random

import pytest

import lidr.sampler
from lidr.sampler import SYNC_EVERY, Completion, Row, find_stop_string, finished_completion
from lidr.settings import Decoding
from lidr.tokenizer import Tokenizer

WORDS = ["the", "cat", "sat", " on", "mat", "été", "déjà", "naïve", "日本語", "中文", "über", "ß", "🤖", "🎉",
         "👩‍💻", "Привет", "мир", "</translated>", "<", ">", "\n", " ", "a", "ab", "ba", "é", "ñ", "😀😀",
         "x"]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    tokenizer = Tokenizer.from_folder(tiny_dir)
    tokenizer.stop_ids = frozenset()
    return tokenizer


def prefix_rule(row: Row, tokenizer, decoding: Decoding, stop_strings, stop_ids) -> Completion | None:
    """The former finished_completion (no stop tokens here): re-decode every prefix at each read."""
    new = row.pending
    row.pending = []
    start = len(row.tokens)
    row.tokens.extend(new)
    find = lidr.sampler.find_stop_string  # looked up at each call: the linearity test counts its work
    if stop_strings and new:
        text = tokenizer.decode(row.tokens)
        if find(text, stop_strings) >= 0:
            end = len(row.tokens)
            while end > start and find(tokenizer.decode(row.tokens[: end - 1]), stop_strings) >= 0:
                end -= 1
            tokens = row.tokens[:end]
            text = tokenizer.decode(tokens)
            return Completion(tokens, text[: find(text, stop_strings)], "stop_string")
    if len(row.tokens) >= decoding.max_new_tokens:
        return Completion(row.tokens, tokenizer.decode(row.tokens), "length")
    return None


def run_rows(rule, tokens: list[int], tokenizer, stop_strings) -> Completion:
    """Feed a row its tokens as the sampler does: the prefill's one, then SYNC_EVERY per read."""
    decoding = Decoding(max_new_tokens=len(tokens), repetition_penalty=1.0)
    row = Row(0, prompt_len=1)
    reads = [tokens[:1]] + [tokens[i : i + SYNC_EVERY] for i in range(1, len(tokens), SYNC_EVERY)]
    for read in reads:
        row.pending = list(read)
        done = rule(row, tokenizer, decoding, stop_strings, frozenset())
        if done is not None:
            return done
    raise AssertionError("a row of max_new_tokens tokens must finish")


def random_output(rng: random.Random, tokenizer) -> list[int]:
    """Words of many scripts, and now and then random ids (bytes that may split a character)."""
    tokens = []
    while len(tokens) < rng.randint(5, 60):
        if rng.random() < 0.15:
            tokens.append(rng.randrange(128000))
        else:
            tokens.extend(tokenizer.encode(rng.choice(WORDS) + rng.choice(["", " ", ""])))
    return tokens


def test_same_completions_as_decoding_every_prefix(tokenizer):
    rng = random.Random(0)
    stopped = spanning = 0
    for _ in range(400):
        tokens = random_output(rng, tokenizer)
        text = tokenizer.decode(tokens)
        stop_strings = ["zzz-never"]
        for _ in range(rng.randint(1, 2)):  # pieces of the output, often across a token boundary
            start = rng.randrange(len(text))
            piece = text[start : start + rng.randint(1, 6)]
            if "\ufffd" not in piece:
                stop_strings.append(piece)
        want = run_rows(prefix_rule, tokens, tokenizer, stop_strings)
        got = run_rows(finished_completion, tokens, tokenizer, stop_strings)
        assert got == want, (tokens, stop_strings)
        if want.finish_reason == "stop_string":
            stopped += 1
            last = tokenizer.decode(want.tokens[-1:])
            spanning += not any(s in last for s in stop_strings)
    assert stopped > 300 and spanning > 50  # most rows stop, many on a string no single token holds


def test_work_is_linear_in_the_output(tokenizer, monkeypatch):
    """Tokens decoded and characters searched per row: 4x the output costs the incremental rule ~4x,
    the prefix rule ~16x."""
    decoded, scanned = [0], [0]
    real_decode, real_find = tokenizer.decode, find_stop_string

    def counting_decode(ids, *args, **kwargs):
        decoded[0] += len(ids)
        return real_decode(ids, *args, **kwargs)

    def counting_find(text, stop_strings):
        scanned[0] += len(text)
        return real_find(text, stop_strings)

    monkeypatch.setattr(tokenizer, "decode", counting_decode)
    monkeypatch.setattr(lidr.sampler, "find_stop_string", counting_find)
    rng = random.Random(1)
    output = [t for _ in range(800) for t in tokenizer.encode(rng.choice(WORDS[:20]) + " ")][:1600]
    assert len(output) == 1600
    cost = {}
    for rule in (finished_completion, prefix_rule):
        for n in (400, 1600):
            decoded[0] = scanned[0] = 0
            done = run_rows(rule, output[:n], tokenizer, ["never-in-this-text"])
            assert done.finish_reason == "length" and len(done.tokens) == n
            cost[rule.__name__, n] = decoded[0], scanned[0]
    for what in (0, 1):  # tokens decoded, characters searched
        assert cost["finished_completion", 1600][what] <= 4.5 * cost["finished_completion", 400][what]
        assert cost["prefix_rule", 1600][what] >= 12 * cost["prefix_rule", 400][what]
    assert cost["finished_completion", 1600][0] <= 12 * 1600  # a few tokens decoded per token
