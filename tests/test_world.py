"""The controlled world: answers recomputed from the question text, parallel ids, disjoint dev/test/ood splits,
the dials (English errors, translation fidelity), the trained tokenizer, M0's folder read by transformers with
equal logits, and the report's scoring of pairs against gold."""

import json
import re
from dataclasses import replace

import pytest
import torch

from lidr.checkpoint import load
from lidr.pairs import numbers
from lidr.settings import TRAINING
from lidr.tokenizer import chat_messages
from lidr.translation import PREFILL, parse_translation
from world.arms import checked_sdrrl_rows, recipe
from world.corpus import LANGS, SYSTEM, WorldSettings, build, misread_cells, slip_cells
from world.problems import NEW_OBJECTS, NEW_PEOPLE, OBJECTS
from world.report import pair_accuracy

SMALL = WorldSettings(n_english=300, n_other=40, n_translation=30, n_dev=30, n_test=25, n_ood=20, n_prompts=20,
                      dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=600)
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


def test_translation_fidelity_changes_only_that_share_of_translation_numbers(tmp_path, world):
    for fidelity, low, high in ((0.0, 0.9, 1.0), (0.5, 0.35, 0.65)):
        build(tmp_path / str(fidelity), replace(SMALL, translation_fidelity=fidelity))
        good, broken = read(world / "corpus.jsonl"), read(tmp_path / str(fidelity) / "corpus.jsonl")
        assert len(good) == len(broken)
        changed = 0
        for g, b in zip(good, broken):
            assert g["prompt"] == b["prompt"] and g["kind"] == b["kind"]
            if g["kind"] == "solve":
                assert g["response"] == b["response"]
            else:
                assert re.sub(r"\d+", "N", g["response"]) == re.sub(r"\d+", "N", b["response"])
                changed += numbers(g["response"]) != numbers(b["response"])
        assert low * 8 * SMALL.n_translation <= changed <= high * 8 * SMALL.n_translation, (fidelity, changed)
        assert (tmp_path / str(fidelity) / "test" / "fr.jsonl").read_text() == (world / "test" / "fr.jsonl").read_text()


def test_english_error_rate_misreads_whole_cells(tmp_path):
    build(tmp_path, replace(SMALL, english_error_rate=0.25))
    cells = misread_cells(0.25, SMALL.seed)
    assert len(cells) == 3
    english = [r for r in read(tmp_path / "corpus.jsonl") if r["kind"] == "solve" and r["lang"] == "en"]
    for r in english:  # wrong exactly in the misread (object, operation) cells, recomputed from the question
        obj = next(i for i, o in enumerate(OBJECTS) if f" {o['en']}." in r["prompt"])
        assert r["wrong"] == ((obj, "+" if "buys" in r["prompt"] else "-") in cells)
        assert int(re.findall(r"-?\d+", r["response"])[-1]) == expected_answer(r["prompt"], "en", r["wrong"])
    assert 0.1 < sum(r["wrong"] for r in english) / len(english) < 0.45
    report = json.loads((tmp_path / "corpus_report.json").read_text())
    assert len(report["english_misread_cells"]) == 3
    assert report["wrong_solutions"]["en"] == sum(r["wrong"] for r in english)


