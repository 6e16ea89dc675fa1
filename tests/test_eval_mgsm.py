"""MGSM: reading the last number, language identification, and the whole run on the demo model."""

import json
import re
import subprocess
import sys

import pytest
from helpers import ROOT, kill_at_progress, shared_data

import lidr.sampler
from eval import mgsm
from eval.mgsm import extract_last_number, read_questions
from lidr.settings import user_turn
from lidr.languages import detect_language, is_off_target

# (answer as a model writes it, the number a reader takes as the final answer)
ANSWERS = [
    ("Janet sells 16 - 3 - 4 = 9 eggs a day. 9 * $2 = $18.\nThe answer is 18.", 18),
    ("He earns $1,000 in the first week and $276,000 in total.", 276000),
    ("Das Haus kostet 80.000 $ plus 50.000 $ Reparaturen, also 130.000 $. Gewinn: 70.000 US-Dollar.", 70000),
    ("Elle a donc 1 000 € au total.", 1000),
    ("Il lui reste 12\u202f500\u00a0€.", 12500),  # narrow no-break space between thousands
    ("Всего 3 250,5 рубля.", 3250.5),  # space thousands, decimal comma
    ("La respuesta es 2,5 litros.", 2.5),
    ("It costs $3.50 per kilogram, so 0.125 kg costs less than 1 dollar... final: 12.75 dollars.", 12.75),
    ("Der Preis ist 1.234.567,89 €.", 1234567.89),
    ("The total is 1,234,567.89 dollars.", 1234567.89),
    ("তাই জ্যানেট প্রতিদিন ১৮ ডলার আয় করে।", 18),  # Bengali digits
    ("ดังนั้นเจเน็ตได้เงิน ๑๘ ดอลลาร์ต่อวัน", 18),  # Thai digits
    ("उत्तर १,२०० रुपये है।", 1200),  # Devanagari digits with a thousands comma
    ("答えは１８ドルです。", 18),  # full-width digits
    ("她每天赚18美元。", 18),
    ("Kwa hiyo jibu ni 540 mita kwa wiki.", 540),
    ("సమాధానం 64 గాజులు.", 64),
    ("The room is 25 m² and costs 300 dollars.", 300),  # ² is not a digit
    ("The area is 25 m².", 25),
    ("The temperature fell to −5 °C.", -5),  # Unicode minus
    ("x = -3", -3),
    ("From 2019-2024 the club grew.", 2024),  # a hyphen after a digit is not a minus sign
    ("The answer is **42**.", 42),
    ("$\\boxed{7}$", 7),
    ("The discount is 15%.", 15),
    ("I cannot tell.", None),
]


@pytest.mark.parametrize("answer,expected", ANSWERS)
def test_extract_last_number(answer, expected):
    got = extract_last_number(answer)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_every_reference_answer_of_the_shared_data_reads_back():
    """MGSM's `response` and GSM8K's `final_answer` read as numbers equal to the plain-ASCII parse."""
    for folder in (shared_data("mgsm"), shared_data("gsm8k", "test")):
        for path in sorted(folder.glob("*.jsonl")):
            questions, dropped = read_questions(path)
            assert dropped == [] and len(questions) in (250, 1319), path
            for q in questions:
                assert re.fullmatch(r"-?[\d,]+(\.\d+)?", q["gold_text"].strip()), (path, q["gold_text"])
                assert q["gold"] == float(q["gold_text"].replace(",", "")), (path, q["gold_text"])


