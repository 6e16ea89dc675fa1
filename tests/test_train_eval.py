"""Held-out pairs (--eval-split, --eval-every), their tracking, and the training step's single host sync.

References: ln 2 and a zero margin before training (policy = reference), transformers' LlamaForCausalLM
scoring the exported model and M_t on the held-out pairs after training, TensorBoard's own reader.
"""

import inspect
import json
import math
import sys

import pytest
import torch
import torch.distributed as dist
from helpers import pairs, run_subprocess, tensorboard_scalars, train_args, write_jsonl

import lidr.train
from lidr.cli.train import main
from lidr.settings import Training
from lidr.tokenizer import Tokenizer
from lidr.train import (build_model, fused_adamw, load_examples, reference_logps, setup_distributed, split_held_out,
                        train_step)

LANGS = ("en", "es")
N_IDS = 15  # 12 ids with a pair per language, 3 with an English pair only: 27 pairs
# 4 of the 15 ids held out (7 pairs: an odd number, so with 2 ranks of 1 pair per micro-batch one rank scores an
# uncounted pair in the last batch), 20 pairs trained on in 5 steps of 4
EVAL_ARGS = ("--eval-split", "0.25", "--eval-every", "2")


def multilingual_pairs(n_ids: int) -> list[dict]:
    """Pairs as lidr.pairs writes them: one per prompt id and language (ids from 12 on: English only)."""
    return [{"id": f"q{i}", "lang": lang, "prompt": f"[{lang}] Question {i}: what is {i} plus {i * 3}?",
             "chosen": f"{i} plus {i * 3} is {i * 4}." + " Done." * (i % 3),
             "rejected": f"It is {i * 4 + 1}, I believe." if lang == "en" else f"Es {i * 4 + 1}."}
            for i in range(n_ids) for lang in (LANGS if i < 12 else LANGS[:1])]


@pytest.fixture(scope="module")
def held_out_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", multilingual_pairs(N_IDS))


@pytest.fixture(scope="module")
def held_out_run(tiny_dir, held_out_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    main(train_args(tiny_dir, held_out_data, out, "--batch-size", "2", "--grad-accum", "2", *EVAL_ARGS,
                    "--report-to", "tensorboard"))
    return held_out_data, out


def log_records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_held_out_ids_keep_every_pair_on_one_side(tiny_dir, tmp_path):
    rows = multilingual_pairs(12) + [{"prompt": "no id", "chosen": "a", "rejected": "b"}] * 2
    examples, _ = load_examples(write_jsonl(tmp_path / "pairs.jsonl", rows), Tokenizer.from_folder(tiny_dir), "dpo",
                                max_len=96)
    train, held_out = split_held_out(examples, 0.25, seed=0)
    assert sorted(train + held_out) == list(range(len(examples)))
    held_out_ids = {examples[i].group for i in held_out}
    assert len(held_out_ids) == round(0.25 * (12 + 1))  # the rows without an id: a group per prompt text
    assert not held_out_ids & {examples[i].group for i in train}
    for group in held_out_ids - {"prompt 'no id'"}:  # both languages of a held-out prompt are held out
        assert sorted(examples[i].lang for i in held_out if examples[i].group == group) == sorted(LANGS)
    assert split_held_out(examples, 0.25, seed=0) == (train, held_out)  # seeded
    assert {examples[i].group for i in split_held_out(examples, 0.25, seed=1)[1]} != held_out_ids
    assert split_held_out(examples, 0.0, seed=0) == (list(range(len(examples))), [])
    assert len(split_held_out(examples, 0.01, seed=0)[1]) >= 1  # a fraction asked for holds out one id at least


@pytest.mark.slow
def test_held_out_scores_before_training_are_ln2_and_zero(held_out_run):
    _, out = held_out_run
    records = log_records(out)
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]  # before training, every 2 steps, the end
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    first = evals[0]
    assert first["eval/pairs"] == 7 and first["eval/en/pairs"] == 4 and first["eval/es/pairs"] == 3
    for name in ("eval", "eval/en", "eval/es"):
        assert first[f"{name}/dpo"] == pytest.approx(math.log(2), abs=1e-6)
        assert first[f"{name}/margin"] == pytest.approx(0, abs=1e-5)
    assert first["eval/loss"] == pytest.approx(first["eval/dpo"] + first["eval/nll"])  # α = 1
    assert evals[-1]["eval/dpo"] < first["eval/dpo"] and evals[-1]["eval/margin"] > 0  # it generalises a little
    assert json.loads((out / "run.json").read_text())["eval_split"] == 0.25


@pytest.mark.slow
def test_held_out_scores_at_the_end_are_the_exported_models_with_transformers(held_out_run, tiny_dir):
    """The last evaluation equals sigmoid DPO + NLL of the exported model against M_t, both run by transformers."""
    from transformers import LlamaForCausalLM

    data, out = held_out_run
    examples, _ = load_examples(data, Tokenizer.from_folder(tiny_dir), "dpo", max_len=96)
    _, held_out = split_held_out(examples, 0.25, seed=0)
    policy = LlamaForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    reference = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()

    def logp(model, prompt, response):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        return logps[-len(response):].gather(-1, ids[0, -len(response):, None]).sum().item()

    per_lang = {lang: [] for lang in LANGS}
    for i in held_out:
        ex = examples[i]
        chosen_ratio, rejected_ratio = (logp(policy, ex.prompt, y) - logp(reference, ex.prompt, y) for y in ex.responses)
        margin = 0.1 * (chosen_ratio - rejected_ratio)  # β 0.1
        per_lang[ex.lang].append({"dpo": math.log1p(math.exp(-margin)), "margin": margin, "reward_accuracy": margin > 0,
                                  "nll": -logp(policy, ex.prompt, ex.responses[0]) / len(ex.responses[0])})
    last = [r for r in log_records(out) if "eval/loss" in r][-1]
    for name, rows in [("eval", per_lang["en"] + per_lang["es"]), ("eval/en", per_lang["en"]),
                       ("eval/es", per_lang["es"])]:
        for key in ("dpo", "margin", "reward_accuracy", "nll"):
            assert last[f"{name}/{key}"] == pytest.approx(sum(r[key] for r in rows) / len(rows), abs=2e-5), (name, key)


