"""SDRRL supervised rows from real Llama-3 English answers and their French self-translations."""

import json
import random

from helpers import shared_data, small_iteration, write_jsonl

from lidr.harness.stage_files import read_translation_task_ids
from lidr.sdrrl import SDRRLOptions, build_sdrrl_rows, code_switch, units


def real_inputs():
    folder = shared_data("llama3-8b-instruct-m0")
    english = [json.loads(line) for line in open(folder / "generate_en.jsonl")]
    to_fr = [json.loads(line) for line in open(folder / "translate_en_to_fr.jsonl")]
    fr_prompts = [json.loads(line) for line in open(shared_data("alpagasus", "id_0_1000", "fr.jsonl"))]
    prompts = {"en": {r["id"]: r["instruction"] for r in english}, "fr": {r["id"]: r["instruction"] for r in fr_prompts}}
    answers = {"en": {r["id"]: r["response"] for r in english}}
    en_to = {"fr": {r["id"]: None if r["en2fr_reponse"] == "Translation Error" else r["en2fr_reponse"] for r in to_fr}}
    return prompts, answers, en_to


def test_rows_from_real_answers_and_translations():
    prompts, answers, en_to = real_inputs()
    task_ids = read_translation_task_ids(shared_data("alpagasus", "translation_task_ids.jsonl")) & set(answers["en"])
    rows, report = build_sdrrl_rows(prompts, answers, en_to, ["fr"], SDRRLOptions(code_switch_rows=1.0, seed=1),
                                    task_ids)
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("english", "target", "code_switched", "translated")}
    failed = {i for i, t in en_to["fr"].items() if t is None}
    assert len(failed) == 78 and task_ids
    assert len(kinds["english"]) == 1000 and len(kinds["target"]) == 1000 - len(failed - task_ids)
    assert report["per_language"]["fr"]["skipped:translation_failed"] == len(failed - task_ids)
    assert report["per_language"]["fr"]["translation_task_kept_english"] == len(task_ids)
    assert not kinds["translated"]  # no reference answers given
    for r in kinds["target"]:  # a translation request keeps the English answer, as LIDR's pairs do
        expected = answers["en"][r["id"]] if r["id"] in task_ids else en_to["fr"][r["id"]]
        assert r["prompt"] == prompts["fr"][r["id"]] and r["response"] == expected
    # every sentence of a code-switched answer is the French or the English sentence at its position
    assert 0 < len(kinds["code_switched"]) < len(kinds["target"])
    assert not {r["id"] for r in kinds["code_switched"]} & task_ids
    sentence_switched = 0
    for r in kinds["code_switched"]:
        fr, en = en_to["fr"][r["id"]], answers["en"][r["id"]]
        if r["response"] == fr:  # only the question was switched
            assert r["prompt"] != prompts["fr"][r["id"]]
            continue
        got, fr_units = units(r["response"], "sentence"), units(fr, "sentence")
        en_sentences = [u for u in units(en, "sentence")[::2] if u.strip()]
        assert got[1::2] == fr_units[1::2]  # the French text's own spacing and line breaks
        fr_sentences = [u for u in fr_units[::2] if u.strip()]
        got_sentences = [u for u in got[::2] if u.strip()]
        assert all(g in (f, e) for g, f, e in zip(got_sentences, fr_sentences, en_sentences))
        assert got_sentences != fr_sentences
        sentence_switched += "\n" not in fr  # one-line answers: a line-level switch could only swap all of it
    assert sentence_switched > 0
    assert report["rows"] == len(rows)


def test_random_choices_follow_the_seed_rule():
    """A row's variant depends on (seed, id, language) only: dropping the other rows changes nothing."""
    prompts, answers, en_to = real_inputs()
    options = SDRRLOptions(code_switch_rows=0.5, seed=3)
    every, _ = build_sdrrl_rows(prompts, answers, en_to, ["fr"], options)
    ids = list(answers["en"])[::7]
    some, _ = build_sdrrl_rows(prompts, {"en": {i: answers["en"][i] for i in ids}}, en_to, ["fr"], options)
    assert some == [r for r in every if r["id"] in set(ids)]
    other_seed, _ = build_sdrrl_rows(prompts, answers, en_to, ["fr"], SDRRLOptions(code_switch_rows=0.5, seed=4))
    assert other_seed != every


def test_translated_question_answer_rows():
    prompts = {"en": {"1": "Q1", "2": "Q2"}, "fr": {"1": "Q1 fr", "2": "Q2 fr"}}
    answers = {"en": {"1": "A1", "2": "A2"}}
    en_to = {"fr": {"1": "A1 fr", "2": "A2 fr"}}
    references_to = {"fr": {"1": "Gold 1 fr", "2": None}}  # the second reference's translation failed
    rows, report = build_sdrrl_rows(prompts, answers, en_to, ["fr"], SDRRLOptions(code_switch_rows=0.0),
                                    references_to=references_to)
    assert [(r["id"], r["kind"], r["prompt"], r["response"]) for r in rows if r["kind"] == "translated"] == [
        ("1", "translated", "Q1 fr", "Gold 1 fr")]
    assert report["per_language"]["fr"]["translated:skipped:no_reference_or_translation_failed"] == 1


