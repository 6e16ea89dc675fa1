"""Pairwise judges: which of two outputs answers an instruction better, as a probability.

    judge = HttpJudge("https://api.openai.com/v1", "gpt-4-1106-preview", api_key, cache_path="runs/judge_cache.jsonl")
    judge = LocalJudge(*load("Meta-Llama-3-70B-Instruct", device="cuda", dtype=torch.bfloat16))
    p = judge.prefer_second([(instruction, output_m, output_M), ...])   # P(output M is better), or None

The judge sees the instruction and two outputs labelled `m` and `M` (JUDGE_SYSTEM, JUDGE_PROMPT) and
answers with one token, `m` or `M`. Its soft preference is read from the probabilities of those
two tokens, normalised to sum to one, as alpaca_eval's "weighted" annotators do:

    P(M better) = p(M) / (p(m) + p(M))

- `HttpJudge` asks an OpenAI-compatible chat-completions endpoint for one token with its top-5
  log-probabilities (every top token that reads `m` or `M` once stripped of spaces counts). When
  neither is among them, the answer text decides (1 or 0); anything else is no verdict (None).
  HTTP 429, 5xx, timeouts (a server that accepts the connection and never answers: --timeout
  seconds) and dropped connections are retried with exponential backoff (a Retry-After header
  wins), then stop the run with the URL, the number of attempts and the last error; other HTTP
  errors and malformed bodies stop it at once with the URL and the body. Every answer is cached on disk under a hash of (judge model, messages): a rerun, or a
  second language or model that repeats a comparison, never pays twice (one process at a time
  per cache file: the file is appended to, not locked).
- `LocalJudge` runs any lidr checkpoint: one forward pass per comparison, and the two logits of
  the answer tokens at the first reply position, P(M better) = σ(logit_M − logit_m). A prompt
  longer than the model's context gives no verdict (None).

`judge_both_orders` and `judge_random_order` turn a judge into P(first output of a pair beats
the second) for a list of pairs: both orders averaged (cancels position bias, costs two calls),
or one order per pair drawn from a hash of the pair's key (cancels it on average). In the
statistics, items with no verdict are left out of n and counted (no_verdict); the hard win rate
counts a preference of exactly one half as half a win.
`win_rate` is 100 × the mean preference with its standard error, 100 × sd / √n.

How this departs from the paper and alpaca_eval: the prompt wording is lidr's own; it asks for
the instruction's language unless another is requested, as the paper's prompt does. alpaca_eval
draws each pair's order at random; here the draw is a hash, so reruns ask the same questions.
"""

import argparse
import hashlib
import http.client
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from lidr.jsonl import ResumableWriter

JUDGE_SYSTEM = "You are a fair and careful judge of the answers that AI assistants give to people's requests."

JUDGE_PROMPT = (
    "Two AI assistants answered the same instruction. Decide which output serves the person who wrote "
    "the instruction better.\n\n"
    "Weigh whether the output does what was asked, whether it is correct and useful, and whether it is "
    "clear. A longer output is not better for being longer. Language matters: unless the instruction "
    "asks for another language, a good output is written in the language of the instruction, and an "
    "output in a different language fails the instruction.\n\n"
    "[Instruction]\n{instruction}\n\n"
    "[Output m]\n{output_m}\n\n"
    "[Output M]\n{output_M}\n\n"
    "Reply with a single character and nothing else: m if Output m is better, M if Output M is better."
)


def judge_messages(instruction: str, output_m: str, output_M: str) -> list[dict]:
    user = JUDGE_PROMPT.format(instruction=instruction, output_m=output_m, output_M=output_M)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def normalised_preference(p_m: float, p_M: float) -> float | None:
    """P(M better) = p(M) / (p(m) + p(M)); None when neither token has any probability."""
    total = p_m + p_M
    return p_M / total if total > 0 else None


class JudgeError(RuntimeError):
    pass


# -----------------------------------------------------------------------------
# an OpenAI-compatible chat-completions endpoint


