"""The paper's settings, each written once: what every command, iterate.py and the demo start from.

    settings.ANSWERS.max_new_tokens                                  # 2400: M_t answering the prompts
    dataclasses.replace(settings.TRANSLATION, max_new_tokens=64)     # a caller's visible override
    python train_dpo.py --help                                       # every Training field, as a flag

Every setting is a dataclass field made by `setting`: its default, where it comes from (the LIDR
paper and repository; LLaMA-Factory's defaults where the paper is silent; else lidr's choice,
marked so), its help and its range. The command lines are generated from these fields
(lidr/cli), a run records them (`provenance`), and a value out of range is refused when the
dataclass is built. One seed rule for every random choice: an item's generator is seeded with
`derived_seed(seed, its key)` (a row's tokens: its language and input line; a pair's language: its
prompt id; SDRRL's code-switching: id, language, part; training's row order: the epoch), so no
choice depends on the other items, the batch or the rank. Departures: docs/method.md §4 and §5.12.
"""

import hashlib
import json
import math
import random
from dataclasses import MISSING, dataclass, field, fields

from lidr.tokenizer import CHAT_FORMATS

# the system turn of the LIDR repository's Llama 3 template, for answers, translations and both evaluations
SYSTEM_PROMPT = "You are a helpful assistant."

# prompts decoded together per process: a throughput setting, not the paper's (it used vLLM)
SAMPLING_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32
# the preference losses of lidr/dpo.py (sigmoid: DPO, the paper's)
LOSSES = ("sigmoid", "ipo", "robust", "hinge")
# the compute dtypes, by torch's names (float16 is left out: training in it needs loss scaling)
DTYPES = ("float32", "bfloat16")
# where the trainer mirrors its logged numbers besides OUT/log.jsonl (lidr/harness/tracking.py)
REPORT_TO = ("none", "tensorboard", "wandb")


def below_one(value: float) -> str | None:
    """A setting's check: an AdamW β must be below 1."""
    return None if value < 1 else f"{value} is not below 1"


