"""A TRL user's data, flags and metrics (issue 29): TRL's formats tokenized as TRL's own DPOTrainer tokenizes them
(its _prepare_dataset: extract_prompt, the EOS it adds, its tokenize step) with the real Llama 3 tokenizer and
SmolLM2's; JSONL, Parquet and save_to_disk folders read alike; a held-out split that never shares a prompt; margins
exactly 0 where the policy is still the reference; flags refused before any work; TRL's metric names in the log."""

import json
import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers import pairs, train_args, write_jsonl

from lidr.cli.train import main
from lidr.settings import Training
from lidr.tokenizer import Tokenizer
from lidr.train import (build_model, evaluate, load_examples, reference_logps, setup_distributed, split_held_out,
                        train_step)

STANDARD = [  # TRL's standard format: explicit prompt, tokens that merge across the boundary, implicit prompt
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Lyon, I believe."},
    {"prompt": "Complete the word: hel", "chosen": "lo", "rejected": "p me"},
    {"chosen": "Q: what is 2 + 2? A: 4, since 2 + 2 = 4.", "rejected": "Q: what is 2 + 2? A: 5."},
]
USER, SYSTEM = {"role": "user", "content": "Say hello in French."}, {"role": "system", "content": "Be brief."}
CONVERSATIONAL = [  # explicit prompt with a system turn; implicit prompt over two turns; contents with spaces
    {"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "Bonjour."}],
     "rejected": [{"role": "assistant", "content": "  Hello.  "}]},
    {"chosen": [USER, {"role": "assistant", "content": "Bonjour."}, {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": "Salut !"}],
     "rejected": [USER, {"role": "assistant", "content": "Bonjour."}, {"role": "user", "content": "Again?"},
                  {"role": "assistant", "content": "No."}]},
]


def trl_tokens(folder, row: dict) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [chosen ids, rejected ids]) of one row by TRL's own DPOTrainer._prepare_dataset (its
    extract_prompt, EOS and tokenize steps) and transformers' tokenizer of the folder; the trainer is the least
    object the method reads."""
    trl = pytest.importorskip("trl", reason="TRL is the oracle: pip install 'lidr[dev]'")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    out = trl.DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), datasets.Dataset.from_list([row]),
                                          tokenizer, args, "train")[0]
    return out["prompt_ids"], [out["chosen_ids"], out["rejected_ids"]]


def lidr_tokens(folder, tmp_path, rows, plain_text="chat"):
    examples, counts = load_examples(write_jsonl(tmp_path / "rows.jsonl", rows), Tokenizer.from_folder(folder), "dpo",
                                     4096, plain_text=plain_text)
    assert counts["kept"] == len(rows), dict(counts)
    return [(ex.prompt, ex.responses) for ex in examples]


def test_trls_formats_are_tokenized_as_trl_tokenizes_them_llama3(tiny_dir, tmp_path):
    assert lidr_tokens(tiny_dir, tmp_path, STANDARD, "raw") == [trl_tokens(tiny_dir, row) for row in STANDARD]
    assert lidr_tokens(tiny_dir, tmp_path, CONVERSATIONAL) == [trl_tokens(tiny_dir, row) for row in CONVERSATIONAL]
    # message lists take the template whatever --plain-text says
    assert lidr_tokens(tiny_dir, tmp_path, CONVERSATIONAL, "raw") == lidr_tokens(tiny_dir, tmp_path, CONVERSATIONAL)


def test_trls_formats_are_tokenized_as_trl_tokenizes_them_smollm2(demo_dir, tmp_path):
    """ChatML: SmolLM2's template adds its default system turn and a newline after each <|im_end|> (so the
    conversational response ends with it, as in TRL); its tokenizer adds no BOS to raw text."""
    assert lidr_tokens(demo_dir, tmp_path, STANDARD, "raw") == [trl_tokens(demo_dir, row) for row in STANDARD]
    assert lidr_tokens(demo_dir, tmp_path, CONVERSATIONAL) == [trl_tokens(demo_dir, row) for row in CONVERSATIONAL]


def test_lidrs_own_rows_are_trls_one_turn_conversations_with_llama3(tiny_dir, tmp_path):
    """lidr's rows (texts, --plain-text chat, unchanged): the prompt is the user turn (after "system"), each
    response its tokens and <|eot_id|>: with Llama 3 and responses without surrounding spaces, TRL's tokens of
    the same conversation."""
    rows = [{"id": 7, "lang": "fr", "system": "Be brief.", "prompt": "Say hello in French.", "chosen": "Bonjour.",
             "rejected": "Hello."}, {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}]
    as_messages = [{"prompt": ([{"role": "system", "content": r["system"]}] if "system" in r else [])
                    + [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    assert lidr_tokens(tiny_dir, tmp_path, rows) == [trl_tokens(tiny_dir, row) for row in as_messages]
    examples, _ = load_examples(tmp_path / "rows.jsonl", Tokenizer.from_folder(tiny_dir), "dpo", 4096)
    assert [(ex.group, ex.lang) for ex in examples] == [("7", "fr"), ("prompt 'What is 2 + 2?'", None)]


def test_jsonl_parquet_and_save_to_disk_folders_give_the_same_rows(tiny_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    rows = CONVERSATIONAL[:1] * 2 + [dict(CONVERSATIONAL[0], chosen=CONVERSATIONAL[0]["rejected"])]  # the last: a tie
    tokenizer = Tokenizer.from_folder(tiny_dir)
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    pq.write_table(__import__("pyarrow").Table.from_pylist(rows), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    want, want_counts = load_examples(jsonl, tokenizer, "dpo", 256)
    assert dict(want_counts) == {"read": 3, "unreadable": 0, "chosen == rejected": 1, "kept": 2}
    for path in (tmp_path / "rows.parquet", tmp_path / "saved"):
        assert load_examples(path, tokenizer, "dpo", 256) == (want, want_counts), path
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"dict: a datasets DatasetDict \(splits: train\); pass one split's folder"):
        load_examples(tmp_path / "dict", tokenizer, "dpo", 256)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: a folder, but not one written by datasets' save_to_disk"):
        load_examples(tmp_path / "empty", tokenizer, "dpo", 256)


def test_parquet_without_pyarrow_is_refused_in_a_sentence(tiny_dir, tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(__import__("pyarrow").Table.from_pylist(pairs(2)), tmp_path / "rows.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow.parquet now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"rows.parquet: a Parquet file; reading it needs pyarrow: pip install pyarrow"):
        load_examples(tmp_path / "rows.parquet", Tokenizer.from_folder(tiny_dir), "dpo", 256)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant",
                                                                                         "content": "b"}]},
     "rows.jsonl:2: mixes texts and message lists; expected one of: lidr's rows"),
    ({"prompt": [USER], "chosen": [{"role": "bot", "content": "a"}], "rejected": [{"role": "assistant",
                                                                                     "content": "b"}]},
     "rows.jsonl:2: chosen message 1 is not {\"role\": system/user/assistant"),
    ({"system": "Be brief.", "prompt": [USER], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "rows.jsonl:2: a conversational row with a \"system\""),
])
def test_a_row_in_no_format_is_refused_naming_the_file_and_row(tiny_dir, tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [pairs(1)[0], row])
    with pytest.raises(ValueError, match=re.escape(message)):
        load_examples(path, Tokenizer.from_folder(tiny_dir), "dpo", 256)


def test_a_system_field_needs_the_chat_template(tiny_dir, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [dict(pairs(1)[0], system="Be brief.")])
    with pytest.raises(ValueError, match=r"raw.jsonl:1: a \"system\" field needs the chat template; --plain-text raw"):
        load_examples(raw, Tokenizer.from_folder(tiny_dir), "dpo", 256, plain_text="raw")


def test_held_out_rows_never_share_a_prompt_with_training_rows(tiny_dir, tmp_path):
    """Rows without an "id", three pairs per prompt: the prompt's text is the group, whatever the seed."""
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}, take {k}.", "rejected": f"No idea {k}."}
            for i in range(8) for k in range(3)]
    examples, _ = load_examples(write_jsonl(tmp_path / "rows.jsonl", rows), Tokenizer.from_folder(tiny_dir), "dpo",
                                256)
    for seed in range(10):
        train, held_out = split_held_out(examples, 0.25, seed)
        held_prompts = {tuple(examples[i].prompt) for i in held_out}
        assert len(held_prompts) == 2 and len(held_out) == 6, seed  # round(0.25 × 8) prompts, all their pairs
        assert not held_prompts & {tuple(examples[i].prompt) for i in train}, seed


