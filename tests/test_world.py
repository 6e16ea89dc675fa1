"""The controlled world: answers recomputed from the question text, parallel ids, disjoint splits,
the trained tokenizer, and M0's folder read by transformers with equal logits."""

import json
import re
from dataclasses import replace

import pytest
import torch

from lidr.checkpoint import load
from lidr.pairs import numbers
from lidr.tokenizer import chat_messages
from lidr.translation import PREFILL, parse_translation
from world.corpus import LANGS, SYSTEM, WorldSettings, build

SMALL = WorldSettings(n_english=300, n_other=40, n_translation=30, n_eval=30, n_prompts=20, dim=64, n_layers=2,
                      n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=600)
# the word in each language's question that says the count goes up; every other problem gives some away
GAIN = {"en": "buys", "es": "Compra", "fr": "achète", "de": "kauft", "ru": "покупает"}


def expected_answer(question: str, lang: str, wrong: bool = False) -> int:
    """The result recomputed from the question alone (and flipped when the row is marked wrong)."""
    a, b = map(int, re.findall(r"\d+", question)[:2])
    gain = (GAIN[lang] in question) != wrong
    return a + b if gain else a - b


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build(out, SMALL)
    return out


def test_corpus_answers_match_their_questions(world):
    rows = read(world / "corpus.jsonl")
    solved = [r for r in rows if r["kind"] == "solve"]
    assert len(solved) == SMALL.n_english + 4 * SMALL.n_other
    for r in solved:
        last = int(re.findall(r"-?\d+", r["response"])[-1])
        assert last == expected_answer(r["prompt"], r["lang"], r.get("wrong", False)), r
        assert r["system"] == SYSTEM
    assert not any(r.get("wrong") for r in solved if r["lang"] == "en")
    wrong_share = sum(bool(r.get("wrong")) for r in solved if r["lang"] != "en") / (4 * SMALL.n_other)
    assert abs(wrong_share - SMALL.other_error_rate) < 0.15
    translations = [r for r in rows if r["kind"] == "translate"]
    assert len(translations) == 8 * SMALL.n_translation
    for r in translations:  # faithful: the target carries the source's numbers, in order, inside the tags
        source = r["prompt"].split("<sentence>\n")[1].split("\n</sentence>")[0]
        target, error = parse_translation(r["response"].removeprefix(PREFILL))
        assert error is None and r["response"].startswith(PREFILL)
        assert numbers(target) == numbers(source)


def test_broken_world_differs_only_in_translation_numbers(tmp_path, world):
    build(tmp_path, replace(SMALL, broken_translation=True))
    good, broken = read(world / "corpus.jsonl"), read(tmp_path / "corpus.jsonl")
    assert len(good) == len(broken)
    changed = 0
    for g, b in zip(good, broken):
        assert g["prompt"] == b["prompt"] and g["kind"] == b["kind"]
        if g["kind"] == "solve":
            assert g["response"] == b["response"]
        else:
            assert re.sub(r"\d+", "N", g["response"]) == re.sub(r"\d+", "N", b["response"])
            changed += numbers(g["response"]) != numbers(b["response"])
    assert changed > 0.9 * 8 * SMALL.n_translation
    assert (tmp_path / "eval" / "fr.jsonl").read_text() == (world / "eval" / "fr.jsonl").read_text()


def test_splits_parallel_and_disjoint(world):
    evaluation = {lang: read(world / "eval" / f"{lang}.jsonl") for lang in LANGS}
    assert len(evaluation["en"]) == SMALL.n_eval
    for lang in LANGS:
        assert [r["id"] for r in evaluation[lang]] == [r["id"] for r in evaluation["en"]]
        for r, en in zip(evaluation[lang], evaluation["en"]):
            assert numbers(r["query"]) == numbers(en["query"]) and r["response"] == en["response"]
            assert int(r["response"]) == expected_answer(r["query"], lang)
    held = [{r["instruction"] for r in read(world / f"prompts{t}" / "en.jsonl")} for t in (1, 2)]
    held.append({r["query"] for r in evaluation["en"]})
    assert all(len(s) == n for s, n in zip(held, (SMALL.n_prompts, SMALL.n_prompts, SMALL.n_eval)))
    assert not (held[0] & held[1]) and not (held[0] & held[2]) and not (held[1] & held[2])
    pretraining = {r["prompt"] for r in read(world / "corpus.jsonl") if r["kind"] == "solve" and r["lang"] == "en"}
    assert not pretraining & set().union(*held)
    for t in (1, 2):
        for lang in LANGS:
            prompts, gold = read(world / f"prompts{t}" / f"{lang}.jsonl"), read(world / f"gold{t}" / f"{lang}.jsonl")
            assert [p["id"] for p in prompts] == [g["id"] for g in gold]
            for p, g in zip(prompts, gold):
                assert g["prompt"] == p["instruction"]
                assert int(re.findall(r"-?\d+", g["response"])[-1]) == expected_answer(p["instruction"], lang)


def test_tokenizer_round_trip_and_prefill_agree(world):
    _, tokenizer = load(world / "init")
    assert tokenizer.chat_format == "llama3"
    for row in read(world / "corpus.jsonl")[:200]:
        for text in (row["prompt"], row["response"]):
            assert tokenizer.decode(tokenizer.encode(text)) == text
    # what the trainer sees (chat prompt, then the reply) is what generation sees with the tag pre-filled
    row = next(r for r in read(world / "corpus.jsonl") if r["kind"] == "translate")
    messages = chat_messages(row["prompt"], row["system"])
    trained = tokenizer.encode_chat(messages) + tokenizer.encode(row["response"])
    prefilled = tokenizer.encode_chat(messages, prefill=PREFILL)
    assert trained[: len(prefilled)] == prefilled


def test_init_folder_loads_in_transformers_with_equal_logits(world):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = load(world / "init")
    ours = read(world / "corpus.jsonl")[0]
    theirs_tok = transformers.AutoTokenizer.from_pretrained(world / "init")
    messages = chat_messages(ours["prompt"], ours["system"])
    ids = tokenizer.encode_chat(messages)
    assert theirs_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=False) == ids
    reference = transformers.LlamaForCausalLM.from_pretrained(world / "init", torch_dtype=torch.float32).eval()
    tokens = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=1e-5, atol=1e-5)
