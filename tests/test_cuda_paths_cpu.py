"""What CI can check on CPU of the trainer's CUDA paths: the process group's timeout around rank-0-only work,
MFU's FLOP count against a hand count, flex attention's document mask forward and backward (GQA, FSDP2,
activation checkpointing, bf16) against the dense path, the graphs compiled as packed shapes change, and
fused AdamW on FSDP2 shards through the trainer's checkpoint save and resume.

Flex attention runs on CPU here through a stand-in compiler backend: aot_eager (dynamo's and AOTAutograd's
graphs, run by aten's reference kernels) in place of inductor's Triton kernels, with flex's front-end refusal
of a CPU backward bypassed; everything around it (block mask, packing, FSDP2, checkpointing) is the CUDA path's.
"""

import copy
import shutil
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import lidr.kernels.attention as attention
from lidr.harness.training import load_checkpoint, save_checkpoint
from lidr.kernels.attention import Documents, document_block_mask, flex_attention
from lidr.kernels.hardware import training_flops
from lidr.model import Llama, LlamaConfig
from lidr.train import Example, forward_logps, pack, setup_distributed, shard_model

needs_flex = pytest.mark.skipif(flex_attention is None, reason="this torch has no flex attention")


@pytest.fixture
def one_rank():
    """A one-rank gloo group (what FSDP2 and the trainer's checkpoints need), destroyed after the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the process group waits while rank 0 alone reads the weights and writes the export

# rank 0 alone reads an 8B model's weights (16 GB in bf16) in build_model, and writes them again as the export,
# while every other rank waits in a collective; from a busy shared filesystem at 10 MB/s that is 1,600 s each
RANK0_ALONE_BUDGET = timedelta(seconds=16e9 / 10e6)


def group_timeout() -> timedelta:
    return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout


def test_the_group_waits_out_rank0_alone(monkeypatch):
    """setup_distributed's group, a plain launch (gloo) and under torchrun on CUDA (nccl, whose default of
    10 min is what killed the waiting ranks), times out only after the budget for rank 0's lone work."""
    assert timedelta(minutes=10) < RANK0_ALONE_BUDGET  # nccl's default would not do
    monkeypatch.delenv("RANK", raising=False)
    setup_distributed()
    try:
        assert group_timeout() >= RANK0_ALONE_BUDGET
    finally:
        dist.destroy_process_group()

    calls, init = [], dist.init_process_group

    def as_gloo(backend, **kwargs):  # the nccl call recorded, then made as a one-rank gloo group
        calls.append((backend, kwargs))
        init("gloo", **kwargs)

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):  # torchrun --nproc_per_node=1
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", as_gloo)
    ranks = setup_distributed()
    try:
        assert [backend for backend, _ in calls] == ["nccl"] and ranks.device == torch.device("cuda", 0)
        assert calls[0][1].get("timeout", timedelta(minutes=10)) >= RANK0_ALONE_BUDGET
        assert group_timeout() >= RANK0_ALONE_BUDGET
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# MFU: the FLOPs that run


def test_training_flops_is_the_hand_count():
    """A 2-layer model, dim 4, 2 query heads and 1 kv head of 2, SwiGLU 6, vocabulary 10; two packed
    sequences (prompt, response) = (2, 1) and (1, 2), both 3 tokens. Counted by hand:
    - projections per token and layer, multiply-adds: q 4·4 + k 4·2 + v 4·2 + o 4·4 + gate, up, down 3·4·6
      = 16 + 8 + 8 + 16 + 72 = 120; 2 layers = 240; 2 FLOPs each, × 3 for backward = 6 · 240 = 1,440 per
      token, 3 tokens: 4,320 per sequence
    - lm_head, response positions only: 6 · 4 · 10 = 240 per position: 240 (one) and 480 (two)
    - causal attention within a sequence: queries see 1, 2, 3 keys = 6 (query, key) pairs; each: scores
      2·2 + sums 2·2 = 8 FLOPs per head, 2 heads, 2 layers, × 3 = 96: 576 per sequence
    - the embedding lookup: 0
    """
    cfg = LlamaConfig(vocab_size=10, dim=4, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=6, head_dim=2)
    assert training_flops(cfg, [(2, 1)]) == 4320 + 240 + 576
    assert training_flops(cfg, [(1, 2)]) == 4320 + 480 + 576
    assert training_flops(cfg, [(2, 1), (1, 2)]) == 5136 + 5376  # packed: no attention across sequences
    tied = LlamaConfig(**{**cfg.__dict__, "tie_embeddings": True})
    assert training_flops(tied, [(2, 1), (1, 2)]) == 5136 + 5376  # a tied table is the same lookup and product


