"""The sampler against transformers (greedy generate, logits processors) and hand-computed answers."""

import copy
import shutil

import pytest
import torch
from helpers import make_tiny_checkpoint

import lidr.kernels.cache
from lidr.checkpoint import load
from lidr.kernels.cache import KVCache, PackedLinear, Session, onednn_available
from lidr.sampler import Completion, apply_repetition_penalty, completions, filter_top_k_top_p, generate, sample
from lidr.settings import Decoding

QUESTIONS = [
    "Hi",
    "What is the capital of France? Answer in one word, please.",
    "2+2",
    "Tell me a story about a dragon who lived in a very long cave under the sea.",
    "Why?",
]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tokenizer = load(tiny_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def decoding(max_new_tokens=256, **settings):
    """Greedy, no repetition penalty, unless settings say otherwise."""
    return Decoding(max_new_tokens=max_new_tokens, **{"repetition_penalty": 1.0, **settings})


def chat(tokenizer, text, prefill=""):
    return tokenizer.encode_chat([{"role": "user", "content": text}], prefill=prefill)


def with_stops(tokenizer, stop_ids):
    """The same tokenizer with another stop set."""
    tokenizer = copy.copy(tokenizer)
    tokenizer.stop_ids = frozenset(stop_ids)
    return tokenizer


def hf_greedy(hf_model, prompt, max_new_tokens, stop_ids, **kwargs):
    """transformers' greedy generate for one unpadded prompt, cut before the first stop token."""
    out = hf_model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=0, **kwargs,
    )[0, len(prompt):].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in stop_ids), out)


# -----------------------------------------------------------------------------
# the cache


def model_snapshot(model):
    """Every module object, its attributes, and every parameter's and buffer's object and value."""
    return {
        "modules": {name: (module, sorted(vars(module))) for name, module in model.named_modules()},
        "tensors": {name: (t, t.detach().clone()) for name, t in [*model.named_parameters(), *model.named_buffers()]},
    }


def assert_model_unchanged(model, snapshot):
    now = model_snapshot(model)
    assert now["modules"].keys() == snapshot["modules"].keys()
    for name, (module, attributes) in snapshot["modules"].items():
        assert now["modules"][name][0] is module and now["modules"][name][1] == attributes, name
    assert now["tensors"].keys() == snapshot["tensors"].keys()
    for name, (tensor, value) in snapshot["tensors"].items():
        assert now["tensors"][name][0] is tensor and torch.equal(tensor, value), name


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("variant", ["llama3", "llama31", "tied"])
def test_cached_decode_equals_full_forward(tmp_path, variant, pack):
    """Every decode step's logits equal a full forward over the same prefix (two slots, ragged lengths),
    with the CPU's packed and fused projections and without, through each decode attention (masked SDPA
    with the heads sharing a kv head as its query rows, over the whole cache or a bucket of it; flex
    attention's block mask, eager here); the model itself is never changed."""
    model, _ = load(make_tiny_checkpoint(tmp_path / variant, variant))
    snapshot = model_snapshot(model)
    torch.manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,)) for n in (7, 3)]
    fed = torch.randint(0, 1000, (10, 2))  # the token each slot decodes at each step
    with torch.inference_mode():  # the reference: a full forward over every prefix, one row at a time
        full = [[model(torch.cat([p, fed[:i, slot]])[None])[0, -1] for i in range(11)]
                for slot, p in enumerate(prompts)]

    def relative_error(got, want):
        return ((got - want).abs().max() / want.abs().max()).item()

    # decode attention: SDPA over the whole cache, over the first 32 positions (a length bucket), flex attention
    for length, flex in ((128, False), (32, False), (128, True)):
        with torch.inference_mode():
            session = Session(model, KVCache(model, batch_size=2, length=128, pack=pack))
            assert (session.cache.layers[0].qkv_proj is not None) == pack
            assert (session.cache.lm_head is not None) == pack
            for slot, prompt in enumerate(prompts):
                assert relative_error(session.prefill(slot, prompt)[0], full[slot][0]) <= 1e-5
            for step in range(10):
                positions = torch.tensor([len(p) + step for p in prompts])
                logits = session.decode(fed[step], positions, length, flex=flex)
                for slot in range(2):
                    assert relative_error(logits[slot], full[slot][step + 1]) <= 1e-5, (length, flex)
            assert_model_unchanged(model, snapshot)  # while the session is alive, too


