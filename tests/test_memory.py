"""The memory plan (lidr/harness/memory.py): the estimate against the peak measured in a CPU training step,
and `train_dpo.py --plan` for Llama-3-8B's real config.json (no weights) on 1 and on 8 GPUs of 80 GB."""

import json
import math
import shutil

import pytest
import torch
import torch.distributed as dist
from helpers import LLAMA3_TEMPLATE, llama3_tokenizer_json
from torch.profiler import ProfilerActivity, profile

import lidr.cli.train
import lidr.train
from lidr.harness.memory import GB, largest_micro_batch, parameter_counts, training_peak
from lidr.model import LlamaConfig
from lidr.settings import TRAINING
from lidr.train import Example, build_model, pack, step_losses

# Meta-Llama-3-8B-Instruct's config.json as published
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128009, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0", "use_cache": True, "vocab_size": 128256,
}
LLAMA3_8B_PARAMETERS = 8_030_261_248  # Meta's model card: 8.03B


def test_parameter_count_of_llama3_8b():
    assert parameter_counts(LlamaConfig.from_hf(LLAMA3_8B)) == (LLAMA3_8B_PARAMETERS, 218_112_000,
                                                                LLAMA3_8B_PARAMETERS - 32 * 218_112_000)


# -----------------------------------------------------------------------------
# the estimate against a measurement


def allocations(prof) -> list:
    """The profiler's CPU allocation and free events, in time order."""
    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = [e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
              if e.tag == torch._C._profiler._EventType.Allocation]
    return sorted(events, key=lambda e: e.start_time_ns)


def measured_peak(folder, examples: list[Example], activation_checkpointing: bool) -> int:
    """Bytes of tensor memory at the peak of a training step (forward, backward, AdamW; fp32, CPU)
    after the first: what is alive before it (the sharded weights and AdamW's state), plus the most
    that torch's CPU allocator held beyond that during the step (the profiler's record of every
    allocation and free)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = build_model(folder, torch.device("cpu"), torch.float32, activation_checkpointing)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        reference = torch.zeros(len(examples), 2)

        def step():
            losses, _, _ = step_losses(model, examples, reference, TRAINING, 0, torch.device("cpu"))
            losses.sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # AdamW's state exists from the first step on
        state = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
        alive = sum(t.numel() * t.element_size() for t in [*model.parameters(), *state])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        held, peak = 0, 0
        for event in allocations(prof):
            held += event.extra_fields.alloc_size  # negative for a free
            peak = max(peak, held)
        return alive + peak
    finally:
        dist.destroy_process_group()


SMALL = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
WIDER = {**SMALL, "hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8, "num_hidden_layers": 3}


@pytest.mark.slow
@pytest.mark.parametrize("hf, checkpointing", [(SMALL, False), (WIDER, True)], ids=["small", "wider-checkpointing"])
def test_estimate_errs_on_the_large_side_by_less_than_40_percent(hf, checkpointing, tmp_path, monkeypatch):
    """fp32 on one rank (b = 4, N = 1): the estimate 1 to 1.4 times the measured peak, for a micro-batch
    of 4 pairs of 300-token sequences packed as the trainer packs them on GPU (2 rows of 1,800)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(HFConfig(**hf)).save_pretrained(tmp_path)
    monkeypatch.setattr(lidr.train, "dense_mask_default", lambda device: False)  # sequence by sequence, as on CUDA
    generator = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(10, hf["vocab_size"], (n,), generator=generator).tolist()

    examples = [Example(i, tokens(50), [tokens(250), tokens(250)]) for i in range(4)]
    measured = measured_peak(tmp_path, examples, checkpointing)
    cfg = LlamaConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert largest_micro_batch(examples, 4, TRAINING.max_len) == (3600, 2, 1800)
    assert pack(examples, 0, TRAINING.max_len, "cpu").tokens.shape == (2, 1800)  # the trainer's packing
    estimate = sum(training_peak(cfg, 1, 4, 3600, checkpointing).values())
    assert 1.0 <= estimate / measured <= 1.4, (estimate / GB, measured / GB)


# -----------------------------------------------------------------------------
# --plan for Llama-3-8B