@pytest.mark.slow
def test_every_logged_number_is_in_tensorboard(held_out_run):
    _, out = held_out_run
    scalars = tensorboard_scalars(out / "tensorboard")
    records = log_records(out)
    expected = {(k, r["step"]): v for r in records for k, v in r.items() if k != "step"}
    assert {k for k, _ in expected} == set(scalars)
    assert {"eval/es/margin", "eval/en/reward_accuracy", "loss", "grad_norm"} <= set(scalars)
    for tag, events in scalars.items():
        assert [step for step, _ in events] == sorted(s for k, s in expected if k == tag)
        for step, value in events:
            assert value == pytest.approx(expected[tag, step], rel=1e-6, abs=1e-6), (tag, step)  # stored as float32
    assert (out / "curves.png").stat().st_size > 0


def test_a_training_step_reads_the_device_once(tiny_dir, tmp_path, monkeypatch):
    """Three accumulated micro-batches: their losses and metrics stay on the device, then one all_reduce and
    one read (tolist) for the whole step; no item(), float() or bool() of a tensor in between."""
    ranks = setup_distributed()
    try:
        options = Training(batch_size=2, grad_accum=3, max_len=96, lr=1e-3)
        tokenizer = Tokenizer.from_folder(tiny_dir)
        examples, _ = load_examples(write_jsonl(tmp_path / "pairs.jsonl", pairs(6)), tokenizer, "dpo",
                                    max_len=96)
        model = build_model(tiny_dir, ranks.device, torch.float32, False)
        reference = reference_logps(model, examples, tokenizer.pad_id, options, ranks)
        optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        order = lidr.train.epoch_order(len(examples), options.seed, 0)  # drawn on the host (a CPU generator)
        monkeypatch.setattr(lidr.train, "epoch_order", lambda n, seed, epoch: order)
        reads = []
        for method in ("item", "tolist", "__float__", "__bool__", "__int__"):
            real = getattr(torch.Tensor, method)
            monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _real=real, _name=method, **k: (
                reads.append(_name), _real(self, *a, **k))[1])
        record = train_step(model, scheduler, examples, reference, 0, options, tokenizer.pad_id, ranks)
        monkeypatch.undo()
        assert reads == ["tolist"]
        # step 0, policy = reference: the mean DPO loss is ln 2 and the mean loss is ln 2 + the mean NLL
        assert record["dpo"] == pytest.approx(math.log(2), abs=1e-6) and record["margin"] == pytest.approx(0, abs=1e-6)
        assert record["loss"] == pytest.approx(record["dpo"] + record["nll"], rel=1e-6)
        real_tokens = sum(len(ex.prompt) + len(r) for ex in examples for r in ex.responses)
        assert record["tokens"] == real_tokens and record["grad_norm"] > 0 and math.isfinite(record["grad_norm"])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_score_the_held_out_pairs_as_one(held_out_run, tiny_dir, tmp_path):
    """Each rank scores a slice and the sums are all-reduced: 7 pairs over 2 ranks, 1 per micro-batch, leave one
    rank an uncounted stand-in in the last batch. The numbers equal the one-process run's (same global batches)."""
    data, one = held_out_run
    out = tmp_path / "two"
    proc = run_subprocess([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_dpo.py", *train_args(tiny_dir, data, out, "--batch-size", "1", "--grad-accum", "2",
                                                       *EVAL_ARGS)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "7 pairs of 4 prompt ids held out (--eval-split 0.25)" in proc.stdout
    two_evals = [r for r in log_records(out) if "eval/loss" in r]
    one_evals = [r for r in log_records(one) if "eval/loss" in r]
    assert [r.keys() for r in two_evals] == [r.keys() for r in one_evals]
    for got, want in zip(two_evals, one_evals):
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-5), (got["step"], key)


def test_fused_adamw_is_for_cuda_and_updates_the_sharded_weights_as_the_default(tiny_dir):
    """fused=True only on CUDA (and where AdamW takes it); on the trainer's FSDP2 (DTensor) shards the fused
    kernel (torch's CPU one here, the CUDA one on a GPU) gives the default (foreach) update."""
    assert fused_adamw(torch.device("cpu")) is None
    assert "fused" in inspect.signature(torch.optim.AdamW).parameters  # torch >= 2.0, so 2.11 on the GPUs too
    assert fused_adamw(torch.device("cuda", 0)) is True
    ranks = setup_distributed()
    try:
        models = [build_model(tiny_dir, ranks.device, torch.float32, False) for _ in range(2)]
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
                      for m, fused in zip(models, (None, True))]
        initial = [p.full_tensor().clone() for p in models[1].parameters()]
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=generator) for p in models[0].parameters()]
            for model, optimizer in zip(models, optimizers):
                for p, g in zip(model.parameters(), grads):
                    p.grad = torch.distributed.tensor.distribute_tensor(g, p.device_mesh, p.placements)
                optimizer.step()
        for default, fused in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(fused.full_tensor(), default.full_tensor(), rtol=1e-6, atol=1e-7)
        assert all((p.full_tensor() - q).abs().max() > 1e-4 for p, q in zip(models[1].parameters(), initial))  # moved
    finally:
        dist.destroy_process_group()