# -----------------------------------------------------------------------------
# greedy parity and batch invariance


def test_greedy_matches_transformers(tiny, tiny_hf):
    """Five prompts of different lengths through 2 slots (refills, compaction) = transformers alone."""
    model, tokenizer = tiny
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)
    finished = list(completions(model, tokenizer, prompts, decoding(max_new_tokens=24), batch_size=2))
    outs = generate(model, tokenizer, prompts, decoding(max_new_tokens=24), batch_size=2)
    for prompt, out in zip(prompts, outs):
        assert out.tokens == hf_greedy(tiny_hf, prompt, 24, tokenizer.stop_ids)
        assert out.finish_reason == "length" and out.text == tokenizer.decode(out.tokens)
    assert sorted(i for i, _ in finished) == list(range(len(prompts)))
    assert all(outs[i] == c for i, c in finished)


@pytest.mark.slow
def test_greedy_matches_transformers_on_demo_model(demo_dir):
    """SmolLM2-135M-Instruct, 64 new tokens, prompts of different lengths in one batch."""
    from transformers import LlamaForCausalLM

    model, tokenizer = load(demo_dir)
    hf_model = LlamaForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    questions = ["Tom has 26 apples. He buys 28 more. How many apples does he have?",
                 "Give three tips for staying healthy.", "Quelle est la capitale de la France ?"]
    prompts = [chat(tokenizer, q) for q in questions]
    outs = generate(model, tokenizer, prompts, decoding(max_new_tokens=64), batch_size=3)
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(hf_model, prompt, 64, tokenizer.stop_ids)
        assert out.tokens == expected
        assert out.finish_reason == ("length" if len(expected) == 64 else "stop_token")
    assert any(out.finish_reason == "stop_token" for out in outs) or all(len(o.tokens) == 64 for o in outs)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_decode_step_matches_eager(tiny):
    """compile=True (inductor; on CPU the packed products as lidr::packed_linear) = the eager sampler."""
    model, tokenizer = tiny
    prompts = [chat(tokenizer, q) for q in QUESTIONS[:3]]
    params = decoding(max_new_tokens=12, repetition_penalty=1.1)
    eager = generate(model, tokenizer, prompts, params, batch_size=2)
    compiled = generate(model, tokenizer, prompts, params, batch_size=2, compile=True)
    assert [c.tokens for c in compiled] == [c.tokens for c in eager]
    assert all(len(c.tokens) > 0 for c in eager)


@pytest.mark.slow
def test_batch_invariance(tiny):
    """A prompt's output is the same alone and inside a batch, greedy and sampled (per-request seeds)."""
    model, tokenizer = tiny
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    for params in (decoding(max_new_tokens=20),
                   decoding(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.9, seed=3)):
        together = generate(model, tokenizer, prompts, params, batch_size=4)
        alone = [generate(model, tokenizer, [p], params, seeds=[params.seed + i])[0] for i, p in enumerate(prompts)]
        assert [o.tokens for o in together] == [o.tokens for o in alone]