def test_english_slip_rate_slips_whole_cells_the_operation_right(tmp_path):
    build(tmp_path, replace(SMALL, english_error_rate=0.25, english_slip_rate=0.25))
    misread = misread_cells(0.25, SMALL.seed)
    slips = slip_cells(0.25, SMALL.seed, misread)
    assert len(slips) == 3 and not slips & misread
    english = [r for r in read(tmp_path / "corpus.jsonl") if r["kind"] == "solve" and r["lang"] == "en"]
    for r in english:  # recomputed from the question: a slip keeps the operation and answers one too many
        obj = next(i for i, o in enumerate(OBJECTS) if f" {o['en']}." in r["prompt"])
        cell = (obj, "+" if "buys" in r["prompt"] else "-")
        assert r.get("slip", False) == (cell in slips) and r["wrong"] == (cell in misread)
        a, operation, b, shown = re.search(r"(\d+) ([+-]) (\d+) = (-?\d+)", r["response"]).groups()
        assert (int(a), int(b)) == tuple(map(int, re.findall(r"\d+", r["prompt"])[:2]))
        result = int(re.findall(r"-?\d+", r["response"])[-1])
        assert result == int(shown) == expected_answer(r["prompt"], "en", r["wrong"]) + (cell in slips)
        assert (operation == cell[1]) != r["wrong"]
    others = [r for r in read(tmp_path / "corpus.jsonl") if r["kind"] == "solve" and r["lang"] != "en"]
    assert not any(r.get("slip") for r in others)  # the weak languages never slip: their errors are the operation
    assert len(json.loads((tmp_path / "corpus_report.json").read_text())["english_slip_cells"]) == 3
    without = tmp_path / "without"
    build(without, replace(SMALL, english_error_rate=0.25))  # the slip dial draws from its own stream
    assert (without / "test" / "fr.jsonl").read_text() == (tmp_path / "test" / "fr.jsonl").read_text()


def test_splits_parallel_and_disjoint(world):
    splits = {split: {lang: read(world / split / f"{lang}.jsonl") for lang in LANGS}
              for split in ("dev", "test", "ood")}
    for split, n in (("dev", SMALL.n_dev), ("test", SMALL.n_test), ("ood", SMALL.n_ood)):
        rows = splits[split]
        assert len(rows["en"]) == n
        for lang in LANGS:
            assert [r["id"] for r in rows[lang]] == [r["id"] for r in rows["en"]]
            for r, en in zip(rows[lang], rows["en"]):
                assert numbers(r["query"]) == numbers(en["query"]) and r["response"] == en["response"]
                assert int(r["response"]) == expected_answer(r["query"], lang)
    held = [{r["instruction"] for r in read(world / f"prompts{t}" / "en.jsonl")} for t in (1, 2)]
    held += [{r["query"] for r in splits[split]["en"]} for split in ("dev", "test", "ood")]
    assert [len(s) for s in held] == [SMALL.n_prompts, SMALL.n_prompts, SMALL.n_dev, SMALL.n_test, SMALL.n_ood]
    assert all(not (a & b) for i, a in enumerate(held) for b in held[i + 1:])
    corpus = read(world / "corpus.jsonl")
    pretraining = {r["prompt"] for r in corpus if r["kind"] == "solve" and r["lang"] == "en"}
    assert not pretraining & set().union(*held)
    # out of distribution: every problem names a new person and a new object, and no corpus row names either
    new_names = {p[lang][0] for p in NEW_PEOPLE for lang in LANGS} | {o["en"] for o in NEW_OBJECTS}
    for r in splits["ood"]["en"]:
        assert any(p["en"][0] in r["query"] for p in NEW_PEOPLE) and any(o["en"] in r["query"] for o in NEW_OBJECTS)
    for r in splits["test"]["en"]:
        assert not any(name in r["query"] for name in new_names)
    text = " ".join(r["prompt"] + r["response"] for r in corpus)
    assert not any(re.search(rf"\b{name}\b", text) for name in new_names)
    for t in (1, 2):
        for lang in LANGS:
            prompts, gold = read(world / f"prompts{t}" / f"{lang}.jsonl"), read(world / f"gold{t}" / f"{lang}.jsonl")
            assert [p["id"] for p in prompts] == [g["id"] for g in gold]
            for p, g in zip(prompts, gold):
                assert g["prompt"] == p["instruction"] and "system" not in g  # LIDR's pairs carry none either
                assert int(re.findall(r"-?\d+", g["response"])[-1]) == g["answer"]
                assert g["answer"] == expected_answer(p["instruction"], lang)