def test_margins_are_exactly_zero_while_the_policy_is_the_reference(tiny_dir, tmp_path):
    """Every step of the first epoch, before any update, and the held-out scoring: the reference was scored in the
    batches the run packs, so the log-ratios are 0, not float noise, and no pair counts as a win (a tie is none)."""
    rows = [dict(r, chosen=r["chosen"] * (1 + i % 5)) for i, r in enumerate(pairs(40))]
    options = Training(batch_size=4, grad_accum=2, max_len=256, eval_split=0.2, seed=3)
    ranks = setup_distributed()
    try:
        tokenizer = Tokenizer.from_folder(tiny_dir)
        examples, _ = load_examples(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer, "dpo", 256)
        train, held_out = split_held_out(examples, options.eval_split, options.seed)
        model = build_model(tiny_dir, ranks.device, torch.bfloat16, False)  # bf16: the noise is larger
        table = reference_logps(model, examples, tokenizer.pad_id, options, ranks, held_out)
        scheduler = SimpleNamespace(get_last_lr=lambda: [0.0])
        for step in range(len(train) // 8):
            record = train_step(model, scheduler, [examples[i] for i in train], table[train], step, options,
                                tokenizer.pad_id, ranks)
            model.zero_grad(set_to_none=True)
            assert (record["margin"], record["reward_accuracy"], record["chosen_reward"]) == (0, 0, 0), step
            assert record["logps/chosen"] == record["ref_logps/chosen"] != 0, step
        scores = evaluate(model, [examples[i] for i in held_out], table[held_out], options, tokenizer.pad_id, ranks)
        assert (scores["eval/margin"], scores["eval/reward_accuracy"]) == (0, 0)
        assert scores["eval/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("flags, message", [
    (["--eval-every", "2"], "--eval-every: 2 scores the held-out pairs every so many steps, but none are held out: "
                            "give --eval-split or --eval-data"),
    (["--loss", "hinge", "--label-smoothing", "0.1"], "--label-smoothing: 0.1 is for the sigmoid (cDPO) and robust "
                                                      "losses; the hinge loss has none"),
    (["--loss", "ipo", "--length-normalize"], "--length-normalize: the ipo loss is per token already"),
])
def test_flags_that_do_not_go_together_are_refused_before_any_work(tmp_path, flags, message):
    """The model folder does not exist: the sentence comes before anything reads it."""
    with pytest.raises(SystemExit) as refused:
        main(train_args(tmp_path / "no-model", tmp_path / "no-data.jsonl", tmp_path / "run", *flags))
    assert str(refused.value.code) == message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cdpo_eval_data_and_trls_metrics_in_a_run(tiny_dir, tmp_path, capsys):
    """--label-smoothing with the sigmoid loss (cDPO) trains; --eval-data's pairs are held out and scored; the log
    has TRL's logps/chosen and logps/rejected, the reference's, and the fractional epoch; the console shows dpo."""
    from transformers import LlamaForCausalLM

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    held = write_jsonl(tmp_path / "held.jsonl", [dict(r, id=f"h{r['id']}") for r in pairs(20)[16:]])
    out = tmp_path / "run"
    main(train_args(tiny_dir, data, out, "--label-smoothing", "0.1", "--eval-data", str(held), "--eval-every", "2"))
    printed = capsys.readouterr()
    assert "4 pairs of 4 prompt ids held out (--eval-data " in printed.out
    assert "dpo=" in printed.err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["epoch"] for r in steps] == [0.25, 0.5, 0.75, 1.0]  # 16 pairs, global batch 4: 4 steps an epoch
    evals = [r for r in log if "eval/loss" in r]
    assert [(r["step"], r["eval/pairs"]) for r in evals] == [(0, 4), (2, 4), (4, 4)]
    assert evals[0]["eval/margin"] == 0 and evals[0]["eval/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    first = steps[0]
    assert first["margin"] == 0 and first["reward_accuracy"] == 0
    assert first["logps/chosen"] == first["ref_logps/chosen"] and first["logps/rejected"] == first["ref_logps/rejected"]
    # the step's log-probs are transformers' for the step's 4 pairs
    tokenizer = Tokenizer.from_folder(tiny_dir)
    examples, _ = load_examples(data, tokenizer, "dpo", max_len=96)
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    import lidr.train

    options = Training(lr=1e-3, max_len=96)
    sums = [0.0, 0.0]
    for i in lidr.train.step_indices(0, len(examples), options, 1):
        for k, response in enumerate(examples[i].responses):
            ids = torch.tensor([examples[i].prompt + response])
            with torch.no_grad():
                logps = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
            sums[k] += logps[-len(response):].gather(-1, ids[0, -len(response):, None]).sum().item() / 4
    assert [first["logps/chosen"], first["logps/rejected"]] == pytest.approx(sums, rel=1e-5)
    identity = json.loads((out / "run.json").read_text())
    assert identity["eval_data"]["path"] == str(held.resolve()) and identity["plain_text"] == "chat"
    assert json.loads((out / "data_report.json").read_text())["eval_data"]["kept"] == 4
