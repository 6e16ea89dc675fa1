"""The translation parser and the LIDR pair builder on Llama-3-8B-Instruct's real outputs."""

import json

import pytest
from helpers import shared_data, small_iteration, write_jsonl

from lidr.harness.stage_files import pairs_from_dir, read_translation_task_ids
from lidr.pairs import PairOptions, arithmetic, build_pairs
from lidr.translation import CLOSING_TAG, PREFILL, parse_translation, translation_prompt


@pytest.fixture(scope="module")
def real():
    """English answers, their French self-translations (78 failed) and the translation-task ids."""
    folder = shared_data("llama3-8b-instruct-m0")
    english = [json.loads(line) for line in open(folder / "generate_en.jsonl")]
    to_fr = [json.loads(line) for line in open(folder / "translate_en_to_fr.jsonl")]
    french_prompts = [json.loads(line) for line in open(shared_data("alpagasus", "id_0_1000", "fr.jsonl"))]
    task_ids = read_translation_task_ids(shared_data("alpagasus", "translation_task_ids.jsonl"))
    return english, to_fr, french_prompts, task_ids


def test_parser_reads_real_translations_and_flags_unclosed_ones(real):
    _, to_fr, _, _ = real
    done = [r["en2fr_reponse"] for r in to_fr if r["en2fr_reponse"] != "Translation Error"]
    assert len(done) == 922
    for text in done[:200]:
        assert parse_translation(text + "\n" + CLOSING_TAG) == (text.strip(), None)
        assert parse_translation(text) == (None, "no </translated> before the reply ended")
    assert parse_translation("\n  " + CLOSING_TAG) == (None, "empty translation")


def test_prompt_is_the_papers_template():
    assert translation_prompt("Hola.", "fr") == (
        "Please translate the following sentences into French. The input sentences are wrapped by <sentence> and "
        "</sentence>:\n\n<sentence>\nHola.\n</sentence>\n\nThe translated result should be wrapped by <translated> "
        "and </translated>."
    )
    assert PREFILL == "<translated>\n"