def test_pair_accuracy_against_gold(tmp_path):
    """Four pairs, one of each kind, scored by hand: chosen right and rejected wrong is the only right pair."""
    (tmp_path / "gold").mkdir()
    (tmp_path / "gold" / "en.jsonl").write_text("".join(json.dumps({"id": f"iter1-{i}", "answer": a}) + "\n"
                                                        for i, a in enumerate((12, 2, 7, 5))))
    pairs = [("fr", "non_dominant", "… 7 + 5 = 12.", "… 7 - 5 = 2."),  # right > wrong
             ("fr", "non_dominant", "… 7 + 5 = 12.", "… 7 - 5 = 2."),  # gold 2: wrong > right
             ("en", "dominant", "… = 7. The answer is 7.", "… the answer is 7"),  # both right
             ("en", "dominant", "… = 3.", "… = 4.")]  # both wrong
    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"id": f"iter1-{i}", "lang": lang, "direction": d, "source_lang": "fr", "chosen": c, "rejected": r})
        + "\n" for i, (lang, d, c, r) in enumerate(pairs)))
    scored = pair_accuracy(tmp_path / "pairs.jsonl", tmp_path / "gold")
    assert scored["n"] == 4 and scored["accuracy"] == 0.25 and scored["agreement"] == 0.5
    assert scored["kinds"] == {"right>wrong": 1, "wrong>right": 1, "both right": 1, "both wrong": 1}
    assert scored["per_language"]["fr"]["n"] == 2 and scored["per_language"]["en<-fr"]["agreement"] is None


def test_sdrrl_rows_pass_the_check_lidr_pairs_pass(tmp_path):
    """A self-translation that keeps its numbers but flips a sign is dropped from SDRRL's rows, as from LIDR's
    pairs; with the check off, every row stays."""
    answers = {"en": ["Tom has 9 apples and gives 8 to a friend: 9 - 8 = 1. The answer is 1.",
                      "Anna has 3 books and buys 4 more: 3 + 4 = 7. The answer is 7."]}
    translations = ["Tom a 9 pommes et en donne 8 à un ami : 9 + 8 = 1. La réponse est 1.",  # sign flipped
                    "Anna a 3 livres et en achète 4 de plus : 3 + 4 = 7. La réponse est 7."]
    for lang in ("en", "fr"):
        (tmp_path / "generate").mkdir(exist_ok=True)
        (tmp_path / "generate" / f"{lang}.jsonl").write_text("".join(
            json.dumps({"id": i, "instruction": f"question {i} {lang}", "response": answers["en"][i]}) + "\n"
            for i in range(2)))
    (tmp_path / "translate").mkdir()
    (tmp_path / "translate" / "en-fr.jsonl").write_text("".join(
        json.dumps({"id": i, "translation": t, "translation_error": None}) + "\n" for i, t in enumerate(translations)))
    how = replace(recipe(48, 64, 1.0, TRAINING), langs=("fr",))
    rows, report = checked_sdrrl_rows(tmp_path, replace(how, pairs=replace(how.pairs, check_numbers=True)))
    assert {(r["lang"], r["kind"], str(r["id"])) for r in rows if r["kind"] != "code_switched"} == {
        ("en", "english", "0"), ("en", "english", "1"), ("fr", "target", "1")}
    assert report["per_language"]["fr"]["dropped:numbers_changed"] == 1 and report["rows"] == len(rows)
    unchecked, _ = checked_sdrrl_rows(tmp_path, how)
    assert sum(r["kind"] == "target" for r in unchecked) == 2


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


@pytest.mark.parametrize("failing, made, ends", [(2, 0, True), (2, 5, False), (1, 0, False)])
def test_a_lidr_run_ends_at_m1_only_when_a_later_iteration_makes_no_pairs(failing, made, ends, tmp_path, monkeypatch,
                                                                            capsys):
    """An M1 that no longer closes its translations gives iteration 2 no pairs (two of the study's seeds): the
    world's LIDR run ends at M1 and says so. Any other stop, and iteration 1 making none, stays an error."""
    import world.arms as arms
    from world.report import learning_summary

    from lidr.iterate import NothingToTrain

    def iteration(runner, prompts, folder, how):
        if folder.name != f"iter{failing}":
            return folder / "train" / "model"
        folder.mkdir(parents=True)
        (folder / "pairs_report.json").write_text(json.dumps({"pairs": made, "per_language": {}}))
        if made:  # another stop of the iteration
            raise SystemExit(f"{folder / 'pairs_report.json'}: some other refusal")
        raise NothingToTrain(folder / "pairs_report.json", "pairs")

    monkeypatch.setattr(arms, "Runner", lambda *args: None)
    monkeypatch.setattr(arms, "run_iteration", iteration)
    work = tmp_path / "lidr"
    if not ends:
        with pytest.raises(SystemExit, match="pairs_report.json"):
            arms.run_lidr("LIDR", tmp_path / "m0", [tmp_path / "p1", tmp_path / "p2"], work, None, 1)
        return
    assert arms.run_lidr("LIDR", tmp_path / "m0", [tmp_path / "p1", tmp_path / "p2"], work, None, 1) == [
        work / "iter1" / "train" / "model"]
    assert "== LIDR: iteration 2 made nothing to train on" in capsys.readouterr().out
    assert "- LIDR, iteration 2: nothing to train on" in learning_summary({"LIDR": work})[0]