def test_refill_and_compaction_with_early_stops(tiny):
    """Rows stopping at different steps free their slots; every row equals its own solo run."""
    model, tokenizer = tiny
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    free = generate(model, with_stops(tokenizer, ()), prompts, decoding(max_new_tokens=30), batch_size=5)
    # stop on the 3rd token of prompt 0's output and the 12th of prompt 3's
    stops = {free[0].tokens[2], free[3].tokens[11]}
    stopping = with_stops(tokenizer, stops)
    outs = generate(model, stopping, prompts, decoding(max_new_tokens=30), batch_size=2)
    for o, f in zip(outs, free):
        cut = next((i for i, t in enumerate(f.tokens) if t in stops), None)
        assert o.tokens == f.tokens[:cut]
        assert o.finish_reason == ("length" if cut is None else "stop_token")
    assert outs[0].finish_reason == "stop_token" and len(outs[0].tokens) <= 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_compaction_sees_powers_of_two_and_compiles_once(tiny, monkeypatch):
    """compile=True (fullgraph) with rows stopping at different steps: the decode step only ever sees
    power-of-two batch sizes (compaction pads with idle slots), its tokens equal eager's, and a second
    generation runs on the same cache (the same buffers) and compiles nothing new."""
    from torch._dynamo.utils import counters

    model, tokenizer = tiny
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    free = generate(model, with_stops(tokenizer, ()), prompts, decoding(max_new_tokens=30), batch_size=5)
    # rows end at their 3rd, 10th, 12th and 21st tokens: 4, then 2, then 1 of them run after the host's reads
    stopping = with_stops(tokenizer, {free[0].tokens[2], free[2].tokens[9], free[3].tokens[11], free[1].tokens[20]})
    params = decoding(max_new_tokens=30)
    eager = generate(model, stopping, prompts, params, batch_size=8)
    assert [len(e.tokens) for e in eager] == [2, 20, 9, 11, 30]
    sizes = []
    decode = Session.decode

    def recording_decode(self, tokens, *args):
        sizes.append(len(tokens))
        return decode(self, tokens, *args)

    monkeypatch.setattr(Session, "decode", recording_decode)
    compiled = generate(model, stopping, prompts, params, batch_size=8, compile=True)
    assert [c.tokens for c in compiled] == [e.tokens for e in eager]
    assert set(sizes) == {8, 4, 2, 1}  # 5 prompts in 8 slots, then compacted three times
    graphs = counters["stats"]["unique_graphs"]
    cache = lidr.kernels.cache.CACHES[model]
    addresses = [layer.k.data_ptr() for layer in cache.layers]
    again = generate(model, stopping, prompts, params, batch_size=8, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert lidr.kernels.cache.CACHES[model] is cache and [layer.k.data_ptr() for layer in cache.layers] == addresses
    assert [c.tokens for c in again] == [e.tokens for e in eager]


def test_compiled_flex_decode_step_matches_eager_and_is_one_graph(tiny):
    """The CUDA default traced here on CPU: flex attention's block mask built from the rows' lengths inside
    one fullgraph step gives eager SDPA's logits at every length, with one graph. The backend is aot_eager
    (dynamo's graph, run by aten): inductor's CPU flex template refuses this step (NoValidChoicesError in
    torch 2.13), which is why the compiled CPU step keeps the grouped SDPA."""
    from torch._dynamo.utils import counters

    model, _ = tiny
    torch.manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,)) for n in (5, 130)]  # the second row fills two blocks
    fed = torch.randint(0, 1000, (4, 2))
    step = torch.compile(lidr.kernels.cache.decode_logits, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.inference_mode():
        eager, compiled = (Session(model, KVCache(model, batch_size=2, length=256, pack=False)) for _ in range(2))
        for slot, prompt in enumerate(prompts):
            eager.prefill(slot, prompt)
            compiled.prefill(slot, prompt)
        graphs = counters["stats"]["unique_graphs"]
        for i in range(4):
            positions = torch.tensor([len(p) + i for p in prompts])
            want = eager.decode(fed[i], positions, 256)
            got = compiled.decode(fed[i], positions, 256, step, flex=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_one_cache_per_model_is_kept_and_reused(tiny):
    """A second generation runs on the first one's cache (the same buffers) and gives the same tokens; a
    longer one replaces it; with packed weights, weights changed in place get a new cache and are used; so
    does a model cast since."""
    model, tokenizer = tiny
    prompts = [chat(tokenizer, q) for q in QUESTIONS[:3]]
    lidr.kernels.cache.CACHES.pop(model, None)
    first = generate(model, tokenizer, prompts, decoding(8), batch_size=3)
    cache = lidr.kernels.cache.CACHES[model]
    assert cache.batch_size == 3 and cache.length == 128 and not cache.in_use
    addresses = [layer.k.data_ptr() for layer in cache.layers]
    again = generate(model, tokenizer, prompts[:2], decoding(8), batch_size=2)
    assert lidr.kernels.cache.CACHES[model] is cache and [layer.k.data_ptr() for layer in cache.layers] == addresses
    assert [o.tokens for o in again] == [o.tokens for o in first[:2]]
    longer = generate(model, tokenizer, prompts[:1], decoding(120), batch_size=1)
    assert longer[0].tokens[:8] == first[0].tokens
    replaced = lidr.kernels.cache.CACHES[model]
    assert replaced is not cache and (replaced.batch_size, replaced.length) == (3, 256)
    try:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1)  # exact, and undone below
        flipped = generate(model, tokenizer, prompts, decoding(8), batch_size=3)
        assert (lidr.kernels.cache.CACHES[model] is not replaced) == lidr.kernels.cache.packs(model)
        lidr.kernels.cache.CACHES.pop(model)
        assert [o.tokens for o in generate(model, tokenizer, prompts, decoding(8), batch_size=3)] == \
            [o.tokens for o in flipped] != [o.tokens for o in first]
    finally:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1)
    plain = lidr.kernels.cache.kv_cache(model, 3, 8, pack=False)  # as on a GPU: no weights in the cache
    assert lidr.kernels.cache.kv_cache(model, 3, 8, pack=False) is plain
    assert lidr.kernels.cache.kv_cache(model.to(torch.float64), 3, 8, pack=False).layers[0].k.dtype == torch.float64
    model.to(torch.float32)


