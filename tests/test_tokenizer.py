"""Chat formats and the tokenizer against the real Llama 3 tokenizer and transformers' chat templates."""

import json
import shutil

import pytest
from helpers import LLAMA3_TEMPLATE, llama3_tokenizer_json

from lidr.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Combien font 26 + 28 ?"},
    {"role": "assistant", "content": "26 + 28 = 54."},
    {"role": "user", "content": "Et 54 + 1 ?"},
]
MULTILINGUAL = [
    "Il était une fois, à 12 h 30, un café « crème ».",
    "Сколько яблок у Тома? Ответ: 54.",
    "汤姆有26个苹果，他又买了28个。",
    "ทอมมีแอปเปิ้ล 26 ลูก",
    "টমের কাছে ২৬টি আপেল আছে।",
    "混合 text — with emoji 🍎 and tabs\tand\nnewlines  ",
]


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3_tok")
    shutil.copy(llama3_tokenizer_json(), folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE}))
    return folder


def test_llama3_chat_ids_equal_the_hand_built_string(llama3_folder):
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer.from_folder(llama3_folder)
    assert tok.chat_format == "llama3"
    by_hand = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in CONVERSATION
    ) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    expected = HFTokenizer.from_file(str(llama3_folder / "tokenizer.json")).encode(by_hand, add_special_tokens=False).ids
    ids = tok.encode_chat(CONVERSATION)
    assert ids == expected
    assert ids.count(128000) == 1 and ids[0] == 128000
    assert ids[-4:] == [128006, 78191, 128007, 271]  # <|start_header_id|>assistant<|end_header_id|>\n\n
    assert tok.stop_ids == {128001, 128009}


def test_llama3_chat_ids_equal_transformers_template(llama3_folder):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_folder(llama3_folder)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(llama3_folder / "tokenizer.json"), bos_token="<|begin_of_text|>")
    ref.chat_template = LLAMA3_TEMPLATE
    for add in (True, False):
        text = ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add)
        assert tok.render_chat(CONVERSATION, add_generation_prompt=add) == text
        assert tok.encode_chat(CONVERSATION, add_generation_prompt=add) == ref.encode(text, add_special_tokens=False)


def test_prefill_continues_the_assistant_turn(llama3_folder):
    tok = Tokenizer.from_folder(llama3_folder)
    messages = [{"role": "user", "content": "Translate"}]
    with_prefill = tok.encode_chat(messages, prefill="<translated>\n")
    assert with_prefill[: len(tok.encode_chat(messages))] == tok.encode_chat(messages)
    assert tok.decode(with_prefill).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n<translated>\n")
    assert 128009 not in with_prefill[-4:]  # the turn stays open


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_decode_round_trips_multilingual_text(llama3_folder, text):
    tok = Tokenizer.from_folder(llama3_folder)
    assert tok.decode(tok.encode(text)) == text


def test_chat_format_detection_and_override(llama3_folder, tmp_path):
    # a ChatML template over Llama 3's vocabulary: detection follows the template, the override wins
    mislabelled = tmp_path / "mislabelled"
    mislabelled.mkdir()
    shutil.copy(llama3_folder / "tokenizer.json", mislabelled / "tokenizer.json")
    (mislabelled / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|im_start|>{{ m }}"}))
    with pytest.raises(ValueError, match=r"the chatml chat format needs token '<\|endoftext\|>'"):
        Tokenizer.from_folder(mislabelled)
    assert Tokenizer.from_folder(mislabelled, chat_format="llama3").encode_chat(CONVERSATION) == Tokenizer.from_folder(
        llama3_folder
    ).encode_chat(CONVERSATION)
    plain = tmp_path / "plain"
    plain.mkdir()
    # a vocabulary with neither format's special tokens and no template: the user must choose
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    HFTokenizer(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(plain / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"cannot tell the chat format .* pass chat_format \(--chat-format\)"):
        Tokenizer.from_folder(plain)
    with pytest.raises(ValueError, match=r"the llama3 chat format needs token '<\|begin_of_text\|>'"):
        Tokenizer.from_folder(plain, chat_format="llama3")
    # no template, but Llama 3's special tokens: detected from the vocabulary
    (llama3_folder / "tokenizer_config.json").rename(tmp_path / "saved_config.json")
    try:
        assert Tokenizer.from_folder(llama3_folder).chat_format == "llama3"
    finally:
        (tmp_path / "saved_config.json").rename(llama3_folder / "tokenizer_config.json")


def test_a_corrupt_tokenizer_json_is_named_also_while_detecting_the_format(llama3_folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text(llama3_folder.joinpath("tokenizer.json").read_text()[:5000])
    with pytest.raises(ValueError, match=rf"{broken / 'tokenizer.json'}: cannot read tokenizer"):
        Tokenizer.from_folder(broken)  # no template: the format is read from the vocabulary
    (broken / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(ValueError, match=rf"{broken / 'tokenizer_config.json'}: not valid JSON"):
        Tokenizer.from_folder(broken)