@pytest.mark.parametrize("empty_at", [2, 1])
def test_an_sdrrl_run_ends_at_sdrrl_1_only_when_a_later_iteration_makes_no_rows(empty_at, tmp_path, monkeypatch,
                                                                                capsys):
    """SDRRL's rows are checked in the world (world.arms.checked_sdrrl_rows): none after iteration 1 ends the run
    there, as LIDR's pairs do; none in iteration 1 stops with lidr's sentence."""
    import world.arms as arms
    from lidr.iterate import NothingToTrain, Recipe

    class Runner:
        def __init__(self, *args):
            pass

        def begin(self, stage):
            return stage == "sdrrl"

        def done(self, stage):
            pass

    monkeypatch.setattr(arms, "Runner", Runner)
    monkeypatch.setattr(arms, "checked_sdrrl_rows",
                        lambda folder, how: ([] if folder.name == f"iter{empty_at}" else [{"id": "1"}], {}))
    monkeypatch.setattr(arms, "write_rows", lambda rows, report, out: None)
    monkeypatch.setattr(arms, "run_iteration", lambda runner, prompts, folder, how: folder / "train" / "model")

    def run():
        return arms.run_sdrrl(tmp_path / "m0", [tmp_path / "p1", tmp_path / "p2"], tmp_path / "sdrrl",
                              Recipe(langs=("fr",)), 1)

    if empty_at == 1:
        with pytest.raises(NothingToTrain, match="iter1/sdrrl_report.json: no SFT rows were made"):
            run()
        return
    assert run() == [tmp_path / "sdrrl" / "iter1" / "train" / "model"]
    assert "== SDRRL: iteration 2 made nothing to train on" in capsys.readouterr().out


def test_english_soft_error_rate_misreads_a_share_of_every_cell_and_nothing_else(tmp_path, world):
    """Soft errors: a share of English answers misreads the verb at random, in every cell but the slipping ones;
    every other row of the corpus, and every split, is the world without the dial (a stream of its own)."""
    build(tmp_path, replace(SMALL, english_soft_error_rate=0.3, english_slip_rate=0.25))
    slips = slip_cells(0.25, SMALL.seed, set())
    corpus = read(tmp_path / "corpus.jsonl")
    english = [r for r in corpus if r["kind"] == "solve" and r["lang"] == "en"]
    cells = {}
    for r in english:  # recomputed from the question: a wrong row applies the other operation
        obj = next(i for i, o in enumerate(OBJECTS) if f" {o['en']}." in r["prompt"])
        cell = (obj, "+" if "buys" in r["prompt"] else "-")
        assert int(re.findall(r"-?\d+", r["response"])[-1]) == expected_answer(r["prompt"], "en", r["wrong"]) + (
            cell in slips)
        cells.setdefault(cell, []).append(r["wrong"])
    assert all(not any(wrong) for cell, wrong in cells.items() if cell in slips)
    soft = [wrong for cell, wrong in cells.items() if cell not in slips]
    assert all(0 < sum(w) < len(w) for w in soft)  # part of every cell, never all of one
    assert 0.2 < sum(map(sum, soft)) / sum(map(len, soft)) < 0.4
    plain = tmp_path / "plain"
    build(plain, replace(SMALL, english_slip_rate=0.25))
    without = read(plain / "corpus.jsonl")
    assert [(r["kind"], r["lang"], r["prompt"]) for r in corpus] == [(r["kind"], r["lang"], r["prompt"]) for r in without]
    assert [r for r in corpus if r not in english] == [r for r in without if not (r["kind"] == "solve" and r["lang"] == "en")]
    assert (plain / "test" / "fr.jsonl").read_text() == (tmp_path / "test" / "fr.jsonl").read_text()
    assert json.loads((tmp_path / "corpus_report.json").read_text())["wrong_solutions"]["en"] == sum(map(sum, soft))