def test_pairs_from_real_english_answers_and_french_self_translations(real, tmp_path):
    english, to_fr, french_prompts, task_ids = real
    ids = [r["id"] for r in english]
    failed_fr = {r["id"] for r in to_fr if r["en2fr_reponse"] == "Translation Error"}
    # the other side (M0's own French answers and their English back-translations) is not in the
    # released data: stand-ins, with 5 back-translations failed and 3 French answers equal to the
    # English-to-French translation (identical pairs, to be dropped)
    failed_back = set(ids[100:105])
    identical = [i for i in ids if i not in failed_fr and i not in task_ids][:3]
    translations = {r["id"]: r["en2fr_reponse"] for r in to_fr}
    y_fr = {i: translations[i] if i in identical else f"Réponse du modèle en français ({i})." for i in ids}
    write_jsonl(tmp_path / "generate" / "en.jsonl", english)
    write_jsonl(tmp_path / "generate" / "fr.jsonl",
                [{"id": p["id"], "instruction": p["instruction"], "response": y_fr[p["id"]]} for p in french_prompts])
    write_jsonl(tmp_path / "translate" / "en-fr.jsonl", [{"id": r["id"], "translation": r["en2fr_reponse"]} for r in to_fr])
    write_jsonl(tmp_path / "translate" / "fr-en.jsonl", [
        {"id": i, "translation": None if i in failed_back else f"The model's answer in French ({i}).",
         "translation_error": "no </translated> before the reply ended" if i in failed_back else None}
        for i in ids
    ])

    # the repository's rule, the default: a failed translation in either direction drops both pairs of that id
    pairs, report = pairs_from_dir(tmp_path, ["fr"], translation_task_ids=task_ids)
    assert report["failed_translation"] == "drop-both"
    failed_either = failed_fr | failed_back
    assert {p["id"] for p in pairs if p["direction"] == "dominant"} == set(ids) - failed_either
    assert {p["id"] for p in pairs if p["direction"] == "non_dominant"} == set(ids) - failed_either - set(identical)
    assert report["per_language"]["fr"]["skipped"] == {"both:translation_failed": len(failed_either),
                                                      "non_dominant:chosen_equals_rejected": 3}
    assert report["per_language"]["fr"]["dominant"] == 1000 - 78 - 5

    # lidr's variant: each pair skipped only when its own translation failed (78 more English pairs here)
    pairs, report = pairs_from_dir(tmp_path, ["fr"], PairOptions(failed_translation="drop-one"),
                                   translation_task_ids=task_ids)
    non_dominant = {p["id"]: p for p in pairs if p["direction"] == "non_dominant"}
    dominant = {p["id"]: p for p in pairs if p["direction"] == "dominant"}
    tasks_here = task_ids & set(ids)
    # failed translations are skipped, except for translation tasks, whose chosen is y_en itself
    expected_ids = set(ids) - (failed_fr - tasks_here) - set(identical)
    assert set(non_dominant) == expected_ids
    assert set(dominant) == set(ids) - failed_back
    english_by_id = {r["id"]: r["response"] for r in english}
    french_prompt_by_id = {p["id"]: p["instruction"] for p in french_prompts}
    for i, p in non_dominant.items():
        assert p["prompt"] == french_prompt_by_id[i] and p["rejected"] == y_fr[i] and p["lang"] == "fr"
        assert p["chosen"] == (english_by_id[i] if i in tasks_here else translations[i])
    for i, p in dominant.items():
        assert (p["chosen"], p["rejected"], p["lang"], p["source_lang"]) == (
            english_by_id[i], f"The model's answer in French ({i}).", "en", "fr")
        assert p["prompt"] == next(r["instruction"] for r in english if r["id"] == i)

    counts = report["per_language"]["fr"]
    assert counts["non_dominant"] == len(expected_ids) and counts["dominant"] == 1000 - 5
    assert counts["skipped"] == {
        "non_dominant:translation_failed": len(failed_fr - tasks_here),
        "non_dominant:chosen_equals_rejected": 3,
        "dominant:translation_failed": 5,
    }
    assert counts["translation_task_kept_english"] == len(tasks_here)
    assert report["pairs"] == len(pairs) == len(expected_ids) + 995
    assert len(failed_fr) == 78 and len(tasks_here) > 0


def test_dominant_pairs_from_every_language_or_one_sampled():
    ids = [f"q{i}" for i in range(50)]
    langs = ["es", "de", "fr"]
    prompts = {lang: {i: f"{lang} prompt {i}" for i in ids} for lang in ["en", *langs]}
    answers = {lang: {i: f"{lang} answer {i}" for i in ids} for lang in ["en", *langs]}
    en_to = {lang: {i: f"en answer {i} in {lang}" for i in ids} for lang in langs}
    to_en = {lang: {i: f"{lang} answer {i} in en" for i in ids} for lang in langs}

    every, report = build_pairs(prompts, answers, en_to, to_en, set(), langs)
    assert sum(p["direction"] == "dominant" for p in every) == 150
    assert {p["source_lang"] for p in every if p["direction"] == "dominant"} == set(langs)
    assert report["dominant_pairs"] == "all"

    one, report = build_pairs(prompts, answers, en_to, to_en, set(), langs, PairOptions(dominant_pairs="one", seed=3))
    dominant = [p for p in one if p["direction"] == "dominant"]
    assert len(dominant) == 50 and len({p["id"] for p in dominant}) == 50
    assert len({p["source_lang"] for p in dominant}) == 3  # sampled, not always the last language
    assert sum(p["direction"] == "non_dominant" for p in one) == 150


def test_language_check_drops_an_off_target_chosen_answer():
    """Real language identification (py3langid): a "translation" left in English is caught."""
    prompts = {"en": {"a": "Say hello", "b": "Say goodbye"}, "fr": {"a": "Dis bonjour", "b": "Dis au revoir"}}
    answers = {"en": {"a": "Hello to everyone in the room!", "b": "Goodbye and see you tomorrow, friends!"},
               "fr": {"a": "Salut", "b": "Au revoir"}}
    en_to = {"fr": {"a": "Bonjour à tout le monde dans la salle !",
                    "b": "Goodbye and see you tomorrow, my friends!"}}  # b never left English
    to_en = {"fr": {"a": "Hi", "b": "Goodbye"}}
    pairs, report = build_pairs(prompts, answers, en_to, to_en, set(), ["fr"], PairOptions(check_language=True))
    assert [(p["id"], p["direction"]) for p in pairs] == [("a", "non_dominant"), ("a", "dominant"), ("b", "dominant")]
    assert report["per_language"]["fr"]["skipped"] == {"non_dominant:chosen_off_target": 1}


