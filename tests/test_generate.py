"""generate.py: rows and fields against transformers' greedy output, bad input, resume after SIGKILL, torchrun."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import kill_at_progress, write_jsonl

from lidr.checkpoint import load
from lidr.settings import SYSTEM_PROMPT
from lidr.tokenizer import chat_messages

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

QUESTIONS = ["Hi", "What is 2+2?", "Name a color.", "Tell me a story about a dragon.", "Why is the sky blue?",
             "Count to five.", "Say hello in French.", "What is the capital of Spain?"]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load(tiny_dir)


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def hf_reply(hf_model, tokenizer, text, max_new_tokens, repetition_penalty=1.1):
    """transformers' greedy reply to one user turn after the paper's system turn, decoded as generate.py writes it."""
    prompt = tokenizer.encode_chat(chat_messages(text, SYSTEM_PROMPT))
    out = hf_model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
        max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
        eos_token_id=sorted(tokenizer.stop_ids), pad_token_id=0,
    )[0, len(prompt):].tolist()
    out = next((out[:i] for i, t in enumerate(out) if t in tokenizer.stop_ids), out)
    return tokenizer.decode(out)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_prompt_mode_prints_the_reply(tiny_dir, tiny, tiny_hf, capsys):
    _, tokenizer = tiny
    cli.main(["--model", str(tiny_dir), "--prompt", "Tom has 26 apples.", "--max-new-tokens", "10"])
    assert capsys.readouterr().out == hf_reply(tiny_hf, tokenizer, "Tom has 26 apples.", 10) + "\n"


def test_stop_string_cuts_the_reply(tiny_dir, tiny, tiny_hf, capsys):
    _, tokenizer = tiny
    reply = hf_reply(tiny_hf, tokenizer, "Tom has 26 apples.", 10)
    stop = reply[len(reply) // 2 :][:3]  # a piece of the reply's second half
    assert stop.strip()
    cli.main(["--model", str(tiny_dir), "--prompt", "Tom has 26 apples.", "--max-new-tokens", "10", "--stop", stop])
    assert capsys.readouterr().out == reply[: reply.index(stop)] + "\n"
    with pytest.raises(SystemExit):
        cli.main(["--model", str(tiny_dir), "--prompt", "Hi", "--stop", ""])
    assert "--stop needs a non-empty string" in capsys.readouterr().err


def test_rows_fields_order_and_bad_rows(tmp_path, tiny_dir, tiny, tiny_hf, capsys):
    _, tokenizer = tiny
    lines = [
        {"id": "a", "instruction": QUESTIONS[0], "extra": 1},
        "{not json",
        {"id": "b", "instruction": QUESTIONS[1]},
        {"id": "c", "prompt": "no instruction field"},
        {"id": "d", "instruction": "   "},
        ["a", "list"],
        {"id": "e", "instruction": QUESTIONS[3]},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    cli.main(["--model", str(tiny_dir), "--prompts", str(src), "--out", str(out), "--max-new-tokens", "8", "--batch-size", "2"])
    captured = capsys.readouterr()
    for line, reason in [(2, "not JSON"), (4, "no string field 'instruction'"), (5, "empty 'instruction'"), (6, "not a JSON object")]:
        assert f"in.jsonl:{line}: skipped: {reason}" in captured.err
    assert "3 rows (3 generated now, 0 already there), 4 bad input rows skipped" in captured.out
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["a", "b", "e"]  # input order
    assert rows[0]["extra"] == 1 and "input_line" not in rows[0]
    for row in rows:
        assert row["response"] == hf_reply(tiny_hf, tokenizer, row["instruction"], 8)
        meta = row["response_meta"]
        assert meta["max_new_tokens"] == 8 and meta["temperature"] == 0.0 and meta["repetition_penalty"] == 1.1
        assert meta["finish_reason"] in ("length", "stop_token") and meta["new_tokens"] <= 8
    # rerunning the finished command does nothing; other settings are refused
    cli.main(["--model", str(tiny_dir), "--prompts", str(src), "--out", str(out), "--max-new-tokens", "8"])
    assert "3 rows (0 generated now, 3 already there)" in capsys.readouterr().out
    assert read_jsonl(out) == rows
    with pytest.raises(SystemExit, match="other settings.*temperature: 0.0 -> 0.7"):
        cli.main(["--model", str(tiny_dir), "--prompts", str(src), "--out", str(out), "--max-new-tokens", "8", "--temperature", "0.7"])


def test_gold_response_field_is_refused_and_rows_without_id_are_keyed_by_line(tmp_path, tiny_dir):
    src = tmp_path / "mgsm.json"  # a JSON list, MGSM-like: `query` and a gold `response`
    src.write_text(json.dumps([{"query": q, "response": str(i)} for i, q in enumerate(QUESTIONS[:3])]))
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit, match=r"mgsm.json:1: the row already has a 'response' field.*--out-field"):
        cli.main(["--model", str(tiny_dir), "--prompts", str(src), "--field", "query", "--out", str(out)])
    assert not out.exists()
    cli.main(["--model", str(tiny_dir), "--prompts", str(src), "--field", "query", "--out-field", "answer",
              "--out", str(out), "--max-new-tokens", "4"])
    rows = read_jsonl(out)
    assert [(r["input_line"], r["response"]) for r in rows] == [(1, "0"), (2, "1"), (3, "2")]
    assert all(isinstance(r["answer"], str) and r["answer_meta"]["new_tokens"] >= 1 for r in rows)


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, tiny_dir):
    rows = [{"id": f"q{i}", "instruction": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"} for i in range(12)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--model", str(tiny_dir), "--prompts", str(src), "--max-new-tokens", "16", "--batch-size", "1"]
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    cli.main([*args, "--out", str(whole)])

    cmd = [sys.executable, str(ROOT / "generate.py"), *args, "--out", str(resumed)]
    kill_at_progress(cmd, 3, 12)
    partial = tmp_path / "resumed.jsonl.rank0.partial"
    written = partial.read_text().splitlines()
    assert 3 <= len(written) < 12 and not resumed.exists()  # killed mid-run
    with open(partial, "a") as f:  # and as if mid-write: a torn last line
        f.write('{"id": "q11", "instruction": "torn')
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert resumed.read_text() == whole.read_text()
    assert [r["id"] for r in read_jsonl(resumed)] == [r["id"] for r in rows]  # each id once, in input order
    assert not partial.exists()


@pytest.mark.slow
def test_torchrun_two_ranks_merge_in_input_order(tmp_path, tiny_dir):
    rows = [{"query": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"} for i in range(7)]  # no ids: keyed by line
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--model", str(tiny_dir), "--prompts", str(src), "--field", "query", "--max-new-tokens", "6", "--batch-size", "2"]
    single, double = tmp_path / "single.jsonl", tmp_path / "double.jsonl"
    cli.main([*args, "--out", str(single)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "generate.py"), *args, "--out", str(double)], cwd=ROOT, env=env, check=True, capture_output=True)
    assert double.read_text() == single.read_text()
    assert [r["input_line"] for r in read_jsonl(double)] == list(range(1, 8))
    assert not list(tmp_path.glob("*.partial"))


# -----------------------------------------------------------------------------
# outputs bound to their inputs, files it did not write, user errors, over-length input


def generate_args(tiny_dir, src, out, *extra):
    return ["--model", str(tiny_dir), "--prompts", str(src), "--out", str(out), "--max-new-tokens", "4", *extra]


@pytest.mark.slow
def test_another_input_for_the_same_out_is_refused_before_anything_changes(tmp_path, tiny_dir, capsys, monkeypatch):
    en = write_jsonl(tmp_path / "en.jsonl", [{"id": "a", "instruction": "Hi"}, {"id": "b", "instruction": "Bye"}])
    fr = write_jsonl(tmp_path / "fr.jsonl", [{"id": "a", "instruction": "Salut"}, {"id": "b", "instruction": "Adieu"}])
    out = tmp_path / "out.jsonl"
    cli.main(generate_args(tiny_dir, en, out))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit, match=r"out\.jsonl: was made from other inputs.*inputs\.prompts\.path: "
                                         r"'[^']*en\.jsonl' -> '[^']*fr\.jsonl'"):
        cli.main(generate_args(tiny_dir, fr, out))
    en.write_text(en.read_text().replace("Bye", "Goodbye"))  # the same file, edited
    with pytest.raises(SystemExit, match=r"inputs\.prompts\.sha256"):
        cli.main(generate_args(tiny_dir, en, out))
    en.write_bytes(before["en.jsonl"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # the same files named relatively from elsewhere: the same run, nothing to do
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    cli.main(generate_args(Path(os.path.relpath(tiny_dir, tmp_path)), "en.jsonl", "out.jsonl"))
    assert "2 rows (0 generated now, 2 already there)" in capsys.readouterr().out
    assert out.read_bytes() == before["out.jsonl"]


@pytest.mark.slow
def test_files_it_did_not_write_are_refused_and_a_last_row_without_newline_is_kept(tmp_path, tiny_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "instruction": q} for i, q in enumerate(QUESTIONS[:3])])
    listed = tmp_path / "listed.jsonl"
    listed.write_text(json.dumps([{"id": 0, "response": "mine"}]))  # a JSON list file
    for out in (listed, src):
        before = out.read_bytes()
        with pytest.raises(SystemExit, match=rf"{out.name}: exists and was not written by lidr\.cli\.generate"):
            cli.main(generate_args(tiny_dir, src, out))
        assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "listed.jsonl"]
    out = tmp_path / "out.jsonl"
    cli.main(generate_args(tiny_dir, src, out))
    whole = out.read_bytes()
    out.write_bytes(whole.rstrip(b"\n"))  # the last row's newline is lost
    capsys.readouterr()
    cli.main(generate_args(tiny_dir, src, out))
    assert "3 rows (0 generated now, 3 already there)" in capsys.readouterr().out
    assert [json.loads(line) for line in out.read_text().splitlines()] == [json.loads(line) for line in
                                                                          whole.decode().splitlines()]


def test_user_errors_are_sentences_and_nothing_is_recorded(tmp_path, tiny_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "instruction": "Hi"}, {"id": 2, "instruction": "Bye"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit, match=r"in\.jsonl: none of its 2 row\(s\) is usable; the first, line 1: "
                                         r"no string field 'question' \(fields: id, instruction\)"):
        cli.main(generate_args(tiny_dir, src, out, "--field", "question"))
    with pytest.raises(SystemExit, match=r"nope\.jsonl: no such file"):
        cli.main(generate_args(tiny_dir, tmp_path / "nope.jsonl", out))
    with pytest.raises(SystemExit, match=r"no_model: no such model folder"):
        cli.main(generate_args(tmp_path / "no_model", src, out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # validated before anything was recorded
    for argv, message in [(["--prompt", "  \n"], "--prompt is empty"),
                          (["--prompt", "Hi", "--batch-size", "0"], "--batch-size: 0 is below its least value 1"),
                          (["--prompt", "Hi", "--max-new-tokens", "0"],
                           "--max-new-tokens: 0 is below its least value 1")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--model", str(tiny_dir), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    cli.main(generate_args(tiny_dir, src, out))  # the corrected command runs
    assert [r["id"] for r in read_jsonl(out)] == [1, 2]


@pytest.mark.slow
def test_over_length_prompts_are_skipped_and_replies_end_at_the_context(tmp_path, tiny_dir, tiny, tiny_hf, capsys):
    model, tokenizer = tiny
    context = model.cfg.max_seq_len  # 256
    long_prompt = "apple " * context
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "short", "instruction": "Hi"},
                                              {"id": "long", "instruction": long_prompt}])
    out = tmp_path / "out.jsonl"
    cli.main(generate_args(tiny_dir, src, out, "--max-new-tokens", "1000", "--repetition-penalty", "1.0"))
    captured = capsys.readouterr()
    long_tokens = len(tokenizer.encode_chat(chat_messages(long_prompt, SYSTEM_PROMPT)))
    assert f"in.jsonl:2: skipped: the prompt is {long_tokens} tokens, the model's context {context}" in captured.err
    assert "1 bad input rows skipped (1 longer than the model's context of 256 tokens)" in captured.out
    short_tokens = len(tokenizer.encode_chat(chat_messages("Hi", SYSTEM_PROMPT)))
    assert "--max-new-tokens 1000 reaches past the model's context of 256 tokens" in captured.err
    [row] = read_jsonl(out)
    room = context - short_tokens
    assert row["response"] == hf_reply(tiny_hf, tokenizer, "Hi", room, repetition_penalty=1.0)
    assert row["response_meta"]["new_tokens"] <= room and row["response_meta"]["max_new_tokens"] == 1000


@pytest.mark.slow
def test_torchrun_two_ranks_killed_mid_run_resume_to_the_one_process_result(tmp_path, tiny_dir):
    rows = [{"id": i, "instruction": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"} for i in range(24)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--model", str(tiny_dir), "--prompts", str(src), "--max-new-tokens", "24", "--batch-size", "1"]
    single, double = tmp_path / "single.jsonl", tmp_path / "double.jsonl"
    cli.main([*args, "--out", str(single)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "generate.py"), *args, "--out", str(double)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    partials = [tmp_path / f"double.jsonl.rank{r}.partial" for r in (0, 1)]

    def lines_written():
        return [len(p.read_bytes().splitlines()) if p.exists() else 0 for p in partials]

    deadline = time.time() + 300
    while min(lines_written()) < 2:  # both ranks are writing
        assert proc.poll() is None and time.time() < deadline, "torchrun ended before it was killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sum(lines_written()) < len(rows) and not double.exists()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    assert double.read_text() == single.read_text()
    assert not any(p.exists() for p in partials)


def test_a_truncated_weight_file_is_named_before_anything_is_recorded(tmp_path, tiny_dir, capsys):
    import shutil

    model = shutil.copytree(tiny_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # a copy that stopped half way
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "instruction": "Hi"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit, match=r"model\.safetensors: not a readable safetensors file"):
        cli.main(generate_args(model, src, out))
    assert not out.exists() and not (tmp_path / "out.jsonl.made-from.json").exists()
    weights.write_bytes(whole)  # copied again, whole: the corrected command runs
    cli.main(generate_args(model, src, out))
    assert [r["id"] for r in read_jsonl(out)] == [1]