def test_skipped_cuda_graphs_stop_a_compiled_generation():
    """inductor counts each graph it runs without CUDA graphs; the sampler's check fails on any new one."""
    from torch._dynamo.utils import counters

    before = lidr.kernels.cache.cuda_graph_counts()
    lidr.kernels.cache.check_cuda_graphs(before, graphs=0)  # none skipped
    counters["inductor"]["cudagraph_skips"] += 1
    try:
        with pytest.raises(RuntimeError, match=r"without CUDA graphs \(1 graph\(s\) skipped\).*TORCH_LOGS=perf_hints"):
            lidr.kernels.cache.check_cuda_graphs(before, graphs=0)
    finally:
        counters["inductor"]["cudagraph_skips"] -= 1


# -----------------------------------------------------------------------------
# generations sharing a process, and generations that fail


def test_generations_on_two_models_share_a_process(tiny, tiny_hf, tmp_path):
    """Two models of different shapes, at different batch sizes, one after the other and one inside the
    other (while the first one's generator is suspended at a finished row): every generation equals transformers' greedy tokens, as in a process of its own."""
    from transformers import LlamaForCausalLM

    folder = make_tiny_checkpoint(tmp_path / "tied", "tied", seed=1)  # 4 kv heads, tied embeddings
    other, _ = load(folder)
    other_hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model, tokenizer = tiny
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    params = decoding(max_new_tokens=12)
    expected = [hf_greedy(tiny_hf, p, 12, tokenizer.stop_ids) for p in prompts]
    expected_other = [hf_greedy(other_hf, p, 12, tokenizer.stop_ids) for p in prompts]
    assert expected != expected_other
    inner, outer = [], [None] * len(prompts)
    for i, completion in completions(model, tokenizer, prompts, params, batch_size=3):
        outer[i] = completion
        if not inner:
            inner.append(generate(other, tokenizer, prompts, params, batch_size=2))
    after = generate(other, tokenizer, prompts[:2], params, batch_size=1)
    again = generate(model, tokenizer, prompts, params, batch_size=5)
    assert [o.tokens for o in outer] == expected == [o.tokens for o in again]
    assert [o.tokens for o in inner[0]] == expected_other
    assert [o.tokens for o in after] == expected_other[:2]


@pytest.mark.skipif(not onednn_available(), reason="the injected failure is in packing the weights for oneDNN")
def test_a_failed_start_leaves_the_model_as_it_was(tiny, tiny_hf, monkeypatch):
    """An error while a generation sets up (packing the second layer's weights; the consumer of the first
    finished row, which finished at its prefill) leaves every module, attribute, parameter and buffer of the model as it was,
    and the next generation is right."""
    model, tokenizer = tiny
    snapshot = model_snapshot(model)
    prompts = [chat(tokenizer, q) for q in QUESTIONS[:3]]
    built = []

    class FailingPackedLinear(PackedLinear):
        def __init__(self, *args):
            if len(built) == 5:  # 4 per layer: the first layer is packed, the second not
                raise RuntimeError("injected")
            built.append(self)
            super().__init__(*args)

    lidr.kernels.cache.CACHES.pop(model, None)  # the cache kept from earlier tests would be reused, not packed
    with monkeypatch.context() as patch:
        patch.setattr(lidr.kernels.cache, "PackedLinear", FailingPackedLinear)
        with pytest.raises(RuntimeError, match="injected"):
            generate(model, tokenizer, prompts, decoding(max_new_tokens=8))
    assert len(built) == 5 and model not in lidr.kernels.cache.CACHES
    assert_model_unchanged(model, snapshot)

    with pytest.raises(KeyError, match="the consumer failed"):  # max_new_tokens=1: a row ends at its prefill
        for _ in completions(model, tokenizer, prompts, decoding(max_new_tokens=1)):
            raise KeyError("the consumer failed")
    assert_model_unchanged(model, snapshot)
    outs = generate(model, tokenizer, prompts, decoding(max_new_tokens=8), batch_size=2)
    assert [o.tokens for o in outs] == [hf_greedy(tiny_hf, p, 8, tokenizer.stop_ids) for p in prompts]


