"""The tokenizer (a `tokenizer.json` run by the `tokenizers` library) and the two chat formats.

    tok = Tokenizer.from_folder("Meta-Llama-3-8B-Instruct")          # format read from the folder
    ids = tok.encode_chat([{"role": "user", "content": "Hola"}])        # ready to generate from
    ids = tok.encode_chat(msgs, prefill="<translated>\\n")               # the reply starts pre-written

- "llama3": <|begin_of_text|>, then <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
  per message (content stripped, as Meta's template does), then the assistant header.
- "chatml" (SmolLM2): <|im_start|>{role}\\n{content}<|im_end|>\\n per message, no BOS; the
  folder's default system message when its template inserts one.
`CHAT_FORMATS` is the one table of their tokens and stops. The format is read from
tokenizer_config.json unless named; the templated string is encoded in one piece with no special
tokens added, as `apply_chat_template` + `encode(add_special_tokens=False)`. Departures: docs/method.md §5.11.
"""

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

# the chat formats lidr writes: the special tokens each needs (each one token of the folder's tokenizer),
# the token a turn ends with (a trained response ends with it; generation stops on it) and the other stops
CHAT_FORMATS = {
    "llama3": {"tokens": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               "end_of_turn": "<|eot_id|>", "stops": ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")},
    "chatml": {"tokens": ("<|im_start|>", "<|im_end|>"), "end_of_turn": "<|im_end|>",
               "stops": ("<|im_end|>", "<|endoftext|>")},
}


class Tokenizer:
    def __init__(self, tokenizer_json: str | Path, chat_format: str, default_system: str | None = None):
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown chat format {chat_format!r}; choose one of {tuple(CHAT_FORMATS)}")
        self.path = Path(tokenizer_json)
        self.tok = read_tokenizer_json(self.path)
        self.chat_format = chat_format
        self.default_system = default_system
        llama3 = chat_format == "llama3"
        self.bos_id = self._special_id("<|begin_of_text|>") if llama3 else None
        self.pad_id = self._special_id("<|end_of_text|>" if llama3 else "<|endoftext|>")
        self.end_of_turn_id = self._special_id(CHAT_FORMATS[chat_format]["end_of_turn"])
        stops = CHAT_FORMATS[chat_format]["stops"]
        self.stop_ids = frozenset(i for i in map(self.tok.token_to_id, stops) if i is not None)

    @classmethod
    def from_folder(cls, folder: str | Path, chat_format: str | None = None) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json in the checkpoint folder")
        config_path = folder / "tokenizer_config.json"
        template = ""
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{config_path}: not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: not a JSON object")
            template = config.get("chat_template") or ""
            if isinstance(template, list):  # a list of named templates: take the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), "")
        if chat_format is None:
            chat_format = detect_chat_format(template, read_tokenizer_json(path), path)
        default_system = None
        if chat_format == "chatml":
            found = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", template)
            default_system = found.group(1) if found else None
        return cls(path, chat_format, default_system)

    def _special_id(self, token: str) -> int:
        token_id = self.tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.path}: the {self.chat_format} chat format needs token {token!r}, which is absent")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, prefill: str = "") -> str:
        """The chat as text; `prefill` starts the assistant's reply (it implies the generation prompt)."""
        for i, m in enumerate(messages):
            if not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"message {i} needs a role (system/user/assistant) and a string content: {m!r}")
        if self.chat_format == "llama3":
            text = "<|begin_of_text|>" + "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
            )
            header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
        else:
            if self.default_system and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": self.default_system}, *messages]
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            header = "<|im_start|>assistant\n"
        if add_generation_prompt or prefill:
            text += header + prefill
        return text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, prefill: str = "") -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, prefill))


def read_tokenizer_json(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on a malformed file
        raise ValueError(f"{path}: cannot read tokenizer ({e})") from None


def chat_messages(user: str, system: str | None = None) -> list[dict]:
    """One user turn, after a system turn when `system` is non-empty (None or "": the template's own)."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def detect_chat_format(template: str, tok: HFTokenizer, path: Path) -> str:
    if "<|start_header_id|>" in template or (not template and tok.token_to_id("<|start_header_id|>") is not None):
        return "llama3"
    if "<|im_start|>" in template or (not template and tok.token_to_id("<|im_start|>") is not None):
        return "chatml"
    raise ValueError(f"{path}: cannot tell the chat format from the folder; pass chat_format (--chat-format)")