def test_number_check_drops_translations_that_change_the_numbers():
    """--check-numbers: the translated side of each pair must carry its source's numbers, in order."""
    prompts = {"en": {i: f"Q{i}" for i in "abc"}, "de": {i: f"F{i}" for i in "abc"}}
    answers = {"en": {"a": "6 + 8 = 14. The answer is 14.", "b": "It is 1,200 apples.", "c": "9 - 2 = 7"},
               "de": {"a": "Es sind 13.", "b": "Keine Ahnung.", "c": "Sieben: 9 - 2 = 7"}}
    en_to = {"de": {"a": "6 + 8 = 14. Die Antwort ist 14.",  # faithful
                    "b": "Es sind 1.200 Äpfel.",  # the same number, German separator
                    "c": "9 - 2 = 5"}}  # a number changed
    to_en = {"de": {"a": "It is 31.",  # changed: 13 -> 31
                    "b": "No idea.", "c": "Seven: 9 - 2 = 7"}}
    pairs, report = build_pairs(prompts, answers, en_to, to_en, set(), ["de"], PairOptions(check_numbers=True))
    assert [(p["id"], p["direction"]) for p in pairs] == [("a", "non_dominant"), ("b", "non_dominant"),
                                                          ("b", "dominant"), ("c", "dominant")]
    assert report["per_language"]["de"]["skipped"] == {"dominant:translation_changed_numbers": 1,
                                                       "non_dominant:translation_changed_numbers": 1}
    unchecked, _ = build_pairs(prompts, answers, en_to, to_en, set(), ["de"])
    assert len(unchecked) == 6


def test_number_check_drops_translations_that_change_a_sign():
    """A translation that keeps every number of "9 - 8 = 1" but writes "9 + 8 = 1" is not faithful (the
    controlled world's M1 did this to 40% of its translations); a hyphen inside words is no sign."""
    assert arithmetic("Anna gives 8: 9 - 8 = 1. The answer is 1.") == ["8", "9", "-", "8", "=", "1", "1"]
    assert arithmetic("a well-known 1,200 × 3 = 3.600") == ["1200", "×", "3", "=", "3600"]
    prompts = {"en": {"a": "Qa", "b": "Qb"}, "es": {"a": "Fa", "b": "Fb"}}
    answers = {"en": {"a": "9 - 8 = 1. The answer is 1.", "b": "9 + 8 = 17. The answer is 17."},
               "es": {"a": "9 + 8 = 17. La respuesta es 17.", "b": "9 - 8 = 1. La respuesta es 1."}}
    en_to = {"es": {"a": "9 + 8 = 1. La respuesta es 1.",  # sign flipped, numbers kept
                    "b": "9 + 8 = 17. La respuesta es 17."}}
    to_en = {"es": {"a": "9 + 8 = 17. The answer is 17.", "b": "9 - 8 = 1. The answer is 1."}}
    pairs, report = build_pairs(prompts, answers, en_to, to_en, set(), ["es"], PairOptions(check_numbers=True))
    assert [(p["id"], p["direction"]) for p in pairs] == [("a", "dominant"), ("b", "non_dominant"), ("b", "dominant")]
    assert report["per_language"]["es"]["skipped"] == {"non_dominant:translation_changed_numbers": 1}



