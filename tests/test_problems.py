"""The demo's word problems: parallel across languages, exact answers, train and eval disjoint."""

import json
import re

from world.problems import LANGS, ru_count, write_sets


def test_parallel_problems_with_exact_answers(tmp_path):
    write_sets(tmp_path, n_train=40, n_eval=30)
    rows = {(split, lang): [json.loads(line) for line in open(tmp_path / split / f"{lang}.jsonl")]
            for split in ("train", "eval") for lang in LANGS}
    for split in ("train", "eval"):
        ids = [r["id"] for r in rows[split, "en"]]
        assert len(set(ids)) == len(ids) == (40 if split == "train" else 30)
        for lang in LANGS:
            assert [r["id"] for r in rows[split, lang]] == ids
            text_field = "instruction" if split == "train" else "query"
            for r, en in zip(rows[split, lang], rows[split, "en"]):
                # the same two numbers appear in every language's version of a problem
                assert re.findall(r"\d+", r[text_field]) == re.findall(r"\d+", en[text_field])
    for r in rows["eval", "en"]:  # the gold answer, recomputed from the English text
        a, b = map(int, re.findall(r"\d+", r["query"]))
        assert int(r["response"]) == (a + b if "buys" in r["query"] else a - b) >= 0
    train_texts = {r["instruction"] for r in rows["train", "en"]}
    assert not train_texts & {r["query"] for r in rows["eval", "en"]}


def test_sets_are_reproducible_and_seeds_matter(tmp_path):
    write_sets(tmp_path / "a", 10, 10)
    write_sets(tmp_path / "b", 10, 10)
    write_sets(tmp_path / "c", 10, 10, train_seed=7)
    read = lambda d: (d / "train" / "fr.jsonl").read_text()
    assert read(tmp_path / "a") == read(tmp_path / "b") != read(tmp_path / "c")


def test_russian_numeral_agreement():
    forms = ("яблоко", "яблока", "яблок")
    assert [ru_count(n, forms) for n in (1, 2, 4, 5, 11, 12, 14, 21, 22, 25, 101, 111)] == [
        "яблоко", "яблока", "яблока", "яблок", "яблок", "яблок", "яблок", "яблоко", "яблока", "яблок", "яблоко", "яблок"]