@pytest.fixture(scope="module")
def llama3_8b_config_only(tmp_path_factory):
    """config.json and the tokenizer of Llama-3-8B-Instruct, and no weights."""
    folder = tmp_path_factory.mktemp("llama3-8b")
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    shutil.copy(llama3_tokenizer_json(), folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return folder


@pytest.fixture(scope="module")
def long_pairs(tmp_path_factory):
    """Pairs of about 1,000-token sequences, as LIDR's answers (up to 2,400 tokens) and their translations make."""
    rows = [{"prompt": f"Question {i}: explain photosynthesis in detail.",
             "chosen": " ".join(f"Step {k} of the light reactions moves electron {i}." for k in range(90)),
             "rejected": " ".join(f"Step {k} of the Calvin cycle fixes carbon {i}." for k in range(90))}
            for i in range(16)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_plan(folder, data, flags, capsys) -> tuple[int, str, dict]:
    """(exit status, the verdict, {part: (GB without checkpointing, GB with)}) of `train_dpo.py --plan`."""
    try:
        lidr.cli.train.main(["--model", str(folder), "--data", str(data), "--plan", *flags])
        status, verdict = 0, None
    except SystemExit as e:
        status, verdict = 1, e.code
    lines = capsys.readouterr().out.splitlines()
    verdict = verdict or lines[-1]
    table = {line[2:30].strip(): tuple(map(float, line[30:].split()[:2]))
             for line in lines[2:] if line.startswith("  ")}
    return status, verdict, table


def gpus_to_fit(table: dict, gpus: int, column: int) -> int:
    """The fewest GPUs on which the plan's total fits in 72 GB, from its table for `gpus`: the sharded
    16 bytes per parameter shrink with more GPUs, the rest does not."""
    sharded = 16 * LLAMA3_8B_PARAMETERS / 1e9
    rest = table["total"][column] - sharded / gpus
    return math.ceil(sharded / (72 - rest))


def test_plan_for_llama3_8b_on_1_and_on_8_gpus(llama3_8b_config_only, long_pairs, capsys):
    """No weights: config.json, the tokenizer and the data. The static parts are closed forms of
    8,030,261,248 parameters (16 bytes each, sharded); 1 GPU does not fit, 8 do, with checkpointing."""
    folder, P = llama3_8b_config_only, LLAMA3_8B_PARAMETERS
    status, verdict, table = run_plan(folder, long_pairs, ["--gpus", "1", "--gpu-memory", "80"], capsys)
    assert status == 1
    assert table["sharded weights (fp32)"] == (round(4 * P / 1e9, 2),) * 2
    assert table["AdamW state (fp32)"] == (round(8 * P / 1e9, 2),) * 2
    assert verdict.startswith("does not fit: ") and "activation checkpointing on (on because it is needed)" in verdict
    assert verdict.endswith(f"it would fit with {gpus_to_fit(table, 1, 1)} GPUs"), verdict
    status, verdict, table = run_plan(folder, long_pairs, ["--gpus", "8", "--gpu-memory", "80"], capsys)
    assert status == 0
    assert table["sharded weights (fp32)"] == (round(4 * P / 8 / 1e9, 2),) * 2
    assert table["AdamW state (fp32)"] == (round(8 * P / 8 / 1e9, 2),) * 2
    without, with_ac = table["total"]
    assert without > 72 > with_ac  # 90% of 80 GB is usable
    assert verdict == f"fits: {with_ac:.1f} GB per GPU with activation checkpointing on (on because it is needed)"
    status, verdict, table = run_plan(folder, long_pairs, ["--gpus", "8", "--gpu-memory", "80",
                                                           "--no-activation-checkpointing"], capsys)
    assert status == 1 and verdict.endswith(
        "it would fit with --activation-checkpointing or --batch-size 3 (and --grad-accum to keep the global batch) "
        f"or {gpus_to_fit(table, 8, 0)} GPUs"), verdict


def test_on_cuda_unset_activation_checkpointing_turns_on_where_the_plan_needs_it(llama3_8b_config_only, long_pairs,
                                                                                  monkeypatch):
    """8 ranks of Llama-3-8B on 80 GB GPUs need it (82 GB without), on H200s (141 GB) they do not; a value
    the user set is kept. The GPU's memory is what torch.cuda reports (here stood in for: no GPU in CI)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from lidr.tokenizer import Tokenizer
    from lidr.harness.training import checkpointing_where_needed
    from lidr.train import load_examples

    examples, _ = load_examples(long_pairs, Tokenizer.from_folder(llama3_8b_config_only), "dpo", TRAINING.max_len)
    options = replace(TRAINING, dtype="bfloat16")
    tokens = largest_micro_batch(examples, options.batch_size, options.max_len)[0]
    without = sum(training_peak(LlamaConfig.from_hf(LLAMA3_8B), 8, 2, tokens, False).values()) / GB  # the --plan's
    for memory_gb, needed in ((80, True), (141, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: SimpleNamespace(total_memory=memory_gb * GB))
        decided, why = checkpointing_where_needed(llama3_8b_config_only, examples, options, 8, torch.device("cuda", 0))
        assert decided.activation_checkpointing is needed
        assert (why is not None) is needed
        if why:
            assert why.startswith(f"activation checkpointing on: without it the plan estimates {without:.1f} GB")
        kept, why = checkpointing_where_needed(llama3_8b_config_only, examples,
                                               replace(options, activation_checkpointing=not needed), 8, "cuda")
        assert kept.activation_checkpointing is not needed and why is None
    decided, _ = checkpointing_where_needed(llama3_8b_config_only, examples, options, 8, torch.device("cpu"))
    assert decided.activation_checkpointing is False
