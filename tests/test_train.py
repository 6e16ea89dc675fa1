"""The trainer end to end on a tiny random Llama (CPU, fp32, gloo): sharding, resume, export, SFT, bad rows.

References: a 1-process run (for 2 processes and for a killed-and-resumed run), transformers'
LlamaForCausalLM (for the exported folder and for the first step's NLL), ln 2 (the first DPO loss).
"""

import json
import math
import sys

import pytest
import torch
from helpers import STEPS, assert_same_weights, pairs, run_subprocess, train_args, weights, write_jsonl
from safetensors.torch import load_file

import lidr.cli.train
import lidr.harness.training
import lidr.train
from lidr.checkpoint import load
from lidr.cli.train import main
from lidr.tokenizer import Tokenizer
from lidr.train import load_examples


# -----------------------------------------------------------------------------
# data


def test_bad_rows_are_dropped_and_counted(tiny_dir, tmp_path):
    good = pairs(3)
    long_answer = {"prompt": "Say a lot.", "chosen": "word " * 200, "rejected": "no"}
    long_prompt = {"prompt": "Read this: " + "blah " * 200 + "Now answer: yes or no?", "chosen": "Yes.", "rejected": "No."}
    rows = [*good, "{not json", {"prompt": "p", "chosen": "c"}, {"prompt": "p", "chosen": "  ", "rejected": "r"},
            {"prompt": "p", "chosen": "same", "rejected": "same "}, {"prompt": 3, "chosen": "c", "rejected": "r"},
            long_answer, long_prompt, ["a list"]]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    tokenizer = Tokenizer.from_folder(tiny_dir)
    examples, counts = load_examples(path, tokenizer, "dpo", max_len=64)
    assert dict(counts) == {"read": 11, "unreadable": 2, "missing or empty field": 3, "chosen == rejected": 1,
                            "too long": 1, "prompt truncated": 1, "kept": 4}
    eot = tokenizer.tok.token_to_id("<|eot_id|>")
    assert [e.line for e in examples] == [1, 2, 3, 10]
    assert all(r[-1] == eot for e in examples for r in e.responses)
    truncated = examples[-1]
    assert len(truncated.prompt) + max(map(len, truncated.responses)) == 64
    # the prompt keeps its end: the question's last words and the assistant header
    assert tokenizer.decode(truncated.prompt).endswith("Now answer: yes or no?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


# -----------------------------------------------------------------------------
# DPO runs


@pytest.mark.slow
def test_first_step_is_ln2_and_the_nll_of_transformers(one_process, tiny_dir, data):
    """Step 1: policy = reference, so the DPO loss is ln 2; the NLL term equals transformers' value."""
    from transformers import LlamaForCausalLM

    log = [json.loads(line) for line in (one_process / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert log[0]["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[0]["margin"] == 0 and log[0]["reward_accuracy"] == 0
    assert log[-1]["reward_accuracy"] > 0.5 and log[-1]["dpo"] < log[0]["dpo"]  # it learns the pairs
    # the NLL of step 1: the mean over the step's 4 chosen responses of their mean token NLL
    tokenizer = Tokenizer.from_folder(tiny_dir)
    examples, _ = load_examples(data, tokenizer, "dpo", max_len=96)
    flags = train_args(tiny_dir, data, "unused", "--batch-size", "2", "--grad-accum", "2")
    options = lidr.cli.train.options_from(lidr.cli.train.parse_args(flags))
    step0 = lidr.train.step_indices(0, len(examples), options, 1)  # one rank: both micro-batches
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    nlls = []
    for i in step0:
        ex = examples[i]
        ids = torch.tensor([ex.prompt + ex.responses[0]])
        with torch.no_grad():
            logps = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        n = len(ex.responses[0])
        nlls.append(-logps[-n:].gather(-1, targets[-n:, None]).mean().item())
    assert log[0]["nll"] == pytest.approx(sum(nlls) / len(nlls), abs=1e-5)
    assert (one_process / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one(one_process, tiny_dir, data, tmp_path):
    out = tmp_path / "two"
    proc = run_subprocess([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_dpo.py", *train_args(tiny_dir, data, out, "--batch-size", "2")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s) on cpu, float32 compute, packed rows attending through a dense mask; global batch 4 = 2 × 1 " \
           "accumulation × 2" in proc.stdout
    assert "22 rows read, 20 kept (dropped: 1 unreadable, 1 chosen == rejected; 0 prompts truncated)" in proc.stdout
    assert_same_weights(weights(out), weights(one_process), atol=1e-5)


KILL_AFTER_THIRD_STEP = """
import os, runpy, signal, sys
import torch
step = torch.optim.AdamW.step
calls = []
def step_then_die(self, *args, **kwargs):
    result = step(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 3:  # step 3 done, its checkpoint (every 2 steps) not yet written
        os.kill(os.getpid(), signal.SIGKILL)
    return result
torch.optim.AdamW.step = step_then_die
sys.argv = ["train_dpo.py", *sys.argv[1:]]
runpy.run_path("train_dpo.py", run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_weights(one_process, tiny_dir, data, tmp_path):
    out = tmp_path / "killed"
    args = train_args(tiny_dir, data, out, "--batch-size", "2", "--grad-accum", "2", "--save-every", "2")
    killed = run_subprocess([sys.executable, "-c", KILL_AFTER_THIRD_STEP, *args])
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert torch.load(out / "checkpoint" / "trainer.pt")["step"] == 2
    assert not (out / "model").exists()
    rerun = run_subprocess([sys.executable, "train_dpo.py", *args])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint'} at step 2" in rerun.stdout
    log = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, STEPS + 1))  # step 3's line from the killed run was dropped
    assert_same_weights(weights(out), weights(one_process), atol=1e-6)
    again = run_subprocess([sys.executable, "train_dpo.py", *args])  # the export marks the run finished
    assert again.returncode == 0 and "this run finished earlier, nothing to do" in again.stdout
    assert len((out / "log.jsonl").read_text().splitlines()) == STEPS


KILL_AFTER_CALL = """
import os, runpy, signal, sys
{target}
real, calls = getattr(target, {name!r}), []
def call_then_die(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(args)
    if {kill_when}:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(target, {name!r}, call_then_die)
sys.argv = ["train_dpo.py", *sys.argv[1:]]
runpy.run_path("train_dpo.py", run_name="__main__")
"""

# where the run is killed (the function patched, after which call), the checkpoint step a rerun
# resumes from, the folders in OUT after the kill; checkpoints are saved at steps 2 and 4
KILL_POINTS = {
    # step 4's sharded state written into checkpoint.tmp, its trainer.pt and renames not yet done
    "checkpoint save: after the sharded state": (
        dict(target="import torch.distributed.checkpoint as target", name="save", kill_when="len(calls) == 2"),
        2, {"checkpoint", "checkpoint.tmp"}),
    # step 4's save between its two renames: checkpoint -> checkpoint.old done, checkpoint.tmp -> checkpoint not
    "checkpoint save: between the renames": (
        dict(target="from pathlib import Path as target", name="rename", kill_when="args[0].name == 'checkpoint'"),
        2, {"checkpoint.old", "checkpoint.tmp"}),
    # the export's weights written into OUT/model.tmp<pid>, its config.json and rename not yet done
    "export: after the weights": (
        dict(target="import lidr.checkpoint as target", name="save_file", kill_when="len(calls) == 1"),
        4, {"checkpoint", "model.tmp"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_during_a_save_then_rerun_gives_the_uninterrupted_weights(point, one_process, tiny_dir, data, tmp_path):
    where, resume_step, folders = KILL_POINTS[point]
    out = tmp_path / "killed"
    args = train_args(tiny_dir, data, out, "--batch-size", "2", "--grad-accum", "2", "--save-every", "2")
    killed = run_subprocess([sys.executable, "-c", KILL_AFTER_CALL.format(**where), *args])
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert {p.name.rstrip("0123456789") for p in out.iterdir() if p.is_dir()} == folders  # killed where meant
    previous = lidr.harness.training.latest_checkpoint(out)  # the checkpoint before the kill, whole
    assert torch.load(previous / "trainer.pt")["step"] == resume_step
    rerun = run_subprocess([sys.executable, "train_dpo.py", *args])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {previous} at step {resume_step}" in rerun.stdout
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == list(range(1, STEPS + 1))
    assert_same_weights(weights(out), weights(one_process), atol=1e-6)
    assert not list(out.glob("model.tmp*"))
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()


@pytest.mark.slow  # a whole training run
def test_exported_folder_loads_in_lidr_and_transformers_with_identical_logits(one_process, tiny_dir):
    from transformers import LlamaForCausalLM

    trained, initial = weights(one_process), load_file(tiny_dir / "model.safetensors")
    assert max((trained[k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # it did train
    model, tokenizer = load(one_process / "model", dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(one_process / "model", dtype=torch.float32).eval()
    tokens = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": "What is 2 plus 2?"}])])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, data, tmp_path, monkeypatch):
    real_loss, calls = lidr.train.preference_loss, []

    def nan_at_step_3(*args, **kwargs):
        losses, chosen, rejected = real_loss(*args, **kwargs)
        calls.append(1)
        return (losses * math.nan if len(calls) == 3 else losses), chosen, rejected

    monkeypatch.setattr(lidr.train, "preference_loss", nan_at_step_3)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="step 3: loss nan .* not finite"):
        main(train_args(tiny_dir, data, out, "--batch-size", "4", "--save-every", "2"))
    assert torch.load(out / "checkpoint" / "trainer.pt")["step"] == 2
    assert not (out / "checkpoint.tmp").exists() and not (out / "model").exists()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


# -----------------------------------------------------------------------------
# SFT (SDRRL)


@pytest.mark.slow  # a whole training run
def test_sft_objective_trains_on_responses(tiny_dir, tmp_path):
    from transformers import LlamaForCausalLM

    rows = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs(4)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows * 2)  # 8 rows: 2 steps of 4
    out = tmp_path / "sft"
    main(train_args(tiny_dir, path, out, "--objective", "sft", "--batch-size", "4"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert not (out / "reference_logps.pt").exists()
    assert set(log[0]) >= {"loss", "nll"} and "dpo" not in log[0]
    assert log[0]["loss"] == pytest.approx(log[0]["nll"])
    assert log[-1]["nll"] < log[0]["nll"]
    # step 1 holds 4 rows; 2 copies of 4 rows shuffled: compare with the mean over the rows it drew
    tokenizer = Tokenizer.from_folder(tiny_dir)
    examples, _ = load_examples(path, tokenizer, "sft", max_len=96)
    flags = train_args(tiny_dir, path, out, "--objective", "sft", "--batch-size", "4")
    options = lidr.cli.train.options_from(lidr.cli.train.parse_args(flags))
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    nlls = []
    for i in lidr.train.step_indices(0, len(examples), options, 1):
        ex = examples[i]
        ids = torch.tensor([ex.prompt + ex.responses[0]])
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(hf(ids).logits[0, len(ex.prompt) - 1 : -1], ids[0, len(ex.prompt) :])
        nlls.append(loss.item())
    assert log[0]["nll"] == pytest.approx(sum(nlls) / 4, abs=1e-5)
