"""bench/gpu.py where it can run without a GPU: its refusal, its CPU dry run of every section, its time limits,
its SKU table, its byte counts, and its tiny train_dpo.py run (here on CPU, gloo)."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT

from lidr.checkpoint import load
from lidr.kernels.hardware import datasheet_peak

# the bench script, loaded from its file (bench/ is not a package, and sys.path stays as it is)
spec = importlib.util.spec_from_file_location("gpu", ROOT / "bench" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
sys.modules["gpu"] = gpu  # its dataclasses look their module up by name
spec.loader.exec_module(gpu)


def run_bench(*args, timeout=150) -> subprocess.CompletedProcess:
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
    and the byte counts agree, and every path of every table has its row."""
    start = time.perf_counter()
    proc = run_bench("--cpu-dry-run", "--quick", "--json", str(tmp_path / "gpu.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.perf_counter() - start < 90  # CI runs it: it must stay quick (~30 s on 2 busy cores)
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
    assert (tmp_path / "gpu.md").read_text() in proc.stdout  # the table, also beside the JSON
    whats = [r["what"] for r in record["rows"]]
    for name in [*gpu.DECODE_PATHS, *gpu.TRANSFORMERS_PATHS]:
        assert f"batch 1: {name}" in whats
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
        assert f"DPO step, {name}" in whats

    # bytes per decode step: TINY's weights without the embedding table (closed form), + the KV of the filled positions
    layer = 128 * 128 * 2 + 128 * 64 * 2 + 128 * 256 * 3 + 2 * 128  # q, o; k, v; gate, up, down; two norms
    weights = 2 * (2 * layer + 128 + 1024 * 128)  # bf16: 2 layers, the final norm, lm_head
    kv_per_position = 2 * 2 * 2 * 32 * 2  # layers x (k, v) x kv heads x head_dim x bf16
    setup = gpu.CPU_DRY_RUN_QUICK
    filled = setup.prompt_len + 1 + setup.warm_steps + (setup.steps - 1) / 2  # mean over the timed steps
    copy = next(r["copy_bytes_per_s"] for r in record["rows"] if "copy_bytes_per_s" in r)
    decode_rows = [r for r in record["rows"] if r["section"] == "decode" and "tokens_per_s" in r]
    assert len(decode_rows) == len(gpu.DECODE_PATHS) + len(gpu.TRANSFORMERS_PATHS)
    for r in decode_rows:
        assert r["bytes_per_step"] == weights + kv_per_position * filled
        assert r["tokens_per_s"] == pytest.approx(1 / r["step_s"])
        assert r["bytes_per_s"] == pytest.approx(r["bytes_per_step"] / r["step_s"])
        assert r["share_of_copy"] == pytest.approx(r["bytes_per_s"] / copy)
        assert r["positions_filled"] == filled
        assert filled <= r["positions_attended"] <= gpu.cache_length(setup.max_len)
    attended = {r["what"]: r["positions_attended"] for r in decode_rows}
    assert attended["batch 1: transformers, dynamic cache (default)"] == filled  # it reads the filled part only
    # lidr's cache of 16 + 48 positions is one block of 128; eager reads the 64-bucket, compiled on CPU the whole cache
    assert gpu.cache_length(setup.max_len) == 128
    assert attended["batch 1: lidr eager (grouped SDPA over the filled length)"] == 64
    assert attended["batch 1: lidr compiled (flex attention over the filled blocks, CUDA graphs)"] == 128
    # the attention section's decode rows (one row filled to 16): the bucket of 64, one 128-block, the whole cache
    reads = {r["what"].split(": ", 1)[1]: r["positions_attended"] for r in record["rows"]
             if r["section"] == "attention" and "positions_attended" in r}
    assert reads == {"grouped SDPA over the filled length, 64-bucket (lidr eager step)": 64,
                     "flex attention over the filled 128-blocks (lidr compiled step on CUDA)": 128,
                     "grouped SDPA over the whole cache (lidr compiled step on CPU)": 128,
                     "SDPA with enable_gqa and a mask over the filled length, 64-bucket (not in lidr)": 64}


def test_a_section_subset_runs_only_those_after_the_preflight():
    proc = run_bench("--cpu-dry-run", "--quick", "--sections", "machine", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r[0] for r in markdown_rows(proc.stdout)} == {"preflight", "machine", "total"}


def test_an_unknown_section_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.main(["--cpu-dry-run", "--sections", "machine,decoding"])
    assert exit_info.value.code == 2
    assert "unknown section 'decoding'; choose among preflight, machine," in capsys.readouterr().err


def test_a_section_past_its_limit_is_stopped_and_the_next_runs(tmp_path):
    table = gpu.Table(tmp_path / "record.json", ["test"])

    def slow(table):
        table.add("slow", "before the limit", "measured")
        time.sleep(30)
        table.add("slow", "after the limit", "never reached")

    start = time.perf_counter()
    table.run("slow", 1, slow)
    table.run("next", 5, lambda table: table.add("next", "row", "measured"))
    assert time.perf_counter() - start < 10
    assert [(r["section"], r["what"], r["status"]) for r in table.rows] == [
        ("slow", "before the limit", ""), ("slow", "time limit", "TIMEOUT"), ("slow", "section time", ""),
        ("next", "row", ""), ("next", "section time", "")]
    record = json.loads((tmp_path / "record.json").read_text())
    assert {name: s["status"] for name, s in record["sections"].items()} == {"slow": "TIMEOUT", "next": "ok"}
    assert not table.failed()


def test_without_a_c_compiler_every_compiled_row_is_skipped_with_the_reason(tmp_path):
    """What the preflight decides on a GPU machine with no cc/gcc (here forced, on the dry run's shapes)."""
    table = gpu.Table(None, ["test"])
    machine = gpu.Machine(can_compile=False, compile_skip="no C compiler ($CC, cc, gcc or clang) on PATH")
    table.run("correctness", 60, gpu.section_correctness, gpu.CPU_DRY_RUN_QUICK, machine)
    table.run("attention", 60, gpu.section_attention, gpu.CPU_DRY_RUN_QUICK, machine)
    skipped = {r["what"] for r in table.rows if r["status"] == "SKIP" and r["value"] == machine.compile_skip}
    compiled = [name for name, path in gpu.DECODE_PATHS.items() if path.compiles]
    assert compiled and {f"decode path {name}: prefill + 6 steps, bf16 vs fp32" for name in compiled} <= skipped
    assert "generate(compile=True) gives the eager greedy tokens (fp32, tiny model)" not in skipped  # CPU: its own reason
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
