"""SDRRL supervised rows from real Llama-3 English answers and their French self-translations."""

import json
import random

from conftest import shared_data, small_iteration

from lidr.sdrrl import SDRRLOptions, build_sdrrl_rows, code_switch


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
    rows, report = build_sdrrl_rows(prompts, answers, en_to, ["fr"], SDRRLOptions(code_switch_rows=1.0, seed=1))
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("english", "target", "code_switched")}
    assert len(kinds["english"]) == 1000 and len(kinds["target"]) == 922  # 78 translations failed
    assert report["per_language"]["fr"]["skipped:translation_failed"] == 78
    for r in kinds["target"]:
        assert r["prompt"] == prompts["fr"][r["id"]] and r["response"] == en_to["fr"][r["id"]]
    # every code-switched line is the French or the English line at the same position
    assert 0 < len(kinds["code_switched"]) < 922
    for r in kinds["code_switched"]:
        fr_lines = [x for x in en_to["fr"][r["id"]].split("\n") if x.strip()]
        en_lines = [x for x in answers["en"][r["id"]].split("\n") if x.strip()]
        if r["response"] == en_to["fr"][r["id"]]:  # only the question was switched
            assert r["prompt"] != prompts["fr"][r["id"]]
            continue
        got = r["response"].split("\n")
        assert len(got) == len(fr_lines) and all(g in (f, e) for g, f, e in zip(got, fr_lines, en_lines))
        assert got != fr_lines
    assert report["rows"] == len(rows)


def test_code_switch_needs_aligned_lines():
    rng = random.Random(0)
    assert code_switch("un\ndeux", "one", 1.0, rng) is None
    assert code_switch("un\ndeux", "one\ntwo", 1.0, rng) == "one\ntwo"
    assert code_switch("un\ndeux", "one\ntwo", 0.0, rng) is None  # nothing swapped: no variant


def test_command_reads_ids_as_text_skips_whitespace_and_refuses_files_it_did_not_write(tmp_path):
    import pytest

    from lidr.sdrrl import main

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
    with pytest.raises(SystemExit, match=r"generate/fr\.jsonl: exists and was not written by lidr\.sdrrl"):
        main(["--dir", str(folder), "--langs", "fr", "--out", str(folder / "generate" / "fr.jsonl")])
    with pytest.raises(SystemExit, match=r"name fr more than once"):
        main(["--dir", str(folder), "--langs", "fr,fr"])