def test_code_switch_needs_aligned_units():
    rng = random.Random(0)
    assert code_switch("un\ndeux", "one", "line", 1.0, rng) is None
    assert code_switch("un\n\ndeux", "one\ntwo", "line", 1.0, rng) == "one\n\ntwo"  # the French line breaks
    assert code_switch("un\ndeux", "one\ntwo", "line", 0.0, rng) is None  # nothing swapped: no variant
    assert code_switch("Un. Deux !", "One. Two!", "sentence", 1.0, rng) == "One. Two!"
    assert code_switch("Il a 3.5 kg. Deux.", "He has 3.5 kg. Two.", "sentence", 1.0, rng) == "He has 3.5 kg. Two."
    assert code_switch("Un. Deux.", "One, two.", "sentence", 1.0, rng) is None


def test_command_reads_ids_as_text_skips_whitespace_and_refuses_files_it_did_not_write(tmp_path):
    import pytest

    from lidr.cli.sdrrl import main

    folder = small_iteration(tmp_path)
    (folder / "translate" / "en-fr.jsonl").write_text(
        "".join(json.dumps({"id": i, "translation": "  " if i == 2 else f"A{i} fr"}) + "\n" for i in (1, 2, 3)))
    out = folder / "sdrrl.jsonl"
    main(["--dir", str(folder), "--langs", "fr", "--code-switch-rows", "0"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["kind"], r["prompt"], r["response"]) for r in rows] == [
        ("1", "english", "Q1", "A1"), ("1", "target", "Q1 fr", "A1 fr"), ("2", "english", "Q2", "A2"),
        ("3", "english", "Q3", "A3"), ("3", "target", "Q3 fr", "A3 fr")]
    report = json.loads((folder / "sdrrl_report.json").read_text())
    assert report["per_language"]["fr"]["skipped:translation_failed"] == 1
    with pytest.raises(SystemExit, match=r"sdrrl\.jsonl: was made from other inputs or other settings "
                                         r"\(settings\.options\.seed: 0 -> 1\)"):
        main(["--dir", str(folder), "--langs", "fr", "--code-switch-rows", "0", "--seed", "1"])
    with pytest.raises(SystemExit, match=r"generate/fr\.jsonl: exists and was not written by lidr\.cli\.sdrrl"):
        main(["--dir", str(folder), "--langs", "fr", "--out", str(folder / "generate" / "fr.jsonl")])
    with pytest.raises(SystemExit, match=r"name fr more than once"):
        main(["--dir", str(folder), "--langs", "fr,fr"])


def test_command_reads_the_reference_translations_and_the_asked_prompts(tmp_path):
    """--reference-field: translate/en-{l}.reference.jsonl gives the translated rows; prompts are the user turns
    generate.py recorded (here the alpaca template, filled in per language)."""
    from lidr.cli.sdrrl import main
    from lidr.settings import PROMPT_TEMPLATES, user_turn

    meta = {"prompt_template": PROMPT_TEMPLATES["alpaca"]}
    for lang, suffix in (("en", ""), ("fr", " fr")):
        write_jsonl(tmp_path / "generate" / f"{lang}.jsonl",
                    [{"id": i, "instruction": f"Q{i}{suffix}", "answer": f"Gold {i}", "response": f"A{i}{suffix}",
                      "response_meta": meta} for i in (1, 2)])
    write_jsonl(tmp_path / "translate" / "en-fr.jsonl", [{"id": i, "translation": f"A{i} fr"} for i in (1, 2)])
    write_jsonl(tmp_path / "translate" / "en-fr.reference.jsonl",
                [{"id": 1, "translation": "Gold 1 fr"}, {"id": 2, "translation": None, "translation_error": "cut"}])
    main(["--dir", str(tmp_path), "--langs", "fr", "--reference-field", "answer", "--code-switch-rows", "0"])
    rows = [json.loads(line) for line in (tmp_path / "sdrrl.jsonl").read_text().splitlines()]
    assert [(r["id"], r["kind"], r["prompt"], r["response"]) for r in rows] == [
        ("1", "english", user_turn("alpaca", "Q1", "en"), "A1"),
        ("1", "translated", user_turn("alpaca", "Q1 fr", "fr"), "Gold 1 fr"),
        ("1", "target", user_turn("alpaca", "Q1 fr", "fr"), "A1 fr"),
        ("2", "english", user_turn("alpaca", "Q2", "en"), "A2"),
        ("2", "target", user_turn("alpaca", "Q2 fr", "fr"), "A2 fr")]
    report = json.loads((tmp_path / "sdrrl_report.json").read_text())
    assert "translate/en-fr.reference" in report["made_from"]["inputs"]
