"""The paper's settings, each written once: what every command, iterate.py and the demo start from.

    from lidr import settings
    settings.ANSWERS.max_new_tokens          # 2400: LIDR step 2, M_t answering the prompts
    dataclasses.replace(settings.TRANSLATION, max_new_tokens=64)   # a caller's visible override

Each value says where it comes from (docs/method.md: the LIDR paper, arXiv 2410.08964, and its public
repository). Every setting is written once, as a dataclass field made by `setting`: its default,
its source, its help text and the range of values it accepts. The command lines are generated from
these fields (lidr/cli.py `add_flags`, and `flags_argv` gives the flags back for torchrun
launches), a run's record lists them (`provenance`), and a value outside its range is refused when
the dataclass is built, before anything is written. The demo and small models override a value at
the call site, where a reader sees it (dataclasses.replace), never here.

How this departs from the paper: nothing, for the values the paper or its repository gives. The
training values it does not publish (learning rate, epochs, batch, length) are lidr's choices and
are marked as such below.
"""

import math
from dataclasses import MISSING, dataclass, field, fields

# the system turn of the LIDR repository's Llama 3 template, for answers, translations and both evaluations
SYSTEM_PROMPT = "You are a helpful assistant."

# prompts decoded together per process: a throughput setting, not the paper's (it used vLLM)
SAMPLING_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32


def setting(default, help: str, *, low=None, high=None, above=None, zero_or_from=None, choices=None,
            provenance: bool = True):
    """A dataclass field that is also a command-line flag (default MISSING: a required field): `help` says what it is and where its
    default comes from; low/high (inclusive) and above (exclusive) bound a number, zero_or_from
    refuses the values strictly between 0 and it (0 is a mode of its own, e.g. greedy), choices
    bound a text. provenance False: the value does not change what a run computes (e.g. how often
    it saves) and is left out of its record."""
    bounds = {k: v for k, v in (("low", low), ("high", high), ("above", above), ("zero_or_from", zero_or_from),
                                ("choices", choices)) if v is not None}
    return field(default=default, metadata={"help": help, "provenance": provenance, **bounds})


def out_of_range(value, meta) -> str | None:
    """Why `value` is not a valid value of a setting whose field has the metadata `meta`, or None."""
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


def check_settings(values):
    """ValueError naming the first setting of the dataclass `values` that is out of its range."""
    for f in fields(values):
        problem = out_of_range(getattr(values, f.name), f.metadata)
        if problem:
            raise ValueError(f"{type(values).__name__}.{f.name}: {problem}")


def provenance(values) -> dict:
    """The settings that change what a run computes, by name: what a run's record holds."""
    return {f.name: getattr(values, f.name) for f in fields(values) if f.metadata.get("provenance", True)}


@dataclass(frozen=True)
class Decoding:
    """How one stage samples: the system turn before each prompt, and the sampler's settings.

    temperature 0 is greedy (top_p and top_k then do nothing); the repetition penalty has vLLM's
    meaning (prompt and generated tokens, a seen token's logit l becomes l / r if l > 0 else l * r);
    row i samples with seed + its input line. system None (or "") leaves the chat template's own.
    """

    max_new_tokens: int = setting(MISSING, "at most this many new tokens per reply; lowered, with a warning, to what the "
                                        "model's context leaves", low=1)
    # below 0.01 (or a temperature below 1e-5, vLLM's greedy threshold) the scaled logits overflow float32: garbage text
    repetition_penalty: float = setting(MISSING, "vLLM's meaning, 1 = off", low=0.01, high=100.0)
    system: str | None = setting(SYSTEM_PROMPT, "system turn before every prompt; '' for none (the chat template's own)")
    temperature: float = setting(0.0, "0 = greedy", low=0.0, zero_or_from=1e-5)
    top_p: float = setting(1.0, "nucleus sampling; 1 = off", above=0.0, high=1.0)
    top_k: int = setting(0, "0 = off", low=0)
    seed: int = setting(0, "row i samples with seed + its input line", low=0, high=2**62)  # a torch seed is 64 bits

    def __post_init__(self):
        check_settings(self)


# LIDR step 2 (generate): vLLM, greedy, repetition penalty 1.1, at most 2,400 new tokens, one sample
ANSWERS = Decoding(max_new_tokens=2400, repetition_penalty=1.1)
# LIDR step 3 (self-translate): greedy, at most 4,096 new tokens, and no repetition penalty: the
# repository's batch_translate.sh sets 1.1 but never passes it, so batch_translate.py's 1.0 applies
TRANSLATION = Decoding(max_new_tokens=4096, repetition_penalty=1.0)
# MGSM: the repository's MGSM script, greedy, repetition penalty 1.1, at most 2,048 new tokens
MGSM = Decoding(max_new_tokens=2048, repetition_penalty=1.1)
# X-AlpacaEval outputs: greedy, repetition penalty 1.1, at most 2,048 new tokens
ALPACAEVAL = Decoding(max_new_tokens=2048, repetition_penalty=1.1)


@dataclass(frozen=True)
class Training:
    """The trainer's settings (lidr/train.py): M_t -> M_{t+1} with DPO + α·NLL, or SFT.

    The paper trains with LLaMA-Factory; β and α appear in the authors' run names, the rest is
    unpublished and lidr's choice.
    """

    objective: str = setting("dpo", "dpo: DPO + α·NLL on preference pairs (LIDR); sft: NLL on responses (SDRRL)",
                             choices=("dpo", "sft"))
    beta: float = setting(0.1, "β of DPO; the paper's (the authors' run names)", above=0.0)
    alpha: float = setting(1.0, "α, weight of the chosen response's NLL (LLaMA-Factory's pref_ftx); the paper's "
                                "(the authors' run names)", low=0.0)
    lr: float = setting(5e-7, "peak learning rate; unpublished in the paper, lidr's choice (a common DPO rate at 8B)",
                        above=0.0)
    weight_decay: float = setting(0.0, "AdamW's; unpublished, lidr's choice", low=0.0)
    warmup_ratio: float = setting(0.1, "share of the steps spent warming up; lidr's choice", low=0.0, high=1.0)
    grad_clip: float = setting(1.0, "gradient norm clipping; lidr's choice", above=0.0)
    epochs: int = setting(1, "passes over the rows; unpublished, lidr's choice", low=1)
    batch_size: int = setting(4, "pairs (or rows) per rank per micro-batch; lidr's choice", low=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step; lidr's choice", low=1)
    max_len: int = setting(2048, "tokens of prompt + response; a longer prompt keeps its last tokens, a row whose "
                                 "response does not fit is dropped (both counted in OUT/data_report.json); "
                                 "lidr's choice", low=1)
    seed: int = setting(0, "the order of the rows in each epoch", low=0, high=2**40)  # seed × 1000003 + epoch: 64 bits
    save_every: int = setting(100, "steps between checkpoints", low=1, provenance=False)
    activation_checkpointing: bool = setting(False, "recompute each block in backward (less memory, ~1/3 more "
                                                    "compute)", provenance=False)
    dtype: str | None = setting(None, "compute dtype of parameters and activations; master weights, optimizer state "
                                      "and gradient reduction stay float32 (None: bfloat16 on CUDA, float32 on CPU)",
                                choices=("float32", "bfloat16"))
    chat_format: str | None = setting(None, "None: read from the model folder", choices=("llama3", "chatml"))

    def __post_init__(self):
        check_settings(self)


TRAINING = Training()
