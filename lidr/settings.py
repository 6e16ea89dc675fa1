"""The paper's settings, each written once: what every command, iterate.py and the demo start from.

    from lidr import settings
    settings.ANSWERS.max_new_tokens          # 2400: LIDR step 2, M_t answering the prompts
    dataclasses.replace(settings.TRANSLATION, max_new_tokens=64)   # a caller's visible override

Each value says where it comes from (docs/method.md: the LIDR paper, arXiv 2410.08964, and its public
repository). The command lines take their defaults from here and say so in their help ("default:
the paper's, 1.1"); the demo and small models override a value at the call site, where a reader
sees it (dataclasses.replace), never here.

How this departs from the paper: nothing, for the values the paper or its repository gives. The
training values it does not publish (learning rate, epochs, batch, length) are lidr's choices and
are marked as such below.
"""

from dataclasses import dataclass

# the system turn of the LIDR repository's Llama 3 template, for answers, translations and both evaluations
SYSTEM_PROMPT = "You are a helpful assistant."

# prompts decoded together per process: a throughput setting, not the paper's (it used vLLM)
SAMPLING_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32


@dataclass(frozen=True)
class Decoding:
    """How one stage samples: the system turn before each prompt, and the sampler's settings.

    temperature 0 is greedy (top_p and top_k then do nothing); the repetition penalty has vLLM's
    meaning (prompt and generated tokens, a seen token's logit l becomes l / r if l > 0 else l * r);
    row i samples with seed + its input line. system None (or "") leaves the chat template's own.
    """

    max_new_tokens: int
    repetition_penalty: float
    system: str | None = SYSTEM_PROMPT
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


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

    objective: str = "dpo"  # "dpo": DPO + α·NLL on preference pairs (LIDR); "sft": NLL on responses (SDRRL)
    beta: float = 0.1  # β of DPO: the authors' run names
    alpha: float = 1.0  # α, weight of the chosen response's NLL (LLaMA-Factory's pref_ftx): the run names
    lr: float = 5e-7  # unpublished; lidr's choice, a common DPO learning rate at 8B
    weight_decay: float = 0.0  # unpublished; lidr's choice
    warmup_ratio: float = 0.1  # share of the steps spent warming up; lidr's choice
    grad_clip: float = 1.0  # lidr's choice
    epochs: int = 1  # unpublished; lidr's choice
    batch_size: int = 4  # pairs (or rows) per rank per micro-batch; lidr's choice
    grad_accum: int = 1  # micro-batches per optimizer step; lidr's choice
    max_len: int = 2048  # tokens of prompt + response; lidr's choice
    seed: int = 0
    save_every: int = 100  # steps between checkpoints
    activation_checkpointing: bool = False  # recompute each block in backward
    dtype: str | None = None  # compute dtype; None: bfloat16 on CUDA, float32 on CPU
    chat_format: str | None = None  # None: read from the model folder


TRAINING = Training()