def test_language_identification_flags_wrong_language_answers():
    assert is_off_target("Janet verkauft 9 Eier pro Tag und verdient damit 18 Dollar.", "de") is False
    assert is_off_target("Janet sells 9 eggs a day, so she makes 18 dollars.", "de") is True
    assert is_off_target("ジャネットは毎日9個の卵を売り、18ドルを稼ぎます。", "ja") is False
    assert is_off_target("ジャネットは毎日9個の卵を売り、18ドルを稼ぎます。", "th") is True
    assert is_off_target("9 * 2 = 18", "de") is None  # nothing to identify
    assert detect_language("\\frac{16 - 3 - 4}{1} \\times 2 = 18")[0] is None  # LaTeX commands do not vote
    # the real questions of each MGSM language are identified as that language
    for lang in ("bn", "de", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"):
        questions, _ = read_questions(shared_data("mgsm", f"{lang}.jsonl"))
        hits = sum(detect_language(q["question"])[0] == lang for q in questions[:40])
        assert hits >= 39, (lang, hits)


def test_bad_question_rows_are_dropped_and_counted(tmp_path):
    path = tmp_path / "de.jsonl"
    path.write_text('{"query": "Wie viel ist 2 + 2?", "response": "4"}\n'
                    '{"query": "Ohne Antwort"}\n'
                    'kein json\n'
                    '{"instruction": "Wie viel ist 1.000 + 1?", "final_answer": "1,001"}\n')
    questions, dropped = read_questions(path)
    assert [(q["index"], q["gold"]) for q in questions] == [(1, 4.0), (4, 1001.0)]
    assert len(dropped) == 2 and dropped[0].startswith(f"{path}:2: no reference number")
    assert dropped[1].startswith(f"{path}:3: not JSON")


@pytest.mark.slow
def test_mgsm_end_to_end_on_the_demo_model_resumes(demo_dir, tmp_path, monkeypatch):
    from lidr.checkpoint import load
    from lidr.settings import Decoding

    model, tokenizer = load(demo_dir)
    data = shared_data("mgsm")
    langs, limit = ["en", "fr"], 2
    decoding = Decoding(max_new_tokens=12, repetition_penalty=1.0)
    seen = []
    real_completions = lidr.sampler.completions

    def recording_completions(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real_completions(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(lidr.sampler, "completions", recording_completions)
    out = tmp_path / "M0" / "mgsm"
    summary = mgsm.run(model, tokenizer, data, langs, out, decoding, 4, "You are a helpful assistant.", limit)

    # the paper's prompt, written out here, inside the demo model's ChatML format
    fr_question = json.loads(shared_data("mgsm", "fr.jsonl").read_text().splitlines()[0])["query"]
    by_hand = ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request in French. Please answer in French.\n\n### Instruction:\n" + fr_question +
               "\n\n### Response:\n")
    assert user_turn("alpaca", fr_question, "fr") == by_hand
    assert tokenizer.encode_chat([{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": by_hand}]) in seen
    assert len(seen) == len(langs) * limit

    for lang in langs:
        rows = [json.loads(line) for line in (out / f"{lang}.jsonl").read_text().splitlines()]
        assert sorted(r["index"] for r in rows) == [1, 2]
        for row in rows:
            assert (row["prediction"] is None) == (re.search(r"\d", row["answer"]) is None)
            assert row["correct"] == (row["prediction"] is not None and row["prediction"] == float(row["gold"]))
            assert row["off_target"] == (is_off_target(row["answer"], lang) is True)
        s = summary["languages"][lang]
        assert s["n"] == 2
        assert s["accuracy"] == sum(r["correct"] for r in rows) / 2
        assert s["off_target"] == sum(r["off_target"] for r in rows) / 2
    written = json.loads((out / "summary.json").read_text())
    assert written["languages"] == summary["languages"]

    # a rerun generates nothing and gives the same summary
    seen.clear()
    again = mgsm.run(model, tokenizer, data, langs, out, decoding, 4, "You are a helpful assistant.", limit)
    assert seen == [] and again["languages"] == summary["languages"]
    # a crash that lost the last row (and left half a line): only that question is generated again
    path = out / "fr.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:15])
    mgsm.run(model, tokenizer, data, langs, out, decoding, 4, "You are a helpful assistant.", limit)
    assert len(seen) == 1
    assert [json.loads(line) for line in path.read_text().splitlines()] == \
        [json.loads(line) for line in lines]


# -----------------------------------------------------------------------------
# the command: killed and resumed, another dataset refused, user errors


def write_questions(folder, lang, questions):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{lang}.jsonl").write_text("".join(json.dumps({"query": q, "response": str(a)}) + "\n"
                                                  for q, a in questions))


def tiny_data(folder):
    write_questions(folder, "en", [(f"Tom has {n} apples and buys {n + 2}. How many?", 2 * n + 2)
                                   for n in range(30)])
    write_questions(folder, "fr", [(f"Tom a {n} pommes et en achète {n + 1}. Combien ?", 2 * n + 1) for n in range(3)])
    return folder


@pytest.mark.slow
def test_mgsm_command_killed_and_resumed_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    data = tiny_data(tmp_path / "data")
    args = ["--model", str(tiny_dir), "--data", str(data), "--langs", "en", "fr", "--max-new-tokens", "16",
            "--batch-size", "1"]
    mgsm.main([*args, "--out", str(tmp_path / "whole")])
    cmd = [sys.executable, "-m", "eval.mgsm", *args, "--out", str(tmp_path / "resumed")]
    kill_at_progress(cmd, 3, 30)
    killed = tmp_path / "resumed" / "mgsm" / "en.jsonl.rank0.partial"  # rows are merged into en.jsonl at the end
    assert 3 <= len(killed.read_text().splitlines()) < 30
    with open(killed, "a") as f:  # killed mid-write: a torn last line
        f.write('{"index": 30, "lang": "e')
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    for name in ("en.jsonl", "fr.jsonl", "summary.json"):
        assert (tmp_path / "resumed" / "mgsm" / name).read_text() == (tmp_path / "whole" / "mgsm" / name).read_text()


@pytest.mark.slow
def test_mgsm_command_refuses_another_dataset_and_user_errors(tiny_dir, tmp_path, capsys):
    data, other = tiny_data(tmp_path / "data"), tiny_data(tmp_path / "other")
    write_questions(other, "en", [("What is 1 + 1?", 2)])
    out = tmp_path / "M0"
    argv = ["--model", str(tiny_dir), "--langs", "en", "--out", str(out), "--max-new-tokens", "4"]
    mgsm.main([*argv, "--data", str(data)])
    before = {p.name: p.read_bytes() for p in (out / "mgsm").iterdir()}
    with pytest.raises(SystemExit, match=r"en\.jsonl: was made from other inputs.*inputs\.data\.path: "
                                         r"'[^']*data/en\.jsonl' -> '[^']*other/en\.jsonl'"):
        mgsm.main([*argv, "--data", str(other)])
    with pytest.raises(SystemExit, match=r"settings\.sampling\.max_new_tokens: 4 -> 5"):
        mgsm.main([*argv, "--data", str(data), "--max-new-tokens", "5"])
    assert {p.name: p.read_bytes() for p in (out / "mgsm").iterdir()} == before
    for extra, message in [(["--langs", "en", "en"], "name en more than once"),
                           (["--langs", "xx"], "unknown language code 'xx'"),
                           (["--batch-size", "0"], "--batch-size: 0 is below its least value 1")]:
        with pytest.raises(SystemExit) as exit_info:
            mgsm.main([*argv, "--data", str(data), *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    (data / "de.jsonl").write_text('{"query": "Ohne Antwort"}\n')
    with pytest.raises(SystemExit, match=r"de\.jsonl: holds no usable question; first dropped: .*de\.jsonl:1: "
                                         r"no reference number"):
        mgsm.main([*argv[:2], "--langs", "de", *argv[4:], "--data", str(data)])
    with pytest.raises(SystemExit, match=r"no_model: no such model folder"):
        mgsm.main(["--model", str(tmp_path / "no_model"), *argv[2:], "--data", str(data)])
    assert not (out / "mgsm" / "de.jsonl").exists()