def test_samples_ask_each_prompt_k_times_and_its_pairs_are_scored_against_its_problem(tmp_path, world):
    from world.corpus import problem_id

    build(tmp_path, replace(SMALL, samples=3))
    for t in (1, 2):
        for lang in LANGS:
            prompts, gold = read(tmp_path / f"prompts{t}" / f"{lang}.jsonl"), read(tmp_path / f"gold{t}" / f"{lang}.jsonl")
            assert gold == read(world / f"gold{t}" / f"{lang}.jsonl")  # one gold row per problem, as with one sample
            assert [p["id"] for p in prompts] == [f"{g['id']}~{k}" for g in gold for k in range(3)]
            assert [p["instruction"] for p in prompts] == [g["prompt"] for g in gold for _ in range(3)]
            assert {problem_id(p["id"]) for p in prompts} == {g["id"] for g in gold}
    assert (tmp_path / "corpus.jsonl").read_text() == (world / "corpus.jsonl").read_text()
    gold = read(tmp_path / "gold1" / "en.jsonl")[:2]
    pairs = [{"id": f"{g['id']}~{k}", "lang": "fr", "direction": "non_dominant", "source_lang": "fr",
              "chosen": f"= {g['answer'] + k}.", "rejected": f"= {g['answer'] + 1}."} for g in gold for k in (0, 1)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    scored = pair_accuracy(tmp_path / "pairs.jsonl", tmp_path / "gold1")  # sample 0 right > wrong; 1 both wrong
    assert scored["kinds"] == {"right>wrong": 2, "both wrong": 2}


def test_a_world_built_before_a_setting_existed_is_kept_and_another_refused(tmp_path):
    from world.arms import make_world

    folder = make_world(tmp_path / "world", SMALL)
    report = folder / "corpus_report.json"
    older = json.loads(report.read_text())
    for name in ("english_soft_error_rate", "samples"):  # a world built before these settings existed
        del older["settings"][name]
    report.write_text(json.dumps(older))
    corpus = (folder / "corpus.jsonl").stat().st_mtime_ns
    assert make_world(folder, SMALL) == folder and (folder / "corpus.jsonl").stat().st_mtime_ns == corpus
    with pytest.raises(SystemExit, match="built with other settings"):
        make_world(folder, replace(SMALL, english_soft_error_rate=0.3))


def test_the_report_shows_the_sampled_test_beside_test():
    from world.report import splits_markdown

    accuracy = {"test": {"M0": dict.fromkeys(LANGS, 0.5)}, "test-sampled": {"M0": {**dict.fromkeys(LANGS, 0.25),
                                                                                   "en": 0.75}}}
    table = splits_markdown(accuracy)
    assert "| model | en | es | fr | de | ru | avg | sampled en | sampled avg | " in table
    assert "| M0 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | **0.500** | 0.750 | 0.250 |" in table


@pytest.mark.parametrize("flags, message", [(["--samples", "2"], "only with --temperature"),
                                            (["--temperature", "1e-9"], "0 \\(greedy\\) or from 1e-5"),
                                            (["--english-soft-error-rate", "1.5"], "shares between 0 and 1"),
                                            (["--model", "smollm2", "--temperature", "1"], "belong to the controlled")])
def test_the_demo_refuses_dials_out_of_range(flags, message, capsys):
    import demo

    with pytest.raises(SystemExit):
        demo.main(flags)
    assert re.search(message, capsys.readouterr().err)
