"""The compiled decode step as CUDA graphs need it, checked on CPU: only the weights and the KV buffers are
static inputs, a generation past torch's recompile limit finishes eagerly with the same tokens, and the
CUDA-graph check counts skips, split graphs and recordings (simulated: CPU has no CUDA graphs)."""

import pytest
import torch
from torch._dynamo.utils import counters

from lidr.kernels.cache import CompiledStep, KVCache, Session, check_cuda_graphs, cuda_graph_recordings, decode_logits
from lidr.model import Llama, LlamaConfig
from lidr.sampler import generate
from lidr.settings import Decoding

VOCAB = 256


def tiny_llama(n_layers=2) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16,
                      max_seq_len=512)
    model = Llama(cfg)
    model.init_weights()
    return model.eval()


def test_compiled_step_has_only_weights_and_kv_buffers_as_static_inputs():
    """dynamo marks as static (fixed address: CUDA-graph trees re-record when one moves) the parameters,
    the model's buffers and the cache's k, v; the per-step tensors are plain inputs. Three steps compile
    one graph, whose logits equal the eager step's."""
    model = tiny_llama()
    graphs = []

    def recording_backend(gm, example_inputs):
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        marks = [node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") for node in placeholders]
        names = [node.meta["grapharg"].source.name for node in placeholders]
        graphs.append([(name, mark is not None, t) for name, mark, t in zip(names, marks, example_inputs)])
        return gm.forward

    step = torch.compile(decode_logits, fullgraph=True, dynamic=False, backend=recording_backend)
    torch.manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (5, 130)]
    fed = torch.randint(0, VOCAB, (3, 2))
    with torch.inference_mode():
        caches = [KVCache(model, batch_size=2, length=256, pack=False) for _ in range(2)]
        eager, compiled = (Session(model, cache) for cache in caches)
        for slot, prompt in enumerate(prompts):
            eager.prefill(slot, prompt)
            compiled.prefill(slot, prompt)
        for i in range(3):
            positions = torch.tensor([len(p) + i for p in prompts])
            want = eager.decode(fed[i], positions, 256)
            got = compiled.decode(fed[i], positions, 256, step, flex=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    fixed = {t.data_ptr() for t in (*model.parameters(), *model.buffers(), *caches[1].buffers())}
    kv = {t.data_ptr() for t in caches[1].buffers()}
    static = {name: t.data_ptr() for name, is_static, t in graphs[0] if is_static}
    plain = [name for name, is_static, _ in graphs[0] if not is_static]
    assert not [name for name, ptr in static.items() if ptr not in fixed], "static inputs other than weights and KV"
    assert kv <= set(static.values())  # every layer's k and v: the graph reads them in place
    assert sorted(plain) == ["L['positions']", "L['tokens']"]


class Ids:
    """The tokenizer that the sampler needs for ids alone: stop ids, and a text per output."""

    stop_ids = frozenset(range(4))

    def decode(self, ids):
        return " ".join(map(str, ids))


@torch._dynamo.config.patch(recompile_limit=8)  # torch's default; torch's own patch (pytest >= 9.2's monkeypatch
# would restore a config attribute by deleting it, which hides it from torch for the rest of the process)
def test_a_generation_past_the_recompile_limit_finishes_eagerly_with_the_same_tokens(monkeypatch):
    """16 rows stopping at random steps compact through 16, 8, 4, 2 and 1 slots: three generations of
    different lengths (three cache lengths) meet 13 shapes of the step, more than the 8 that torch
    compiles of one function. The compiled step (dynamo's graph run by aten: backend "eager") compiles
    8, the shapes after them run eagerly, and every row's tokens equal the eager sampler's."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **options: real_compile(fn, backend="eager", **options))
    torch._dynamo.reset()  # no shape compiled before this test counts towards the limit
    model, ids = tiny_llama(n_layers=1), Ids()
    torch.manual_seed(2)
    prompts = [torch.randint(4, VOCAB, (int(n),)).tolist() for n in torch.randint(3, 12, (16,))]
    shapes, decode = [], Session.decode

    def recording_decode(self, tokens, positions, length, *args):
        shapes.append((len(tokens), length))
        return decode(self, tokens, positions, length, *args)

    graphs, recordings = counters["stats"]["unique_graphs"], cuda_graph_recordings()
    for max_new_tokens in (100, 200, 300):  # caches of 128, 256 and 384 positions
        params = Decoding(max_new_tokens=max_new_tokens, repetition_penalty=1.0, temperature=1.0, seed=5)
        eager = generate(model, ids, prompts, params, batch_size=16)
        with monkeypatch.context() as patch:
            patch.setattr(Session, "decode", recording_decode)
            compiled = generate(model, ids, prompts, params, batch_size=16, compile=True)
        assert [c.tokens for c in compiled] == [e.tokens for e in eager]
        assert [c.finish_reason for c in compiled] == [e.finish_reason for e in eager]
    assert len(set(shapes)) == 13
    assert counters["stats"]["unique_graphs"] - graphs == 8
    assert cuda_graph_recordings() == recordings  # none on CPU


def simulate_recording(trigger="CUDAGRAPH_RECORDING"):
    """What inductor's CUDA-graph trees run as they record a graph (torch._inductor.cudagraph_trees)."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    with callback_handler.install_callbacks(CallbackTrigger[trigger], "0/0"):
        pass


def test_the_cuda_graph_check_counts_recordings_one_per_batch_shape():
    """cuda_graph_recordings counts each recording (and no compilation); a compiled step that has run two
    batch shapes may record two graphs, and the check fails on a third (the step re-records)."""
    step = CompiledStep(cuda_graphs=True)  # compiles nothing until it runs
    before = cuda_graph_recordings()
    simulate_recording("DYNAMO")
    assert cuda_graph_recordings() == before
    step.shapes = {(8, 256), (4, 256)}
    for _ in range(2):
        simulate_recording()
    assert cuda_graph_recordings() == before + 2
    step.check()
    simulate_recording()
    with pytest.raises(RuntimeError, match=r"3 CUDA graphs recorded for the decode step's 2 batch shape\(s\), one each "
                                           r"expected: the step re-records.*TORCH_LOGS=cudagraphs"):
        step.check()
    check_cuda_graphs(step.counts_before, graphs=3)
    torch._dynamo.reset()  # drops dynamo's callbacks: the next call registers the count again
    counted = cuda_graph_recordings()
    simulate_recording()
    assert cuda_graph_recordings() == counted + 1 == before + 4


def test_the_cuda_graph_check_fails_on_a_split_step():
    """Graph partition (torch's default since 2.9) runs what CUDA graphs cannot capture between captured
    parts instead of skipping the graph: inductor counts the partitions, and the check fails on any."""
    step = CompiledStep(cuda_graphs=True)
    step.check()
    counters["inductor"]["cudagraph_partitions"] += 3
    try:
        with pytest.raises(RuntimeError, match=r"split the decode step into 3 partitions.*TORCH_LOGS=cudagraphs"):
            step.check()
    finally:
        counters["inductor"]["cudagraph_partitions"] -= 3
    step.check()


def test_torch_still_counts_what_the_check_reads():
    """The names the check depends on, in this torch's sources: the partition counter and the recording
    callback (renamed, the check would go blind rather than fail)."""
    import importlib.util
    from pathlib import Path

    def source(module):
        return Path(importlib.util.find_spec(module).origin).read_text()

    assert 'counters["inductor"]["cudagraph_partitions"]' in source("torch._inductor.scheduler")
    assert "CallbackTrigger.CUDAGRAPH_RECORDING" in source("torch._inductor.cudagraph_trees")
    assert 'counters["inductor"]["cudagraph_skips"]' in source("torch._inductor.cudagraph_utils")