# -----------------------------------------------------------------------------
# repetition penalty, top-k, top-p, seeds


def test_repetition_penalty_known_answer():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_repetition_penalty_matches_transformers(tiny, tiny_hf):
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits, ids = torch.randn(3, 500), torch.randint(0, 500, (3, 40))
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.1)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.1), expected, rtol=0, atol=0)
    # end to end: the penalty covers prompt and generated tokens, as transformers' does
    model, tokenizer = tiny
    prompt = chat(tokenizer, QUESTIONS[1])  # its plain greedy answer repeats itself
    penalized = generate(model, tokenizer, [prompt], decoding(max_new_tokens=30, repetition_penalty=1.3))[0]
    plain = generate(model, tokenizer, [prompt], decoding(max_new_tokens=30))[0]
    assert penalized.tokens == hf_greedy(tiny_hf, prompt, 30, tokenizer.stop_ids, repetition_penalty=1.3)
    assert penalized.tokens != plain.tokens


def test_top_k_top_p_known_answer():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda k, p: torch.isfinite(filter_top_k_top_p(logits, k, p))[0].tolist()  # noqa: E731
    assert kept(2, 1.0) == [True, True, False, False]
    assert kept(0, 0.75) == [True, True, False, False]  # 0.5 < 0.75 <= 0.5 + 0.3
    assert kept(0, 0.85) == [True, True, True, False]
    assert kept(0, 0.01) == [True, False, False, False]  # the most likely token always stays
    assert kept(3, 0.85) == [True, True, True, False]
    assert kept(0, 1.0) == [True, True, True, True]


def test_top_k_top_p_match_transformers():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    for k in (1, 5, 50):
        expected = TopKLogitsWarper(k)(ids, logits.clone())
        assert torch.equal(torch.isfinite(filter_top_k_top_p(logits, k, 1.0)), torch.isfinite(expected))
    for p in (0.1, 0.5, 0.9):
        expected = TopPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(torch.isfinite(filter_top_k_top_p(logits, 0, p)), torch.isfinite(expected))