def retry_after_seconds(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date: fall back to the backoff


class HttpJudge:
    """Chat-completions judge over HTTP (urllib), with retries and an on-disk answer cache."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, cache_path=None,
                 timeout: float = 120.0, max_retries: int = 8, backoff: float = 2.0, max_backoff: float = 120.0,
                 workers: int = 8, sleep=time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.max_backoff, self.sleep = max_retries, backoff, max_backoff, sleep
        self.workers = workers
        self.name = model
        self.identity = {"url": self.url, "model": model}  # what an output judged by it records
        self.cache = ResumableWriter(cache_path, key="key") if cache_path else None
        self.cached = {row["key"]: row for row in self.cache.rows} if self.cache else {}
        self.lock = threading.Lock()
        self.calls = 0  # requests that reached the server, retries included

    def cache_key(self, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([self.model, messages], ensure_ascii=False).encode()).hexdigest()

    def post(self, payload: dict) -> dict:
        """The decoded JSON body of a successful call; retries what is worth retrying."""
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = None
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                with self.lock:
                    self.calls += 1
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                break
            except urllib.error.HTTPError as e:
                text = e.read().decode("utf-8", "replace")[:500]
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"{self.url}: HTTP {e.code}: {text}") from None
                last_error, wait = f"HTTP {e.code}: {text}", retry_after_seconds(e.headers)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                last_error = (f"no answer within {self.timeout:g} s" if isinstance(reason, TimeoutError)
                              else f"{type(e).__name__}: {reason}")
            if attempt == self.max_retries:
                raise JudgeError(f"{self.url}: gave up after {attempt + 1} attempts; last error: {last_error}")
            self.sleep(wait if wait is not None else min(self.max_backoff, self.backoff * 2**attempt))
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise JudgeError(f"{self.url}: malformed response body (not JSON): {body[:300]!r}") from None

    def ask(self, messages: list[dict]) -> dict:
        """{"p_m", "p_M", "text"} for one comparison, from the cache or the endpoint."""
        key = self.cache_key(messages)
        if key in self.cached:
            return self.cached[key]
        # temperature 1: the log-probabilities are those of the model itself on any server
        body = self.post({"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 1.0,
                          "logprobs": True, "top_logprobs": 5})
        try:
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
            top = choice["logprobs"]["content"][0]["top_logprobs"]
            probs = {"m": 0.0, "M": 0.0}
            for entry in top:
                token = entry["token"].strip()
                if token in probs:
                    probs[token] += math.exp(float(entry["logprob"]))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise JudgeError(f"{self.url}: malformed response body (no {e!s} in the chat-completions "
                             f"answer with log-probabilities): {json.dumps(body)[:300]}") from None
        row = {"key": key, "judge": self.model, "p_m": probs["m"], "p_M": probs["M"], "text": text}
        with self.lock:
            if key not in self.cached:
                if self.cache:
                    self.cache.write(row)
                self.cached[key] = row
        return row

    def prefer_second(self, triples: list[tuple[str, str, str]], progress: bool = True) -> list[float | None]:
        def one(triple):
            row = self.ask(judge_messages(*triple))
            preference = normalised_preference(row["p_m"], row["p_M"])
            if preference is None and row["text"].strip() in ("m", "M"):
                preference = float(row["text"].strip() == "M")
            return preference

        with ThreadPoolExecutor(self.workers) as pool:
            return list(tqdm(pool.map(one, triples), total=len(triples), desc=f"judge {self.name}",
                             unit="pair", disable=not progress, dynamic_ncols=True))

    def close(self):
        if self.cache:
            self.cache.close()


# -----------------------------------------------------------------------------
# a lidr checkpoint as the judge


class LocalJudge:
    """P(M better) from the next-token logits of the answer tokens `m` and `M`."""

    def __init__(self, model, tokenizer, batch_size: int = 4, name: str = "local", identity=None):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.identity = identity  # what an output judged by it records (lidr.checkpoint.folder_identity)
        ids = {token: tokenizer.encode(token) for token in ("m", "M")}
        for token, token_ids in ids.items():
            if len(token_ids) != 1:
                raise ValueError(f"{tokenizer.path}: the answer {token!r} is {len(token_ids)} tokens; "
                                 "the judge needs one")
        self.answer_ids = torch.tensor([ids["m"][0], ids["M"][0]], device=model.embed_tokens.weight.device)

    @torch.inference_mode()
    def answer_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """[B, 2] logits of (m, M) at the first reply position of each prompt (left-padded batch)."""
        device = self.model.embed_tokens.weight.device
        width = max(map(len, prompts))
        tokens = torch.full((len(prompts), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, ids in enumerate(prompts):
            tokens[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = True
        hidden = self.model(tokens.to(device), attention_mask=mask.to(device), return_hidden=True)[:, -1]
        return (hidden @ self.model.lm_head.weight[self.answer_ids].T).float()

    def prefer_second(self, triples: list[tuple[str, str, str]], progress: bool = True) -> list[float | None]:
        prompts = [self.tokenizer.encode_chat(judge_messages(*t)) for t in triples]
        preferences = [None] * len(prompts)
        fits = sorted((i for i, p in enumerate(prompts) if len(p) <= self.model.cfg.max_seq_len),
                      key=lambda i: len(prompts[i]))
        for start in tqdm(range(0, len(fits), self.batch_size), desc=f"judge {self.name}", unit="batch",
                          disable=not progress, dynamic_ncols=True):
            batch = fits[start:start + self.batch_size]
            logits = self.answer_logits([prompts[i] for i in batch])
            for i, p in zip(batch, torch.sigmoid(logits[:, 1] - logits[:, 0]).tolist()):
                preferences[i] = p
        return preferences

    def close(self):
        pass


# -----------------------------------------------------------------------------
# pairs, orders and win rates


def order_is_swapped(key: str) -> bool:
    """A fixed coin flip per pair key: True puts the pair's second output in position m."""
    return hashlib.sha256(str(key).encode()).digest()[0] % 2 == 1


def judge_random_order(judge, pairs: list[dict], progress: bool = True) -> list[dict]:
    """pairs [{key, instruction, first, second}] -> [{preference: P(first better) or None, orders}]."""
    triples, swapped = [], []
    for pair in pairs:
        swap = order_is_swapped(pair["key"])
        swapped.append(swap)
        triples.append((pair["instruction"], pair["second"], pair["first"]) if swap
                       else (pair["instruction"], pair["first"], pair["second"]))
    results = []
    for swap, p_second in zip(swapped, judge.prefer_second(triples, progress)):
        preference = None if p_second is None else (p_second if swap else 1.0 - p_second)
        results.append({"preference": preference,
                        "orders": {"first_is_M" if swap else "first_is_m": p_second}})
    return results


def judge_both_orders(judge, pairs: list[dict], progress: bool = True) -> list[dict]:
    """Each pair judged as (first=m, second=M) and (second=m, first=M); the preference is the mean."""
    forward = [(p["instruction"], p["first"], p["second"]) for p in pairs]
    backward = [(p["instruction"], p["second"], p["first"]) for p in pairs]
    answers = judge.prefer_second(forward + backward, progress)
    results = []
    for p_second_fwd, p_first_bwd in zip(answers[:len(pairs)], answers[len(pairs):]):
        if p_second_fwd is None or p_first_bwd is None:
            preference = None
        else:
            preference = ((1.0 - p_second_fwd) + p_first_bwd) / 2
        results.append({"preference": preference,
                        "orders": {"first_is_m": p_second_fwd, "first_is_M": p_first_bwd}})
    return results


def judge_resumable(judge, pairs: list[dict], writer: ResumableWriter, both_orders: bool, chunk_size: int = 64,
                    desc: str = "judge") -> int:
    """Judge the pairs [{key, instruction, first, second}] not yet in `writer` (keyed by "key"), a chunk at
    a time, appending {key, preference, orders}; returns how many were judged now.

    The caller binds `writer`'s file to the texts judged (lidr.jsonl.bind_outputs): a rerun on
    regenerated outputs is refused there, so every row here is about these texts.
    """
    judge_pairs = judge_both_orders if both_orders else judge_random_order
    todo = [pair for pair in pairs if str(pair["key"]) not in writer.done]
    with tqdm(total=len(todo), desc=desc, unit="pair", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            for pair, result in zip(chunk, judge_pairs(judge, chunk, progress=False)):
                writer.write({"key": pair["key"], **result})
            bar.update(len(chunk))
    return len(todo)


def win_rate(preferences: list[float]) -> tuple[float | None, float | None]:
    """(100 × mean, 100 × standard error of the mean) of soft preferences in [0, 1]."""
    n = len(preferences)
    if n == 0:
        return None, None
    mean = sum(preferences) / n
    if n == 1:
        return 100 * mean, None
    variance = sum((p - mean) ** 2 for p in preferences) / (n - 1)
    return 100 * mean, 100 * math.sqrt(variance / n)


def summarize_preferences(rows: list[dict]) -> dict:
    """Win rate ± standard error over the rows with a verdict; hard wins count a tie as half."""
    preferences = [r["preference"] for r in rows if r["preference"] is not None]
    rate, se = win_rate(preferences)
    hard = [1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in preferences]
    return {"n": len(preferences), "win_rate": rate, "se": se,
            "hard_win_rate": 100 * sum(hard) / len(hard) if hard else None,
            "no_verdict": len(rows) - len(preferences)}


# -----------------------------------------------------------------------------
# command-line judges


def add_judge_args(parser: argparse.ArgumentParser):
    from lidr.cli import positive_int

    group = parser.add_argument_group("judge")
    group.add_argument("--judge", choices=("http", "local"), required=True,
                       help="http: an OpenAI-compatible endpoint; local: a lidr checkpoint folder")
    group.add_argument("--judge-model", default="gpt-4-1106-preview",
                       help="http: model name (default: %(default)s, the paper's judge); local: checkpoint folder")
    group.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                       help="http: endpoint base URL (default: $OPENAI_BASE_URL or %(default)s)")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="http: environment variable that holds the API key (default: %(default)s)")
    group.add_argument("--cache", default="runs/judge_cache.jsonl",
                       help="http: answer cache shared by every run (default: %(default)s)")
    group.add_argument("--workers", type=positive_int, default=8,
                       help="http: concurrent requests (default: %(default)s)")
    group.add_argument("--max-retries", type=int, default=8, help="http: retries per request (default: %(default)s)")
    group.add_argument("--timeout", type=float, default=120.0,
                       help="http: seconds to wait for an answer before retrying (default: %(default)s)")
    group.add_argument("--judge-device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="local: device (default: %(default)s)")
    group.add_argument("--judge-batch-size", type=positive_int, default=4, help="local: comparisons per forward pass")
    group.add_argument("--both-orders", action="store_true",
                       help="judge every pair in both orders and average (twice the calls; cancels position bias)")


def make_judge(args):
    if args.judge == "http":
        return HttpJudge(args.base_url, args.judge_model, os.environ.get(args.api_key_env), cache_path=args.cache,
                         timeout=args.timeout, max_retries=args.max_retries, workers=args.workers)
    from lidr.checkpoint import default_dtype, folder_identity, load

    folder = Path(args.judge_model)
    if not folder.is_dir():
        raise SystemExit(f"--judge local needs --judge-model to be a checkpoint folder; {folder} is not one")
    identity = folder_identity(folder)
    try:
        model, tokenizer = load(folder, device=args.judge_device, dtype=default_dtype(args.judge_device))
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    return LocalJudge(model, tokenizer, batch_size=args.judge_batch_size, name=folder.name, identity=identity)


def judge_folder_name(args) -> str:
    """judge-{name}[-both]: one folder of judgements per judge and order mode."""
    from eval.common import slug

    name = args.judge_model if args.judge == "http" else "local-" + Path(args.judge_model).name
    return "judge-" + slug(name) + ("-both" if args.both_orders else "")
