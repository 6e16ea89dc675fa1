"""The faithful defaults: prompt templates, the translation-request flag, the training schedule, the seed rule,
and the paper's MGSM recipe end to end on the shared GSM8K data."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, shared_data

import lidr.sampler
from lidr.harness.sampled import Engine, generate_file
from lidr.harness.stage_files import read_user_turns
from lidr.settings import PROMPT_TEMPLATES, Decoding, derived_seed, seeded, user_turn
from lidr.train import epoch_order, lr_factor

QUESTIONS = ["Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
             "A {curly} question: what is 2 + 2?"]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def test_the_alpaca_template_is_the_repositorys_prompt():
    by_hand = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request in German. Please answer in German.\n\n### Instruction:\nWie viel?\n\n### Response:\n")
    assert user_turn("alpaca", "Wie viel?", "de") == by_hand
    assert user_turn("plain", "Wie viel?") == "Wie viel?"
    assert user_turn("Q: {instruction}", "{language} stays") == "Q: {language} stays"  # the instruction is not filled
    with pytest.raises(ValueError, match="names {language}: say which language"):
        user_turn("alpaca", "Wie viel?")


def test_a_templated_prompt_gives_the_same_tokens_as_the_text_written_into_the_prompt_file(tiny_dir, tmp_path,
                                                                                          monkeypatch):
    seen = []
    real_completions = lidr.sampler.completions

    def recording_completions(model, tokenizer, prompts, decoding, *args, **kwargs):
        seen.append(prompts)
        return real_completions(model, tokenizer, prompts, decoding, *args, **kwargs)

    monkeypatch.setattr(lidr.sampler, "completions", recording_completions)
    engine = Engine(tiny_dir, batch_size=2)
    decoding = Decoding(max_new_tokens=4, repetition_penalty=1.1)
    plain = write_jsonl(tmp_path / "plain.jsonl",
                        [{"id": i, "instruction": user_turn("alpaca", q, "fr")} for i, q in enumerate(QUESTIONS)])
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"id": i, "instruction": q} for i, q in enumerate(QUESTIONS)])
    written = generate_file(engine, plain, tmp_path / "plain_out.jsonl", decoding)
    templated = generate_file(engine, raw, tmp_path / "templated_out.jsonl",
                              Decoding(max_new_tokens=4, repetition_penalty=1.1, prompt_template="alpaca"),
                              lang="fr")
    assert seen[0] == seen[1] and len(seen[0]) == 2
    assert [r["response"] for r in written] == [r["response"] for r in templated]
    # the template is recorded with the rows, and the pairs rebuild exactly the user turn that was asked
    assert [(r["response_meta"]["prompt_template"], r["response_meta"]["lang"]) for r in templated] == [
        (PROMPT_TEMPLATES["alpaca"], "fr")] * 2
    turns = read_user_turns(tmp_path / "templated_out.jsonl", "fr")
    assert turns == {str(i): user_turn("alpaca", q, "fr") for i, q in enumerate(QUESTIONS)}
    assert read_user_turns(tmp_path / "plain_out.jsonl", "fr") == {str(i): user_turn("alpaca", q, "fr")
                                                                   for i, q in enumerate(QUESTIONS)}


def test_generate_refuses_a_template_that_needs_a_language_without_one(capsys):
    from lidr.cli import generate as cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "M", "--prompts", "P", "--out", "O", "--prompt-template", "alpaca"])
    assert "names {language}: say which language" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "M", "--prompts", "P", "--out", "O", "--prompt-template", "{question}"])
    assert "neither a name (plain, alpaca) nor a text with {instruction}" in capsys.readouterr().err


def test_iterate_refuses_to_start_without_saying_which_prompts_are_translation_requests(capsys):
    import lidr.cli.iterate as iterate

    argv = ["--model", "M", "--work", "W", "--prompts", "P", "--langs", "fr"]
    with pytest.raises(SystemExit):
        iterate.parse_args(argv)
    assert "one of the arguments --translation-task-ids --no-translation-tasks is required" in capsys.readouterr().err
    args, _ = iterate.parse_args([*argv, "--no-translation-tasks"])
    assert args.translation_task_ids is None
    args, _ = iterate.parse_args([*argv, "--translation-task-ids", "ids.jsonl"])
    assert args.translation_task_ids == "ids.jsonl"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_schedule_is_hugging_faces(schedule):
    """Without warmup (LLaMA-Factory's default) lr_factor is transformers' schedule step for step; after a
    warmup too (lidr's warmup starts one step higher: its first step trains)."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_linear_schedule_with_warmup if schedule == "linear" else get_cosine_schedule_with_warmup
    for total, warmup in ((10, 0), (37, 4)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        hf = make(optimizer, warmup, total)
        expected = []
        for _ in range(total):
            expected.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            hf.step()
        ours = [lr_factor(step, total, warmup, schedule) for step in range(total)]
        assert ours[warmup:] == pytest.approx(expected[warmup:], abs=1e-12)
        assert ours[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])


def test_the_trainer_uses_the_optimizer_and_schedule_settings(tiny_dir, tmp_path, monkeypatch):
    """AdamW gets Training's betas and ε, and each step's learning rate is lr × lr_factor of its schedule."""
    import lidr.cli.train
    import lidr.train

    made = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            made.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(lidr.train.torch.optim, "AdamW", RecordingAdamW)
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i + 1}."} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    lidr.cli.train.main(["--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--batch-size", "2",
                         "--lr", "1e-3", "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-eps", "1e-6",
                         "--lr-scheduler", "cosine", "--warmup-ratio", "0.25", "--max-len", "64"])
    assert made[0]["betas"] == (0.8, 0.95) and made[0]["eps"] == 1e-6
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in log] == pytest.approx([1e-3 * lr_factor(s, 4, 1, "cosine") for s in range(4)])


