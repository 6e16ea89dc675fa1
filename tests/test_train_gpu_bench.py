"""bench/gpu.py where it can run without a GPU: its refusal, its CPU dry run of every section (no verdict), its
workers and their time limits (a whole process group stopped), the same decoding settings on both sides of a
decode comparison, the trainer's settings in its training rows, its SKU table, its byte counts, and its tiny
train_dpo.py run (here on CPU, gloo). No test depends on how long anything takes."""

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import ROOT

from lidr.checkpoint import load
from lidr.kernels.hardware import datasheet_peak
from lidr.settings import ANSWERS, TRAINING

# the bench script, loaded from its file (bench/ is not a package, and sys.path stays as it is)
spec = importlib.util.spec_from_file_location("gpu", ROOT / "bench" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
sys.modules["gpu"] = gpu  # its dataclasses look their module up by name
spec.loader.exec_module(gpu)


def run_bench(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def markdown_rows(stdout: str) -> list[list[str]]:
    """The cells of the final markdown table's rows (header and rule left out)."""
    lines = stdout[stdout.index("| section | what | value | status |"):].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines if line.startswith("| ")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: bench/gpu.py would run")
@pytest.mark.slow  # a subprocess that imports torch
def test_without_cuda_it_says_so_and_exits_2():
    proc = run_bench("--quick", timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU and this machine has none" in proc.stderr


@pytest.mark.slow
def test_cpu_dry_run_runs_every_section_and_records_every_path(tmp_path):
    """`--cpu-dry-run --quick`: every section passes or says why a row is skipped; the table, the JSON
    and the byte counts agree, every path of every table has its row, and no verdict against a goal is given."""
    proc = run_bench("--cpu-dry-run", "--quick", "--json", str(tmp_path / "gpu.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not re.search(r"\bgoal\b|\bmet\b", proc.stdout, re.IGNORECASE), [
        line for line in proc.stdout.splitlines() if re.search(r"\bgoal\b|\bmet\b", line, re.IGNORECASE)]
    rows = markdown_rows(proc.stdout)
    assert all(len(r) == 4 for r in rows), [r for r in rows if len(r) != 4]
    for section in gpu.SECTIONS:
        assert [section, "section time"] in [r[:2] for r in rows], f"no {section} section in the table"
    statuses = {r[3] for r in rows}
    assert statuses <= {"", "ok", "SKIP"}, rows
    assert all(r[2] for r in rows if r[3] == "SKIP")  # a skipped row says why

    record = json.loads((tmp_path / "gpu.json").read_text())
    assert {name: s["status"] for name, s in record["sections"].items()} == {name: "ok" for name in gpu.SECTIONS}
    assert [[r["section"], r["what"], r["value"], r["status"]] for r in record["rows"]] == rows
    assert not any(r["what"].startswith("goal") for r in record["rows"])
    assert (tmp_path / "gpu.md").read_text() in proc.stdout  # the table, also beside the JSON
    whats = [r["what"] for r in record["rows"]]
    for name in [*gpu.DECODE_PATHS, *gpu.TRANSFORMERS_PATHS]:
        assert f"batch 1, full generate(): {name}" in whats
    for table in (gpu.train_attention_paths, gpu.decode_attention_paths, gpu.prefill_attention_paths):
        for name in table(gpu.CPU_DRY_RUN_QUICK):
            assert any(w.endswith(name) or w.endswith(name + " (not in lidr)") for w in whats), name
    for name in gpu.DECODE_PATHS:
        assert f"decode path {name}: prefill + 6 steps, bf16 vs fp32" in whats
    for name, packing in gpu.TRAIN_PACKINGS.items():
        if packing.flex:  # no flex backward on CPU: one row says so
            assert f"training path {name}" in whats
        else:
            assert f"training path {name}: gradients (worst tensor), bf16 vs fp32 dense" in whats
        assert any(w.startswith(f"DPO step, {name}, activation checkpointing") for w in whats), name

    # the decode rows: both sides given the same decoding settings, LIDR's answers', and every row ran them all
    setup = gpu.CPU_DRY_RUN_QUICK
    n = setup.decode_new_tokens
    decode_rows = [r for r in record["rows"] if r["section"] == "decode" and "tokens_per_s" in r]
    assert len(decode_rows) == len(gpu.DECODE_PATHS) + len(gpu.TRANSFORMERS_PATHS)
    assert sorted(r["side"] for r in decode_rows) == ["lidr"] * len(gpu.DECODE_PATHS) + [
        "transformers"] * len(gpu.TRANSFORMERS_PATHS)
    settings = [r["decoding"] for r in decode_rows]
    assert all(s == settings[0] for s in settings), settings
    assert settings[0] == {"greedy": True, "repetition_penalty": ANSWERS.repetition_penalty, "max_new_tokens": n,
                           "stop_token_ids": [gpu.TINY.vocab_size - 1], "stop_strings": [], "rows": 1,
                           "prompt_tokens": [setup.prompt_len]}
    assert ANSWERS.repetition_penalty != 1  # the penalty is on, on both sides
    assert all(r["tokens_generated"] == n for r in decode_rows)

    # bytes per decode step: TINY's weights without the embedding table (closed form), + the KV of the filled positions
    layer = 128 * 128 * 2 + 128 * 64 * 2 + 128 * 256 * 3 + 2 * 128  # q, o; k, v; gate, up, down; two norms
    weights = 2 * (2 * layer + 128 + 1024 * 128)  # bf16: 2 layers, the final norm, lm_head
    kv_per_position = 2 * 2 * 2 * 32 * 2  # layers x (k, v) x kv heads x head_dim x bf16
    filled = setup.prompt_len + 1 + (setup.steps - 1) / 2  # mean over the N - 1 decode steps
    copy = next(r["copy_bytes_per_s"] for r in record["rows"] if "copy_bytes_per_s" in r)
    for r in decode_rows:
        assert r["bytes_per_step"] == weights + kv_per_position * filled
        assert r["tokens_per_s"] == pytest.approx(1 / r["step_s"])
        assert r["bytes_per_s"] == pytest.approx(r["bytes_per_step"] / r["step_s"])
        assert r["share_of_copy"] == pytest.approx(r["bytes_per_s"] / copy)
        assert r["positions_filled"] == filled
        assert filled <= r["positions_attended"] <= gpu.cache_length(setup.prompt_len + n)
    attended = {r["what"].split(": ", 1)[1]: r["positions_attended"] for r in decode_rows}
    assert attended["transformers generate(), dynamic cache (default)"] == filled  # it reads the filled part only
    assert attended["transformers generate(), static cache compiled"] == setup.prompt_len + n - 1  # its whole cache
    # lidr's cache of 16 + 5 positions is one block of 128; eager reads the 64-bucket, compiled on CPU the whole cache
    assert gpu.cache_length(setup.prompt_len + n) == 128
    assert attended["lidr generate(), eager step (grouped SDPA over the filled length)"] == 64
    assert attended["lidr generate(compile=True) (flex attention over the filled blocks, CUDA graphs)"] == 128
    # the attention section's decode rows (one row filled to 16): the bucket of 64, one 128-block, the whole cache
    reads = {r["what"].split(": ", 1)[1]: r["positions_attended"] for r in record["rows"]
             if r["section"] == "attention" and "positions_attended" in r}
    assert reads == {"grouped SDPA over the filled length, 64-bucket (lidr eager step)": 64,
                     "flex attention over the filled 128-blocks (lidr compiled step on CUDA)": 128,
                     "grouped SDPA over the whole cache (lidr compiled step on CPU)": 128,
                     "SDPA with enable_gqa and a mask over the filled length, 64-bucket (not in lidr)": 64}

    # the training rows: the trainer's settings, ragged pairs with their padding counted apart, one rank said so
    train = {r["what"]: r for r in record["rows"] if r["section"] == "train"}
    how = train["how the trainer runs here"]["value"]
    assert how.startswith("1 rank: FSDP2 over a one-rank group")
    assert f"AdamW β ({TRAINING.adam_beta1:g}, {TRAINING.adam_beta2:g})" in how and "0.95" not in how
    pairs = train["pairs"]
    assert 0 < pairs["real_tokens"] < pairs["positions"]  # uneven lengths: the packed rows end in padding
    steps = [r for w, r in train.items() if w.startswith("DPO step,") and r["status"] != "SKIP"]
    assert {r["activation_checkpointing"] for r in steps} == {False, True}  # the plan's choice (off on CPU), and on
    for r in steps:
        assert r["ranks"] == 1
        assert r["tokens_per_s"] / r["padded_tokens_per_s"] == pytest.approx(pairs["real_tokens"] / pairs["positions"])
        assert r["padding_share"] == pytest.approx(1 - pairs["real_tokens"] / pairs["positions"])


def test_a_section_subset_runs_only_those_after_the_preflight():
    proc = run_bench("--cpu-dry-run", "--quick", "--sections", "machine", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r[0] for r in markdown_rows(proc.stdout)} == {"preflight", "machine", "total"}


def test_an_unknown_section_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.main(["--cpu-dry-run", "--sections", "machine,decoding"])
    assert exit_info.value.code == 2
    assert "unknown section 'decoding'; choose among preflight, machine," in capsys.readouterr().err


def test_section_limits_are_one_number_or_some_sections_own():
    assert gpu.section_seconds("600") == {name: 600 for name in gpu.SECTIONS}
    assert gpu.section_seconds("decode=1200, train=90") == {**gpu.SECTION_SECONDS, "decode": 1200, "train": 90}
    assert min(gpu.SECTION_SECONDS.values()) >= 120  # minutes: a cold Triton compile fits
    with pytest.raises(Exception, match="unknown section 'decoding'"):
        gpu.section_seconds("decoding=60")


def alive(pid: int) -> bool:
    """Whether the process pid runs (a zombie has ended: it only waits to be reaped)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def until_started(attempt, started):
    """attempt(limit) with limits from short to long, until started(): a slow machine gets a longer limit, so that
    no outcome depends on how fast the processes start."""
    for limit in (5, 30, 300):
        result = attempt(limit)
        if started():
            return result
    raise AssertionError("the worker never reached its sleep")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_past_its_limit_is_killed_with_its_whole_process_group(tmp_path):
    """A worker that started a process which ignores SIGTERM: at the limit both end, the grandchild by the
    SIGKILL that follows the grace period; nothing of the group is left."""
    pids, ready = tmp_path / "pids", tmp_path / "ready"
    grandchild = (f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  f"open({str(ready)!r}, 'w').close(); time.sleep(600)")
    worker = textwrap.dedent(f"""
        import os, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", {grandchild!r}])
        while not os.path.exists({str(ready)!r}):
            time.sleep(0.01)
        open({str(pids)!r} + ".tmp", "w").write(f"{{os.getpid()}} {{grandchild.pid}}")
        os.replace({str(pids)!r} + ".tmp", {str(pids)!r})
        time.sleep(600)
    """)
    result = until_started(lambda limit: gpu.run_worker([sys.executable, "-c", worker], limit, grace=1),
                           pids.exists)
    assert result.timed_out
    child, grandchild_pid = map(int, pids.read_text().split())
    assert not alive(child) and not alive(grandchild_pid)
    assert gpu.living_members(child) == []  # the worker led its group: no member of it is left


def test_a_section_past_its_limit_is_stopped_and_the_next_runs(tmp_path):
    """The parent's side of a worker: its rows kept, a TIMEOUT row at the limit, a FAIL row for a worker that
    died, each section's time, the record rewritten after each section."""
    work = tmp_path / "work"
    work.mkdir()
    gpu.write_state(work, gpu.Machine(), {})

    def worker(section, sleep, status=0):
        row = {"section": section, "what": "measured", "value": "1", "status": ""}
        code = (f"import json, sys, time; open({str(work / (section + '.jsonl'))!r}, 'a').write(json.dumps({row!r}) "
                f"+ '\\n'); time.sleep({sleep}); sys.exit({status})")
        return [sys.executable, "-c", code]

    table = gpu.Table(tmp_path / "record.json", ["test"])

    def slow(limit):
        table.rows.clear()
        gpu.run_section(table, "slow", limit, worker("slow", 600), work)

    until_started(slow, lambda: any(r["what"] == "measured" for r in table.rows))
    gpu.run_section(table, "next", 600, worker("next", 0), work)
    gpu.run_section(table, "dies", 600, worker("dies", 0, status=3), work)
    assert [(r["section"], r["what"], r["status"]) for r in table.rows] == [
        ("slow", "measured", ""), ("slow", "time limit", "TIMEOUT"), ("slow", "section time", ""),
        ("next", "measured", ""), ("next", "section time", ""),
        ("dies", "measured", ""), ("dies", "worker", "FAIL"), ("dies", "section time", "")]
    assert "exited with status 3" in table.rows[-2]["value"]
    record = json.loads((tmp_path / "record.json").read_text())
    assert {name: s["status"] for name, s in record["sections"].items()} == {"slow": "TIMEOUT", "next": "ok",
                                                                             "dies": "FAIL"}


def test_without_a_c_compiler_every_compiled_row_is_skipped_with_the_reason(tmp_path):
    """What the preflight decides on a GPU machine with no cc/gcc (here forced, on the dry run's shapes)."""
    table = gpu.Table(None, ["test"])
    machine = gpu.Machine(can_compile=False, compile_skip="no C compiler ($CC, cc, gcc or clang) on PATH")
    table.run("correctness", gpu.section_correctness, gpu.CPU_DRY_RUN_QUICK, machine)
    table.run("attention", gpu.section_attention, gpu.CPU_DRY_RUN_QUICK, machine)
    skipped = {r["what"] for r in table.rows if r["status"] == "SKIP" and r["value"] == machine.compile_skip}
    compiled = [name for name, path in gpu.DECODE_PATHS.items() if path.compiles]
    assert compiled and {f"decode path {name}: prefill + 6 steps, bf16 vs fp32" for name in compiled} <= skipped
    assert "generate(compile=True) gives the eager greedy tokens (fp32, tiny model)" in skipped
    assert any(w.endswith("flex attention over the filled 128-blocks (lidr compiled step on CUDA)") for w in skipped)
    assert not table.failed()
    eager = [name for name, path in gpu.DECODE_PATHS.items() if not path.compiles]
    assert all(any(r["what"].startswith(f"decode path {name}") and r["status"] == "ok" for r in table.rows)
               for name in eager)


@pytest.mark.parametrize("name, memory_gb, sms, sku, tflops", [
    ("NVIDIA H100 80GB HBM3", 85.0, 132, "H100 SXM", 989),
    ("NVIDIA H100 PCIe", 85.0, 114, "H100 PCIe", 756),
    ("NVIDIA H100 NVL", 100.0, 132, "H100 NVL", 835),
    ("NVIDIA H100", 85.0, 114, "H100 PCIe", 756),  # a bare name: the SM count tells
    ("NVIDIA H100", 100.0, 132, "H100 NVL", 835),  # ... and the memory size
    ("NVIDIA H200", 150.0, 132, "H200", 989),
    ("NVIDIA H200 NVL", 150.0, 132, "H200 NVL", 835),
    ("NVIDIA A100-SXM4-80GB", 85.0, 108, "A100", 312),
    ("NVIDIA L40S", 48.0, 142, "L40S", 362),
    ("NVIDIA GeForce RTX 4090", 25.0, 128, None, None),
])
def test_the_datasheet_peak_is_the_skus(name, memory_gb, sms, sku, tflops):
    """NVIDIA's datasheets, dense bf16 (half the sparse figure they headline)."""
    found, flops = datasheet_peak(name, int(memory_gb * 1e9), sms)
    assert (found, None if flops is None else round(flops / 1e12)) == (sku, tflops)


def test_a_decode_step_streams_every_weight_but_the_embedding_table():
    """Llama-3-8B: 8,030,261,248 parameters, of which the 128,256 x 4,096 embedding table is read one row a token;
    a tied model (Llama-3.2-1B) reads its table whole, as the output projection."""
    with torch.device("meta"):
        big, tied = gpu.Llama(gpu.LLAMA3_8B).bfloat16(), gpu.Llama(gpu.LLAMA32_1B).bfloat16()
    assert gpu.streamed_weight_bytes(big) == 2 * (8_030_261_248 - 128_256 * 4_096)
    assert gpu.streamed_weight_bytes(tied) == 2 * 1_235_814_400
    assert gpu.kv_bytes_per_position(gpu.LLAMA3_8B) == 32 * 2 * 8 * 128 * 2  # 128 KiB a token


@pytest.mark.slow
def test_its_tiny_folder_trains_and_exports_through_train_dpo(tmp_path):
    """The torchrun section's run, launched with plain python here: the folder and tokenizer it writes work."""
    proc, out = gpu.run_torchrun(tmp_path, [sys.executable], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 rows read, 8 kept" in proc.stdout
    model, tokenizer = load(out / "model")
    assert model.cfg == dataclasses.replace(gpu.TINY, bos_token_id=tokenizer.tok.token_to_id("<|begin_of_text|>"),
                                            eos_token_id=tokenizer.tok.token_to_id("<|eot_id|>"))
    ids = tokenizer.encode_chat([{"role": "user", "content": "what is 2 plus 2?"}])
    assert tokenizer.decode(ids).split() == [
        "<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "what", "is", "2", "plus", "2", "?",
        "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>"]


def test_its_transformers_twin_holds_the_same_weights_and_gives_the_same_logits():
    """The decode section's two models (here the tiny shape, fp32): one set of tensors, equal logits."""
    model, hf = gpu.shared_weight_models(gpu.TINY, "cpu", torch.float32)
    assert model.layers[1].mlp.up_proj.weight.data_ptr() == hf.model.layers[1].mlp.up_proj.weight.data_ptr()
    tokens = torch.tensor(gpu.random_prompts(2, 20, gpu.TINY.vocab_size))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


def test_both_sides_of_a_decode_comparison_are_given_the_same_decoding_settings(monkeypatch):
    """Every decode path's call, caught on its way in: lidr's generate and transformers' generate get greedy
    decoding, LIDR's repetition penalty, the same max_new_tokens, the same stop token and prompts, and (fp32,
    same weights) generate the same tokens."""
    import lidr.sampler

    model, hf = gpu.shared_weight_models(gpu.TINY, "cpu", torch.float32)
    gpu.silence(model, gpu.stop_token_id(gpu.TINY))
    prompts = gpu.random_prompts(2, 7, gpu.TINY.vocab_size)
    calls = []
    lidr_generate, hf_generate = lidr.sampler.generate, hf.generate
    monkeypatch.setattr(lidr.sampler, "generate", lambda **kw: calls.append(("lidr", kw)) or lidr_generate(**kw))
    monkeypatch.setattr(hf, "generate", lambda **kw: calls.append(("transformers", kw)) or hf_generate(**kw))
    outputs = [gpu.lidr_generate_call(model, prompts, path.compiles, gpu.CPU_DRY_RUN_QUICK)[0](5)
               for path in gpu.DECODE_PATHS.values()]
    outputs += [gpu.transformers_generate_call(hf, prompts, path.generate_kwargs(gpu.CPU_DRY_RUN_QUICK))[0](5)
                for path in gpu.TRANSFORMERS_PATHS.values()]
    assert [side for side, _ in calls] == ["lidr"] * len(gpu.DECODE_PATHS) + ["transformers"] * len(
        gpu.TRANSFORMERS_PATHS)

    def settings(side, kw):  # read here from the arguments themselves, not through bench/gpu.py's own reading
        if side == "lidr":
            d = kw["decoding"]
            return (d.temperature == 0, d.repetition_penalty, d.max_new_tokens, set(kw["tokenizer"].stop_ids),
                    tuple(kw.get("stop_strings", ())), kw["prompts"], kw["batch_size"])
        return (kw["do_sample"] is False and kw.get("num_beams", 1) == 1, kw["repetition_penalty"],
                kw["max_new_tokens"], {kw["eos_token_id"]}, tuple(kw.get("stop_strings") or ()),
                kw["input_ids"].tolist(), len(kw["input_ids"]))

    seen = [settings(side, kw) for side, kw in calls]
    assert all(s == seen[0] for s in seen), seen
    assert seen[0] == (True, ANSWERS.repetition_penalty, 5, {gpu.TINY.vocab_size - 1}, (), prompts, 2)
    assert all(out == outputs[0] for out in outputs)  # the same decoding, the same tokens
    assert all(len(row) == 5 for row in outputs[0])  # no row stopped: the silenced stop token is never picked


def test_the_train_section_sets_the_optimizer_as_the_trainer_does():
    """Training's defaults (β2 0.999, not the world's 0.95), and on the GPU the trainer's own micro-batch."""
    assert gpu.trainer_options(gpu.GPU) == TRAINING
    model = torch.nn.Linear(4, 4)
    optimizer = gpu.make_optimizer(model, TRAINING, "cpu")
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"], group["lr"]) == (
        (TRAINING.adam_beta1, TRAINING.adam_beta2), TRAINING.adam_eps, TRAINING.weight_decay, TRAINING.lr)
    assert group["betas"] == (0.9, 0.999)
    pairs = gpu.training_pairs(16, 2048, 1000)
    lengths = {len(ex.prompt) for ex in pairs} | {len(r) for ex in pairs for r in ex.responses}
    assert len(lengths) > 8 and all(len(ex.prompt) + max(map(len, ex.responses)) <= 2048 for ex in pairs)