def test_sampling_frequencies_follow_the_filtered_distribution():
    """Draws from [.5, .3, .15, .05] with top_p=0.75 land on tokens 0 and 1 with odds .625 / .375."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    params = decoding(temperature=1.0, top_p=0.75)
    generator = torch.Generator().manual_seed(0)
    seen = torch.zeros(1, 4, dtype=torch.bool)
    draws = torch.tensor([sample(logits, seen, params, [generator]).item() for _ in range(4000)])
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.625) < 0.03
    # temperature 2 flattens [.5, .3] to sqrt-proportional odds before top-p: .5^.5 / (.5^.5 + .3^.5 + .15^.5) ...
    params = decoding(temperature=2.0)
    draws = torch.tensor([sample(logits, seen, params, [generator]).item() for _ in range(4000)])
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    probs = probs / probs.sum()
    assert (torch.bincount(draws, minlength=4) / 4000 - probs).abs().max() < 0.03


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(tiny):
    model, tokenizer = tiny
    prompts = [chat(tokenizer, q) for q in QUESTIONS[:3]]
    params = decoding(max_new_tokens=16, temperature=1.0, seed=7)
    first = generate(model, tokenizer, prompts, params, batch_size=2)
    again = generate(model, tokenizer, prompts, params, batch_size=3)
    other = generate(model, tokenizer, prompts, decoding(max_new_tokens=16, temperature=1.0, seed=8))
    greedy = generate(model, tokenizer, prompts, decoding(max_new_tokens=16))
    assert [o.tokens for o in first] == [o.tokens for o in again]
    assert [o.tokens for o in first] != [o.tokens for o in other]
    assert [o.tokens for o in first] != [o.tokens for o in greedy]
    # top_k=1 leaves one token to draw: sampling is then greedy
    top1 = generate(model, tokenizer, prompts, decoding(max_new_tokens=16, temperature=1.0, top_k=1))
    assert [o.tokens for o in top1] == [o.tokens for o in greedy]


# -----------------------------------------------------------------------------
# stop strings, stop tokens, prefill, limits


def test_stop_string_cuts_text_and_tokens(tiny):
    model, tokenizer = tiny
    tokenizer = with_stops(tokenizer, ())
    prompt = chat(tokenizer, QUESTIONS[1])
    free = generate(model, tokenizer, [prompt], decoding(max_new_tokens=30))[0]
    # a stop string straddling a boundary between two generated tokens, where it first occurs
    for i in range(3, 25):
        head, tail = tokenizer.decode(free.tokens[:i]), tokenizer.decode(free.tokens[i : i + 2])
        stop = head[-2:] + tail[:2]
        start = len(head) - 2
        if len(stop) == 4 and free.text.find(stop) == start:
            break
    else:
        pytest.fail("the tiny model's output has no boundary to test")
    out = generate(model, tokenizer, [prompt], decoding(30), ("zzz-never", stop))[0]
    assert out.finish_reason == "stop_string"
    assert out.text == free.text[:start]
    # the tokens end with the one that completed the stop string
    n = next(n for n in range(1, 31) if stop in tokenizer.decode(free.tokens[:n]))
    assert out.tokens == free.tokens[:n]


def test_stop_token_is_dropped(tiny):
    model, tokenizer = tiny
    prompt = chat(tokenizer, QUESTIONS[0])
    free = generate(model, with_stops(tokenizer, ()), [prompt], decoding(max_new_tokens=20))[0]
    stop = free.tokens[6]
    first = free.tokens.index(stop)
    out = generate(model, with_stops(tokenizer, {stop}), [prompt], decoding(max_new_tokens=20))[0]
    assert out == Completion(free.tokens[:first], tokenizer.decode(free.tokens[:first]), "stop_token")


def test_prefill_continues_the_assistant_turn(tiny, tiny_hf):
    """A prompt ending inside the assistant turn: its continuation, without the prefill, equals transformers'."""
    model, tokenizer = tiny
    prompt = chat(tokenizer, QUESTIONS[1], prefill="<translated>\n")
    assert tokenizer.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n<translated>\n")
    out = generate(model, tokenizer, [prompt], decoding(max_new_tokens=20))[0]
    assert out.tokens == hf_greedy(tiny_hf, prompt, 20, tokenizer.stop_ids)
    assert not out.text.startswith("<translated>")
    # prefilling the model's own first 5 tokens yields the rest of its answer
    plain = chat(tokenizer, QUESTIONS[1])
    full = generate(model, tokenizer, [plain], decoding(max_new_tokens=20))[0]
    rest = generate(model, tokenizer, [plain + full.tokens[:5]], decoding(max_new_tokens=15))[0]
    assert rest.tokens == full.tokens[5:]


def test_max_new_tokens_and_bad_input(tiny):
    model, tokenizer = tiny
    prompts = [chat(tokenizer, q) for q in QUESTIONS[:3]]
    greedy = generate(model, tokenizer, prompts, decoding(max_new_tokens=9))
    for n in (1, 8, 9):  # around the host's read interval
        outs = generate(model, tokenizer, prompts, decoding(max_new_tokens=n), batch_size=2)
        assert [o.tokens for o in outs] == [g.tokens[:n] for g in greedy]
        assert all(o.finish_reason == "length" for o in outs)
    assert generate(model, tokenizer, [], decoding()) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, tokenizer, [prompts[0], []], decoding())
    with pytest.raises(ValueError, match="prompt 1 holds token id 128256, outside the model's vocabulary of 128256"):
        generate(model, tokenizer, [prompts[0], [5, model.cfg.vocab_size]], decoding())
    with pytest.raises(ValueError, match="finish_reason must be one of"):
        Completion([1], "a", "eos")
    for bad, message in ((dict(max_new_tokens=0), "Decoding.max_new_tokens: 0 is below its least value 1"),
                         (dict(temperature=-1), "Decoding.temperature: -1 is below its least value 0.0"),
                         (dict(top_p=0), "Decoding.top_p: 0 is not greater than 0.0"),
                         (dict(top_k=-1), "Decoding.top_k: -1 is below its least value 0"),
                         (dict(repetition_penalty=0), "Decoding.repetition_penalty: 0 is below its least value 0.01")):
        with pytest.raises(ValueError, match=message):
            decoding(**{"max_new_tokens": 4, **bad})
    for stops in ("</translated>", ("",)):
        with pytest.raises(ValueError, match="stop_strings must be a sequence of non-empty strings"):
            generate(model, tokenizer, prompts, decoding(max_new_tokens=4), stops)