def test_the_seed_rule():
    assert derived_seed(0, 1) == derived_seed(0, 1) != derived_seed(1, 0)  # seed + key would give these alike
    assert derived_seed(0, 3) != derived_seed(0, "3")
    assert 0 <= derived_seed(2**40, "x", "fr") < 2**63
    assert seeded(5, "alpagasus-7").random() == seeded(5, "alpagasus-7").random()
    assert epoch_order(50, 0, 1) == torch.randperm(50, generator=torch.Generator().manual_seed(
        derived_seed(0, 1))).tolist() != epoch_order(50, 0, 0)


@pytest.mark.slow
def test_the_mgsm_recipe_end_to_end_on_shared_gsm8k(demo_dir, tmp_path):
    """The README's MGSM recipe on a handful of GSM8K prompts with SmolLM2-135M: GSM8K prompts in the
    repository's template -> one LIDR iteration -> eval.mgsm on MGSM. The English training set is the
    user's to supply; the shared GSM8K test set's first rows stand in for it here."""
    prompts = tmp_path / "gsm8k-prompts"
    n = 3
    for lang in ("en", "de"):  # the ids without their language prefix ("degsm8k_test_0" -> "gsm8k_test_0")
        rows = [json.loads(line) for line in shared_data("gsm8k", "test", f"{lang}.jsonl").read_text().splitlines()[:n]]
        write_jsonl(prompts / f"{lang}.jsonl",
                    [{**row, "id": row["id"].removeprefix(lang)} for row in rows])
    work = tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "iterate.py"), "--model", str(demo_dir), "--work", str(work),
           "--prompts", str(prompts), "--langs", "de", "--prompt-template", "alpaca", "--no-translation-tasks",
           "--max-new-tokens", "24", "--translate-max-new-tokens", "48", "--translate-repetition-penalty", "1.1",
           "--pairs-failed-translation", "drop-one", "--batch-size", "3",
           "--", "--batch-size", "1", "--max-len", "384", "--lr", "1e-5"]  # one pair fills a global batch
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "departures from the reference's rules" in done.stdout
    iteration = work / "iter1"
    english = [json.loads(line) for line in (iteration / "generate" / "en.jsonl").read_text().splitlines()]
    assert all(row["response_meta"]["prompt_template"] == PROMPT_TEMPLATES["alpaca"] for row in english)
    asked = {lang: {row["id"]: row["instruction"] for row in map(json.loads, (prompts / f"{lang}.jsonl").open())}
             for lang in ("en", "de")}
    pairs = [json.loads(line) for line in (iteration / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["prompt"] == user_turn("alpaca", asked[p["lang"]][p["id"]], p["lang"]) for p in pairs)
    trained = next(path for path in (iteration / "train" / "model", demo_dir) if (path / "config.json").exists())

    evaluated = subprocess.run([sys.executable, "-m", "eval.mgsm", "--model", str(trained), "--out",
                                str(tmp_path / "eval"), "--data", str(shared_data("mgsm")), "--langs", "en", "de",
                                "--limit", "2", "--max-new-tokens", "24"],
                               cwd=ROOT, env=env, capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "mgsm" / "summary.json").read_text())
    assert {lang: s["n"] for lang, s in summary["languages"].items()} == {"en": 2, "de": 2}
    made_from = json.loads((tmp_path / "eval" / "mgsm" / "de.jsonl.made-from.json").read_text())
    assert json.dumps(PROMPT_TEMPLATES["alpaca"])[1:-1] in json.dumps(made_from)  # recorded in the output's identity


def test_parallel_files_sample_with_draws_of_their_own_language(tiny_dir, tmp_path):
    """Line i of en.jsonl and of fr.jsonl is the same problem: at a temperature above 0 the two answers are sampled
    from generators seeded by (seed, language, line), so they are independent draws, each what the sampler gives
    that row alone with that seed."""
    from lidr.generation import prompt_ids
    from lidr.sampler import generate

    engine = Engine(tiny_dir, batch_size=4)
    decoding = Decoding(max_new_tokens=12, repetition_penalty=1.0, temperature=1.0, seed=3)
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "instruction": q} for i, q in enumerate(QUESTIONS)])
    model, tokenizer = engine.load()
    answers = {}
    for lang in ("en", "fr"):
        rows = generate_file(engine, prompts, tmp_path / f"{lang}.jsonl", decoding, lang=lang)
        answers[lang] = [r["response"] for r in rows]
        for line, q in enumerate(QUESTIONS[:3], 1):  # the row alone, seeded by the rule (lines count from 1)
            ids = prompt_ids(tokenizer, q, decoding, lang)
            alone = generate(model, tokenizer, [ids], decoding, seeds=[derived_seed(3, lang, line)])[0]
            assert answers[lang][line - 1] == alone.text
    assert sum(a != b for a, b in zip(answers["en"], answers["fr"])) >= len(QUESTIONS) - 1  # the same prompts