# -----------------------------------------------------------------------------
# flex attention's document mask, forward and backward, against the dense path

CFG = dict(vocab_size=300, dim=64, n_layers=2, n_heads=8, ffn_dim=128, head_dim=16, max_seq_len=1024)
ROW = 200  # longer than flex's block of 128: rows span two blocks, sequences cross a block boundary


def tiny_model(n_kv_heads: int) -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CFG, n_kv_heads=n_kv_heads))
    model.init_weights(std=0.1)
    return model


def pairs() -> list[Example]:
    g = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(2, CFG["vocab_size"], (n,), generator=g).tolist()

    lengths = [(5, 40), (30, 7), (12, 12), (3, 150), (25, 20)]
    return [Example(i, tokens(p), [tokens(r), tokens(r // 2 + 1)]) for i, (p, r) in enumerate(lengths)]


def logps_and_grads(model: Llama, dense: bool):
    """(log-probs, every parameter's full gradient) of one packed micro-batch, Σ logps as the loss."""
    model.zero_grad(set_to_none=True)
    batch = pack(pairs(), 0, ROW, "cpu", dense_mask=dense)
    assert isinstance(batch.attention_mask, torch.Tensor) == dense and batch.tokens.shape[1] > 128
    logps, _ = forward_logps(model, batch)
    logps.sum().backward()
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float()
             for k, p in model.named_parameters()}
    return logps.detach().float(), grads


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def worst(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(rel(got[k], want[k]) for k in want)


@pytest.fixture
def flex_on_cpu(monkeypatch) -> list:
    """The CUDA choice made on CPU: packed rows as flex's document block mask, compiled with aot_eager, its
    CPU-backward refusal bypassed. Returns the shapes of q that the compiled flex attention was called with."""
    import torch.nn.attention.flex_attention as flex_module

    compiled = torch.compile(flex_attention, backend="aot_eager")
    calls = []

    def counted(q, k, v, **kwargs):
        calls.append(tuple(q.shape))
        return compiled(q, k, v, **kwargs)

    monkeypatch.setattr(flex_module, "_validate_device", lambda q, k, v: None)  # flex: "no backward on CPU"
    monkeypatch.setattr(attention, "flex_documents", lambda device: True)
    monkeypatch.setattr(attention, "compiled_flex_attention", counted)
    return calls


@needs_flex
@pytest.mark.parametrize("n_kv_heads", [8, 2], ids=["mha", "gqa"])
def test_flex_document_mask_backward_is_the_dense_paths(flex_on_cpu, n_kv_heads):
    """fp32, one process: log-probs within 1e-5 and every parameter's gradient within 1e-4 of the dense mask's."""
    model = tiny_model(n_kv_heads)
    want, want_grads = logps_and_grads(model, dense=True)
    assert not flex_on_cpu
    got, got_grads = logps_and_grads(copy.deepcopy(model), dense=False)
    assert len(flex_on_cpu) == CFG["n_layers"]  # every layer through flex attention
    assert rel(got, want) <= 1e-5
    assert worst(got_grads, want_grads) <= 1e-4


def sharded(model: Llama, dtype: torch.dtype, activation_checkpointing: bool) -> Llama:
    """The trainer's FSDP2 policy (shard_model) filled with `model`'s weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        fsdp = Llama(model.cfg)
    shard_model(fsdp, torch.device("cpu"), dtype, activation_checkpointing)
    set_model_state_dict(fsdp, model.state_dict(), options=StateDictOptions(full_state_dict=True))
    return fsdp


@needs_flex
def test_flex_under_fsdp2_activation_checkpointing_bf16(flex_on_cpu, one_rank):
    """GQA, FSDP2 on one gloo rank, each block recomputed in backward. fp32 compute: flex within 1e-5 (log-probs)
    and 1e-4 (gradients) of the unsharded dense path. bf16 compute (measured: 1e-4 and 2e-2 off): flex and the
    same sharded bf16 model through the dense mask, each within 1e-3 and 5e-2 of fp32 and of each other."""
    model = tiny_model(2)
    want, want_grads = logps_and_grads(model, dense=True)

    got, got_grads = logps_and_grads(sharded(model, torch.float32, True), dense=False)
    assert len(flex_on_cpu) == 2 * CFG["n_layers"]  # forward, and the forward recomputed in backward
    assert rel(got, want) <= 1e-5 and worst(got_grads, want_grads) <= 1e-4

    dense_bf16, dense_bf16_grads = logps_and_grads(sharded(model, torch.bfloat16, True), dense=True)
    flex_bf16, flex_bf16_grads = logps_and_grads(sharded(model, torch.bfloat16, True), dense=False)
    assert rel(flex_bf16, dense_bf16) <= 1e-3 and worst(flex_bf16_grads, dense_bf16_grads) <= 5e-2
    for logps, grads in ((flex_bf16, flex_bf16_grads), (dense_bf16, dense_bf16_grads)):
        assert rel(logps, want) <= 1e-3 and worst(grads, want_grads) <= 5e-2


# -----------------------------------------------------------------------------
# graphs compiled as the packed rows' shape changes


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def attend_packed(rows: int, width: int, grad: bool):
    """attend() over a document block mask of `rows` rows of `width` positions (GQA), and its backward."""
    g = torch.Generator().manual_seed(width)
    q = torch.randn(rows, 4, width, 16, generator=g, requires_grad=grad)
    k, v = (torch.randn(rows, 2, width, 16, generator=g, requires_grad=grad) for _ in range(2))
    documents = Documents(tuple((width // 2, width - width // 2 - r) for r in range(rows)))
    with torch.set_grad_enabled(grad):
        y = attention.attend(q, k, v, document_block_mask(documents, width, "cpu"))
        if grad:
            y.sum().backward()


SHAPES = [(2, 200), (2, 300), (2, 384), (2, 515), (3, 300), (1, 640), (4, 256), (3, 777), (1, 129)]
GRAPHS = [1, 2, 2, 2, 3, 4, 4, 4, 4]  # after each shape


def check_graphs(grad: bool):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    seen = []
    for rows, width in SHAPES:
        attend_packed(rows, width, grad)
        seen.append(compiled_graphs())
    assert seen == GRAPHS, list(zip(SHAPES, seen))


@needs_flex
def test_packed_shapes_compile_four_graphs_at_most_forward_and_backward(flex_on_cpu):
    """(rows, width) as packing makes them: the first shape compiles static; the first new width compiles a
    graph dynamic in the width (no graph per width after it), the first new row count one dynamic in the rows,
    a single row one more (dynamic shapes specialize a size of 1); then none (aot_eager, forward + backward)."""
    check_graphs(grad=True)


@needs_flex
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_lidrs_compiled_flex_attention_forward_compiles_the_same_graphs():
    """The module's own compiled_flex_attention (inductor, CPU forward: inductor refuses flex's backward on
    CPU) compiles the same graphs as the shapes change."""
    check_graphs(grad=False)


# -----------------------------------------------------------------------------
# fused AdamW on FSDP2 shards, saved and resumed


def fsdp_model_and_optimizer():
    """A sharded GQA model (bf16 compute, activation checkpointing), fused AdamW (the trainer's CUDA setting)."""
    with torch.device("meta"):
        model = Llama(LlamaConfig(**CFG, n_kv_heads=2))
    shard_model(model, torch.device("cpu"), torch.bfloat16, activation_checkpointing=True)
    torch.manual_seed(0)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, step: int):
    tokens = torch.randint(0, CFG["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(step))
    model(tokens).float().logsumexp(-1).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def test_fused_adamw_on_fsdp2_shards_resumes_where_it_stopped(one_rank, tmp_path):
    """Two steps, the trainer's save_checkpoint, a fresh model and optimizer through load_checkpoint, a third
    step: the same weights and optimizer state as three steps without a stop."""
    model, optimizer, scheduler = fsdp_model_and_optimizer()
    assert optimizer.defaults["fused"] is True
    for step in range(2):
        train_step(model, optimizer, scheduler, step)
    save_checkpoint(model, optimizer, scheduler, 2, tmp_path, rank=0)
    train_step(model, optimizer, scheduler, 2)

    resumed, resumed_optimizer, resumed_scheduler = fsdp_model_and_optimizer()
    assert load_checkpoint(tmp_path / "checkpoint", resumed, resumed_optimizer, resumed_scheduler, rank=0) == 2
    train_step(resumed, resumed_optimizer, resumed_scheduler, 2)

    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), name
        want, got = optimizer.state[p], resumed_optimizer.state[q]
        assert torch.is_tensor(got["step"]) and got["step"].device == p.device and got["step"].item() == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(want[key].full_tensor(), got[key].full_tensor()), (name, key)
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
