"""translate.py: the paper's prompt in each chat format, failures marked and counted, resumable."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, kill_at_progress
from tokenizers import Tokenizer as HFTokenizer

import translate
from lidr.sampler import Completion
from lidr.tokenizer import Tokenizer
from lidr.translation import fields, prompt_ids

PAPER_PROMPT = (
    "Please translate the following sentences into French. The input sentences are wrapped by <sentence> and "
    "</sentence>:\n\n<sentence>\nThe cat sleeps.\n</sentence>\n\nThe translated result should be wrapped by "
    "<translated> and </translated>."
)


def test_prompt_tokens_in_llama3_format(tiny_dir):
    ids = prompt_ids(Tokenizer.from_folder(tiny_dir), "The cat sleeps.", "fr")
    by_hand = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{PAPER_PROMPT}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n<translated>\n")
    assert ids == HFTokenizer.from_file(str(tiny_dir / "tokenizer.json")).encode(by_hand, add_special_tokens=False).ids


def test_prompt_tokens_in_chatml_format(demo_dir):
    tokenizer = Tokenizer.from_folder(demo_dir)
    ids = prompt_ids(tokenizer, "The cat sleeps.", "fr")
    by_hand = (f"<|im_start|>system\n{tokenizer.default_system}<|im_end|>\n<|im_start|>user\n{PAPER_PROMPT}<|im_end|>\n"
               "<|im_start|>assistant\n<translated>\n")
    assert tokenizer.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert ids == HFTokenizer.from_file(str(demo_dir / "tokenizer.json")).encode(by_hand, add_special_tokens=False).ids


def test_reply_fields():
    closed = Completion(tokens=[1, 2], text="Le chat dort.\n", finish_reason="stop_string")
    assert fields(closed, "translation") == {"translation": "Le chat dort.", "translation_error": None,
                              "translation_reply": "Le chat dort.\n"}
    cut = Completion(tokens=[1, 2], text="Le chat dort et", finish_reason="length")
    assert fields(cut, "translation") == {"translation": None, "translation_error": "no </translated> before the reply ended",
                           "translation_reply": "Le chat dort et"}
    ended = Completion(tokens=[1], text="  ", finish_reason="stop_string")
    assert fields(ended, "translation") == {"translation": None, "translation_error": "empty translation", "translation_reply": "  "}


def test_the_failure_count_names_only_failures(tiny_dir, tmp_path, capsys, monkeypatch):
    """One reply of two closes (made so here: random weights never close): one failure, counted by its reason
    alone (the closed one is no reason; the line once said "{'no </translated> ...': 1, None: 1}")."""
    from lidr import translation

    parse, calls = translation.parse_translation, []

    def first_closes(reply):
        calls.append(reply)
        return ("x", None) if len(calls) == 1 else parse(reply)

    monkeypatch.setattr(translation, "parse_translation", first_closes)
    source = tmp_path / "en.jsonl"
    source.write_text("".join(json.dumps({"id": i, "response": "The cat sleeps."}) + "\n" for i in "ab"))
    translate.main(["--model", str(tiny_dir), "--in", str(source), "--to", "fr", "--out", str(tmp_path / "fr.jsonl"),
                    "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in (tmp_path / "fr.jsonl").read_text().splitlines()]
    assert [r["translation_error"] for r in rows] == [None, "no </translated> before the reply ended"]
    assert "fr.jsonl: 1 failed translations ({'no </translated> before the reply ended': 1})" in capsys.readouterr().out


def test_unclosed_replies_are_marked_failed_and_a_rerun_adds_nothing(tiny_dir, tmp_path, capsys):
    source = tmp_path / "en.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "response": "The cat sleeps."}, {"id": "b", "response": ""}, {"id": "c", "response": "Hello."},
    ]))
    out = tmp_path / "en-fr.jsonl"
    argv = ["--model", str(tiny_dir), "--in", str(source), "--to", "fr", "--out", str(out), "--max-new-tokens", "6"]
    translate.main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # random weights never write </translated>: every reply ends at the token limit and is a failure
    assert [(r["id"], r["translation"], r["translation_error"]) for r in rows] == [
        ("a", None, "no </translated> before the reply ended"), ("c", None, "no </translated> before the reply ended")]
    assert {r["translation_meta"]["finish_reason"] for r in rows} == {"length"}
    assert rows[0]["translation_meta"]["to"] == "fr"
    printed = capsys.readouterr()
    assert "2 failed translations" in printed.out and "en.jsonl:2: skipped: empty 'response'" in printed.err
    before = out.read_text()
    translate.main(argv)
    assert out.read_text() == before
    assert "0 generated now, 2 already there" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    source = tmp_path / "en.jsonl"
    source.write_text("".join(json.dumps({"id": i, "response": f"Answer number {i}: the cat sleeps."}) + "\n"
                              for i in range(30)))
    args = ["--model", str(tiny_dir), "--in", str(source), "--to", "de", "--max-new-tokens", "12",
            "--batch-size", "1"]
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    translate.main([*args, "--out", str(whole)])
    cmd = [sys.executable, str(ROOT / "translate.py"), *args, "--out", str(resumed)]
    kill_at_progress(cmd, 3, 30)
    partial = tmp_path / "resumed.jsonl.rank0.partial"
    assert 3 <= len(partial.read_text().splitlines()) < 30 and not resumed.exists()
    with open(partial, "a") as f:  # killed mid-write: a torn last line
        f.write('{"id": 29, "respo')
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert resumed.read_text() == whole.read_text()
    assert [json.loads(line)["id"] for line in resumed.read_text().splitlines()] == list(range(30))


def test_a_field_no_row_has_and_another_target_are_refused(tiny_dir, tmp_path):
    source = tmp_path / "en.jsonl"
    source.write_text(json.dumps({"id": 1, "response": "Hello."}) + "\n")
    out = tmp_path / "en-fr.jsonl"
    argv = ["--model", str(tiny_dir), "--in", str(source), "--to", "fr", "--out", str(out), "--max-new-tokens", "4"]
    with pytest.raises(SystemExit, match=r"en\.jsonl: none of its 1 row\(s\) is usable; the first, line 1: "
                                         r"no string field 'answer'"):
        translate.main([*argv, "--field", "answer"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["en.jsonl"]
    translate.main(argv)
    before = out.read_bytes()
    with pytest.raises(SystemExit, match=r"en-fr\.jsonl: was made from other inputs or other settings "
                                         r"\(settings\.to: 'fr' -> 'de'\)"):
        translate.main([*argv[:5], "de", *argv[6:]])
    assert out.read_bytes() == before