def test_same_answer_filter_drops_pairs_that_end_in_the_same_number():
    """--drop-same-answer: chosen and rejected ending in the same number carry no right-vs-wrong signal."""
    prompts = {"en": {i: f"Q{i}" for i in "ab"}, "fr": {i: f"F{i}" for i in "ab"}}
    answers = {"en": {"a": "7 - 5 = 2. The answer is 2.", "b": "3 + 4 = 7. The answer is 7."},
               "fr": {"a": "Thomas a 7 pommes : 7 + 5 = 12. La réponse est 12.",  # wrong: the pair is kept
                      "b": "Anne a 3 livres : 3 + 4 = 7. La réponse est 7."}}  # right: the same final number
    en_to = {"fr": {"a": "Thomas a 7 crayons : 7 - 5 = 2. La réponse est 2.",
                    "b": "Anne a 3 billes : 3 + 4 = 7. La réponse est 7."}}
    to_en = {"fr": {"a": "Tom has 7 apples: 7 + 5 = 12. The answer is 12.",
                    "b": "Anna has 3 books: 3 + 4 = 7. The answer is 7."}}
    pairs, report = build_pairs(prompts, answers, en_to, to_en, set(), ["fr"], PairOptions(drop_same_answer=True))
    assert [(p["id"], p["direction"]) for p in pairs] == [("a", "non_dominant"), ("a", "dominant")]
    assert report["per_language"]["fr"]["skipped"] == {"dominant:same_final_number": 1,
                                                       "non_dominant:same_final_number": 1}
    unfiltered, _ = build_pairs(prompts, answers, en_to, to_en, set(), ["fr"])
    assert len(unfiltered) == 4

# -----------------------------------------------------------------------------
# the command on a small iteration folder: ids as text, empty answers, files it did not write


def test_ids_compare_as_text_and_whitespace_is_no_answer(tmp_path):
    pairs, report = pairs_from_dir(small_iteration(tmp_path), ["fr"], PairOptions(failed_translation="drop-one"))
    assert sorted((p["id"], p["direction"], p["chosen"], p["rejected"]) for p in pairs) == [
        ("1", "dominant", "A1", "R1 en"), ("1", "non_dominant", "A1 fr", "R1"), ("2", "non_dominant", "A2 fr", "R2")]
    assert report["per_language"]["fr"]["skipped"] == {"dominant:translation_failed": 1, "no_answer_in_language": 1}
    assert set(report["made_from"]["inputs"]) == {"generate/en", "generate/fr", "translate/en-fr", "translate/fr-en"}
    with pytest.raises(ValueError, match="name fr more than once"):
        pairs_from_dir(tmp_path, ["fr", "fr"])


def test_pairs_command_never_writes_over_a_file_it_did_not_write(tmp_path, capsys):
    from lidr.cli.pairs import main

    folder = small_iteration(tmp_path)
    stage_file = folder / "generate" / "en.jsonl"
    before = stage_file.read_bytes()
    with pytest.raises(SystemExit, match=r"generate/en\.jsonl: exists and was not written by lidr\.cli\.pairs"):
        main(["--dir", str(folder), "--langs", "fr", "--out", str(stage_file)])
    assert stage_file.read_bytes() == before
    with pytest.raises(SystemExit, match=r"the languages fr,fr name fr more than once"):
        main(["--dir", str(folder), "--langs", "fr,fr"])
    with pytest.raises(SystemExit, match=r"the dominant language 'en' is among the languages en,fr"):
        main(["--dir", str(folder), "--langs", "en,fr"])
    main(["--dir", str(folder), "--langs", "fr"])
    written = (folder / "pairs.jsonl").read_bytes()
    main(["--dir", str(folder), "--langs", "fr"])  # the same inputs and options: the same file
    assert (folder / "pairs.jsonl").read_bytes() == written
    with pytest.raises(SystemExit, match=r"pairs\.jsonl: was made from other inputs or other settings "
                                         r"\(settings\.options\.check_numbers: False -> True\)"):
        main(["--dir", str(folder), "--langs", "fr", "--check-numbers"])
    write_jsonl(folder / "translate" / "fr-en.jsonl", [{"id": "1", "translation": "R1 in English"}])
    with pytest.raises(SystemExit, match=r"inputs\.translate/fr-en\.sha256"):
        main(["--dir", str(folder), "--langs", "fr"])
    assert (folder / "pairs.jsonl").read_bytes() == written