def derived_seed(seed: int, *key) -> int:
    """The seed of the generator for the item `key` of a stage seeded with `seed` (the module docstring's rule):
    63 bits of sha256 over seed and key, written as JSON (so 3 and "3" are different keys)."""
    digest = hashlib.sha256(json.dumps([seed, *key]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seeded(seed: int, *key) -> random.Random:
    """A random.Random for the item `key` of a stage seeded with `seed`."""
    return random.Random(derived_seed(seed, *key))


# user turns by name (--prompt-template NAME): the LIDR repository's MGSM and GSM8K prompt
# (utils/inference.py PROMPT_PREFIX, used with --with_prefix by scripts/batch_inference.sh for the
# "Arithmetic reasoning task" and by the MGSM evaluation); "{instruction}" alone asks the prompt as it is
PROMPT_TEMPLATES = {
    "plain": "{instruction}",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request in {language}. Please answer in {language}.\n\n### Instruction:\n{instruction}\n\n"
              "### Response:\n",
}


def template_text(template: str) -> str:
    """The text of a prompt template given by name (PROMPT_TEMPLATES) or as a text with {instruction}."""
    text = PROMPT_TEMPLATES.get(template, template)
    if "{instruction}" not in text:
        raise ValueError(f"prompt template {template!r} is neither a name ({', '.join(PROMPT_TEMPLATES)}) nor a text "
                         f"with {{instruction}}")
    return text


def template_problem(template: str) -> str | None:
    """Why `template` is not a prompt template, or None (a setting's check)."""
    try:
        template_text(template)
    except ValueError as e:
        return str(e)
    return None


def user_turn(template: str, instruction: str, lang: str | None = None) -> str:
    """The user turn a prompt becomes: the template with {instruction} and {language} (the language's name,
    English for en) filled in; a template naming {language} needs `lang`."""
    from lidr.languages import language_name

    text = template_text(template)
    if "{language}" in text:
        if lang is None:
            raise ValueError(f"prompt template {template!r} names {{language}}: say which language the prompts are in")
        text = text.replace("{language}", language_name(lang))
    return text.replace("{instruction}", instruction)  # last: braces inside the instruction stay as they are


def setting(default, help: str, *, low=None, high=None, above=None, zero_or_from=None, choices=None, check=None,
            provenance: bool = True):
    """A dataclass field that is also a command-line flag (default MISSING: a required field): `help`
    says what it is and where its default comes from; low/high (inclusive) and above (exclusive)
    bound a number, zero_or_from refuses the values strictly between 0 and it (0 is a mode of its
    own, e.g. greedy), choices bound a text, check(value) -> why the value is refused or None, for
    any other rule. provenance False: the value does not change what a run computes (e.g. how often
    it saves) and is left out of its record."""
    bounds = {k: v for k, v in (("low", low), ("high", high), ("above", above), ("zero_or_from", zero_or_from),
                                ("choices", choices), ("check", check)) if v is not None}
    return field(default=default, metadata={"help": help, "provenance": provenance, **bounds})


def out_of_range(value, meta) -> str | None:
    """Why `value` is not a valid value of a setting whose field has the metadata `meta`, or None."""
    if value is not None and "check" in meta:
        problem = meta["check"](value)
        if problem:
            return problem
    if value is None or isinstance(value, (bool, str)):
        choices = meta.get("choices")
        if value is not None and choices is not None and value not in choices:
            return f"{value!r} is not one of {', '.join(map(repr, choices))}"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if "low" in meta and value < meta["low"]:
        return f"{value} is below its least value {meta['low']}"
    if "high" in meta and value > meta["high"]:
        return f"{value} is above its greatest value {meta['high']}"
    if "above" in meta and value <= meta["above"]:
        return f"{value} is not greater than {meta['above']}"
    if "zero_or_from" in meta and 0 < value < meta["zero_or_from"]:
        return f"{value} is neither 0 nor at least {meta['zero_or_from']}"
    return None


class SettingsError(ValueError):
    """A setting out of its range, or two settings that do not go together: `flag` names the first
    (lidr.cli's `command` says it in one sentence, a flag's name in place of the field's)."""

    def __init__(self, values, name: str, problem: str):
        super().__init__(f"{type(values).__name__}.{name}: {problem}")
        self.flag, self.problem = "--" + name.replace("_", "-"), problem


def check_settings(values):
    """SettingsError naming the first setting of the dataclass `values` that is out of its range."""
    for f in fields(values):
        problem = out_of_range(getattr(values, f.name), f.metadata)
        if problem:
            raise SettingsError(values, f.name, problem)


def provenance(values) -> dict:
    """The settings that change what a run computes, by name: what a run's record holds."""
    return {f.name: getattr(values, f.name) for f in fields(values) if f.metadata.get("provenance", True)}


@dataclass(frozen=True)
class Decoding:
    """How one stage asks and samples: the user turn's template, the system turn before it, and the sampler's settings.

    temperature 0 is greedy (top_p and top_k then do nothing); the repetition penalty has vLLM's
    meaning (prompt and generated tokens, a seen token's logit l becomes l / r if l > 0 else l * r);
    a row samples with derived_seed(seed, its language, its input line) (the module docstring's
    rule). system None (or "") leaves the chat template's own. The prompt template is applied before
    the sampler, to the prompt's text (`user_turn`).
    """

    max_new_tokens: int = setting(MISSING, "at most this many new tokens per reply; lowered, with a warning, to what the "
                                        "model's context leaves", low=1)
    # below 0.01 (or a temperature below 1e-5, vLLM's greedy threshold) the scaled logits overflow float32: garbage text
    repetition_penalty: float = setting(MISSING, "vLLM's meaning, 1 = off", low=0.01, high=100.0)
    prompt_template: str = setting("plain", "the user turn: a name (plain: the prompt as it is; alpaca: the LIDR "
                                            "repository's 'Below is an instruction...' prompt of its reasoning runs "
                                            "and MGSM) or a text with {instruction} and optionally {language}",
                                   check=template_problem)
    system: str | None = setting(SYSTEM_PROMPT, "system turn before every prompt; '' for none (the chat template's own)")
    temperature: float = setting(0.0, "0 = greedy", low=0.0, zero_or_from=1e-5)
    top_p: float = setting(1.0, "nucleus sampling; 1 = off", above=0.0, high=1.0)
    top_k: int = setting(0, "0 = off", low=0)
    seed: int = setting(0, "a row samples with derived_seed(seed, its language, its input line)", low=0, high=2**62)

    def __post_init__(self):
        check_settings(self)


# LIDR step 2 (generate): vLLM, greedy, repetition penalty 1.1, at most 2,400 new tokens, one sample
ANSWERS = Decoding(max_new_tokens=2400, repetition_penalty=1.1)
# LIDR step 3 (self-translate): greedy, at most 4,096 new tokens, and no repetition penalty: the
# repository's batch_translate.sh sets 1.1 but never passes it, so batch_translate.py's 1.0 applies
TRANSLATION = Decoding(max_new_tokens=4096, repetition_penalty=1.0)
# MGSM: the repository's MGSM script, greedy, repetition penalty 1.1, at most 2,048 new tokens, its
# "Below is an instruction..." user turn
MGSM = Decoding(max_new_tokens=2048, repetition_penalty=1.1, prompt_template="alpaca")
# X-AlpacaEval outputs: greedy, repetition penalty 1.1, at most 2,048 new tokens
ALPACAEVAL = Decoding(max_new_tokens=2048, repetition_penalty=1.1)


@dataclass(frozen=True)
class Training:
    """The trainer's settings (lidr/train.py): M_t -> M_{t+1} with DPO + α·NLL, or SFT.

    The paper trains with LLaMA-Factory; β and α appear in the authors' run names; the optimizer and
    schedule are LLaMA-Factory's defaults for its DPO stage (HF TrainingArguments'); learning rate,
    epochs, batch and length are unpublished and lidr's choice.
    """

    objective: str = setting("dpo", "dpo: DPO + α·NLL on preference pairs (LIDR); sft: NLL on responses (SDRRL)",
                             choices=("dpo", "sft"))
    beta: float = setting(0.1, "β of DPO; the paper's (the authors' run names)", above=0.0)
    alpha: float = setting(1.0, "α, weight of the chosen response's NLL (LLaMA-Factory's pref_ftx); the paper's "
                                "(the authors' run names)", low=0.0)
    lr: float = setting(5e-7, "peak learning rate; unpublished in the paper, lidr's choice (a common DPO rate at 8B)",
                        above=0.0)
    adam_beta1: float = setting(0.9, "AdamW's β1; LLaMA-Factory's default (HF TrainingArguments adam_beta1, which its "
                                     "DPO stage inherits)", low=0.0, check=below_one)
    adam_beta2: float = setting(0.999, "AdamW's β2; LLaMA-Factory's default (HF TrainingArguments adam_beta2)",
                                low=0.0, check=below_one)
    adam_eps: float = setting(1e-8, "AdamW's ε; LLaMA-Factory's default (HF TrainingArguments adam_epsilon)",
                              above=0.0)
    weight_decay: float = setting(0.0, "AdamW's; LLaMA-Factory's default (HF TrainingArguments weight_decay)",
                                  low=0.0)
    lr_scheduler: str = setting("linear", "after the warmup the learning rate falls to 0 at the last step, in a "
                                          "straight line (linear: LLaMA-Factory's default, HF TrainingArguments "
                                          "lr_scheduler_type) or along a half cosine", choices=("linear", "cosine"))
    warmup_ratio: float = setting(0.0, "share of the steps spent warming up linearly; LLaMA-Factory's default (HF "
                                       "TrainingArguments: no warmup)", low=0.0, high=1.0)
    grad_clip: float = setting(1.0, "gradient norm clipping; LLaMA-Factory's default (HF TrainingArguments "
                                    "max_grad_norm)", above=0.0)
    epochs: int = setting(1, "passes over the rows; unpublished, lidr's choice", low=1)
    batch_size: int = setting(4, "pairs (or rows) per rank per micro-batch; lidr's choice", low=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step; lidr's choice", low=1)
    max_len: int = setting(2048, "tokens of prompt + response; a longer prompt keeps its last tokens, a row whose "
                                 "response does not fit is dropped (both counted in OUT/data_report.json); "
                                 "lidr's choice", low=1)
    seed: int = setting(0, "the order of the rows in each epoch: derived_seed(seed, epoch)", low=0, high=2**62)
    save_every: int = setting(100, "steps between checkpoints", low=1, provenance=False)
    activation_checkpointing: bool | None = setting(None, "recompute each block in backward (less memory, ~1/3 more "
                                                           "compute); unset: on CUDA, on when the run needs it to fit "
                                                           "(lidr/harness/memory.py), else off", provenance=False)
    dtype: str | None = setting(None, "compute dtype of parameters and activations; master weights, optimizer state "
                                      "and gradient reduction stay float32 (None: bfloat16 on CUDA, float32 on CPU)",
                                choices=DTYPES)
    chat_format: str | None = setting(None, "None: read from the model folder", choices=tuple(CHAT_FORMATS))
    plain_text: str = setting("chat", "rows of texts (not message lists): chat = the prompt is the chat template's "
                                      "user turn and each response ends with its end-of-turn token (lidr's rows, the "
                                      "paper's); raw = no template, prompt + response as they are (TRL's standard "
                                      "format); message lists always take the template (lidr/train_data.py)",
                              choices=("chat", "raw"))
    loss: str = setting("sigmoid", "the preference loss (lidr/dpo.py): sigmoid is DPO, the paper's; ipo, robust "
                                   "(label-smoothed) and hinge are the common variants", choices=LOSSES)
    length_normalize: bool = setting(False, "divide each log-ratio by its response's token count (LN-DPO; "
                                            "sigmoid, robust, hinge; ipo is per token already)")
    label_smoothing: float = setting(0.0, "ε, the assumed share of flipped preferences, below 0.5: with the sigmoid "
                                          "loss conservative DPO (cDPO), with robust robust DPO; TRL's label_smoothing",
                                     low=0.0, high=0.49)
    eval_split: float = setting(0.0, "share of the prompt ids held out (every row of an id on the same side, drawn "
                                     "with --seed) and scored before, during and after training; 0 = none",
                                low=0.0, high=0.5)
    eval_every: int = setting(0, "steps between scorings of the held-out pairs (besides before and after "
                                 "training); 0 = before and after only", low=0, provenance=False)
    eval_data: str | None = setting(None, "a file (or save_to_disk folder) of held-out pairs, in any format --data "
                                          "takes, scored as --eval-split's are (with them, when both are given); its "
                                          "identity is in the run's record", provenance=False)
    report_to: str = setting("none", "mirror every logged number to TensorBoard (OUT/tensorboard) or Weights & "
                                     "Biases (optional extras: pip install 'lidr[tensorboard]' / 'lidr[wandb]')",
                             choices=REPORT_TO, provenance=False)

    def __post_init__(self):
        check_settings(self)
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise SettingsError(self, "label_smoothing", f"{self.label_smoothing} is for the sigmoid (cDPO) and robust "
                                                         f"losses; the {self.loss} loss has none")
        if self.length_normalize and self.loss == "ipo":
            raise SettingsError(self, "length_normalize", "the ipo loss is per token already")
        if self.eval_every and not (self.eval_split or self.eval_data):
            raise SettingsError(self, "eval_every", f"{self.eval_every} scores the held-out pairs every so many "
                                                    f"steps, but none are held out: give --eval-split or --eval-data")


TRAINING = Training()
