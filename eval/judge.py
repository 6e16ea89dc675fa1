"""Pairwise judges: which of two outputs answers an instruction better, as a probability.

    judge = HttpJudge("https://api.openai.com/v1", "gpt-4-1106-preview", api_key, cache_path="runs/judge_cache.jsonl")
    judge = LocalJudge(*load("Meta-Llama-3-70B-Instruct", device="cuda", dtype=torch.bfloat16))
    p = judge.prefer_second([(instruction, output_m, output_M), ...])   # P(output M is better), or None

The judge protocol is the paper's, verbatim: alpaca_eval's `weighted_alpaca_eval_gpt4_turbo`
annotator with the multilingual prompt of the LIDR repository, shipped in
eval/weighted_alpaca_eval_gpt4_turbo_multilingual/ (the prompt file, its configs.yaml, where they come
from and their licence). The prompt is filled as alpaca_eval fills it (`{instruction}`, then
`{output_1}`, then `{output_2}`, each the first occurrence in the text so far) and cut into system
and user messages at its `<|im_start|>role` ... `<|im_end|>` marks as alpaca_eval's prompt_to_chatml
does. Output 1 is shown as model `m`, output 2 as model `M`; the judge answers with one token, `m` or
`M`, and its soft preference is read from the probabilities of those two tokens:

    P(M better) = 1 − p(m) / (p(m) + p(M))      (alpaca_eval's preference − 1; 2 means output_2 won)

- `HttpJudge` asks an OpenAI-compatible chat-completions endpoint with configs.yaml's settings (one
  token, temperature 1, top_p 1, the top-5 log-probabilities) and scores them as alpaca_eval's
  logprob_parser: exactly the tokens `m` and `M` count; when neither is among the five, the item has
  no verdict (None) and is left out, as alpaca_eval leaves out its NaN preferences.
  HTTP 429, 5xx, timeouts (a server that accepts the connection and never answers: --timeout
  seconds) and dropped connections are retried with exponential backoff (a Retry-After header
  wins), then stop the run with the URL, the number of attempts and the last error; other HTTP
  errors and malformed bodies stop it at once with the URL and the body (a command: in one sentence,
  the verdicts so far kept). Every answer (its top log-probabilities) is cached on disk under a
  hash of (judge model, messages): a rerun, or a second language or model that repeats a
  comparison, never pays twice (one process at a time per cache file: it is locked; and only the
  cache's own file is appended to, CACHE.made-from.json says so: a file of the user's is refused).
- `LocalJudge` runs any lidr checkpoint on the same messages: one forward pass per comparison, and
  the two logits of the answer tokens at the first reply position, P(M better) = σ(logit_M − logit_m).
  A prompt longer than the model's context gives no verdict (None).

`judge_both_orders` and `judge_random_order` turn a judge into P(first output of a pair beats
the second) for a list of pairs: both orders averaged (cancels position bias, costs two calls),
or one order per pair drawn from a hash of the pair's key (cancels it on average). In the
statistics, items with no verdict are left out of n and counted (no_verdict); the hard win rate
counts a preference of exactly one half as half a win.
`win_rate` is 100 × the mean preference with its standard error, 100 × sd / √n.

How this departs from alpaca_eval: alpaca_eval draws each pair's order at random (seeded by the
instruction); here the draw is a hash of the pair's key, so reruns ask the same questions, and
--both-orders is a choice alpaca_eval does not offer. alpaca_eval scores a pair of identical outputs
as a tie without asking; here the judge is asked. The local judge reads p(m) and p(M) from the whole
distribution, so it always has a verdict, where the endpoint's is limited to its top five tokens.
"""

import argparse
import hashlib
import http.client
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from lidr.harness.outputs import ResumableWriter, check_output, record_output

# alpaca_eval's weighted_alpaca_eval_gpt4_turbo annotator with the multilingual prompt, as the paper ran it
PROTOCOL_DIR = Path(__file__).parent / "weighted_alpaca_eval_gpt4_turbo_multilingual"
TEMPLATE_PATH = PROTOCOL_DIR / "alpaca_eval_clf.txt"
FIELDS = ("instruction", "output_1", "output_2")  # output_1 is shown as model `m`, output_2 as model `M`
# configs.yaml's completions_kwargs, and the top_p alpaca_eval's openai_completions adds
REQUEST_SETTINGS = {"max_tokens": 1, "temperature": 1, "top_p": 1.0, "logprobs": True, "top_logprobs": 5}
START, END = "<|im_start|>", "<|im_end|>"
CACHE_OWNER = "eval.judge cache"  # the answer cache's record names it: a file of the user's is never appended to


def read_template(path: Path = TEMPLATE_PATH) -> str:
    """The judge prompt, checked to name each of FIELDS once, in order (alpaca_eval fills one example per prompt)."""
    template = path.read_text(encoding="utf-8")
    placeholders = re.findall(r"{([^ \s]+?)}", template)  # alpaca_eval's own pattern: JSON braces hold spaces
    if tuple(placeholders) != FIELDS:
        raise ValueError(f"{path}: the judge prompt names the fields {placeholders}; expected {list(FIELDS)} once each")
    if not template.strip().startswith(START) or not template.strip().endswith(END):
        raise ValueError(f"{path}: the judge prompt is not in <|im_start|> ... <|im_end|> chat format")
    return template


JUDGE_TEMPLATE = read_template()


def fill_template(template: str, values: dict[str, str]) -> str:
    """alpaca_eval's make_prompts for one example: each field in turn replaces the first `{field}` of the
    text filled so far (str.replace(..., 1), not str.format, so the template's JSON braces stay as they are)."""
    for field in FIELDS:
        template = template.replace("{" + field + "}", values[field], 1)
    return template


def chatml_messages(prompt: str) -> list[dict]:
    """alpaca_eval's prompt_to_chatml: each block `<|im_start|>role`, a line break, the content up to
    `<|im_end|>`, is one message, role and content stripped of surrounding whitespace. (It also reads
    a role `system name=...`, which this prompt does not use.)"""
    messages = []
    for block in prompt.strip().split(START)[1:]:
        role, _, content = block.partition("\n")
        messages.append({"role": role.strip(), "content": content.split(END, 1)[0].strip()})
    return messages


def judge_messages(instruction: str, output_m: str, output_M: str) -> list[dict]:
    """The chat messages the judge reads: the shipped prompt with the instruction and the two outputs filled in."""
    return chatml_messages(fill_template(JUDGE_TEMPLATE, dict(zip(FIELDS, (instruction, output_m, output_M)))))


def logprob_preference(top_logprobs: list[tuple[str, float]]) -> float | None:
    """P(M better) from the judge's top log-probabilities of its one answer token, as alpaca_eval's
    logprob_parser (numerator "m", denominator ["m", "M"], not binarized): tokens compare as they are
    (" m" is not "m"); one of the two absent has probability 0; both absent is no verdict (None).

    alpaca_eval's preference is 2 − p(m) / (p(m) + p(M)), in [1, 2], 2 meaning output_2 (`M`) is
    better; this returns that preference − 1, whose mean × 100 is its win rate.
    """
    logprobs = {token: float(logprob) for token, logprob in top_logprobs if token in ("m", "M")}
    if not logprobs or max(logprobs.values()) == -math.inf:
        return None
    logprob_m, logprob_M = logprobs.get("m", -math.inf), logprobs.get("M", -math.inf)
    denominator = max(logprob_m, logprob_M) + math.log1p(math.exp(-abs(logprob_m - logprob_M)))  # logsumexp
    return 1.0 - math.exp(logprob_m - denominator)


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
        for name, value, least in (("max_retries", max_retries, 0), ("workers", workers, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"HttpJudge {name}: {value!r} is not a whole number of at least {least}")
        for name, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HttpJudge {name}: {value!r} is not a number of seconds above 0")
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.max_backoff, self.sleep = max_retries, backoff, max_backoff, sleep
        self.workers = workers
        self.name = model
        self.identity = {"url": self.url, "model": model}  # what an output judged by it records
        self.cache = None
        if cache_path:
            check_output(cache_path, CACHE_OWNER, {})  # the cache or nothing there: never a file of the user's
            self.cache = ResumableWriter(cache_path, key="key")
            record_output(cache_path, CACHE_OWNER, {})
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
        """{"top_logprobs": [[token, logprob], ...], "text"} of the one answer token of a comparison,
        from the cache or the endpoint."""
        key = self.cache_key(messages)
        if key in self.cached:
            return self.cached[key]
        body = self.post({"model": self.model, "messages": messages, **REQUEST_SETTINGS})
        try:
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
            top = [[entry["token"], float(entry["logprob"])]
                   for entry in choice["logprobs"]["content"][0]["top_logprobs"]]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise JudgeError(f"{self.url}: malformed response body (no {e!s} in the chat-completions "
                             f"answer with log-probabilities): {json.dumps(body)[:300]}") from None
        row = {"key": key, "judge": self.model, "top_logprobs": top, "text": text}
        with self.lock:
            if key not in self.cached:
                if self.cache:
                    self.cache.write(row)
                self.cached[key] = row
        return row

    def prefer_second(self, triples: list[tuple[str, str, str]], progress: bool = True) -> list[float | None]:
        def one(triple):
            return logprob_preference(self.ask(judge_messages(*triple))["top_logprobs"])

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
        self.identity = identity  # what an output judged by it records (lidr.harness.outputs.folder_identity)
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

    The caller binds `writer`'s file to the texts judged (lidr.harness.outputs.bind_outputs): a rerun on
    regenerated outputs is refused there, so every row here is about these texts.
    """
    judge_pairs = judge_both_orders if both_orders else judge_random_order
    todo = [pair for pair in pairs if str(pair["key"]) not in writer.done]
    with tqdm(total=len(todo), desc=desc, unit="pair", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            try:
                results = judge_pairs(judge, chunk, progress=False)
            except JudgeError as e:  # the endpoint gave up, or answered nonsense: the verdicts so far stay
                raise SystemExit(f"{e}; the {len(writer.done)} verdict(s) in {writer.path} are kept: rerun the same "
                                 f"command to resume") from None
            for pair, result in zip(chunk, results):
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
    from lidr.cli import positive_int, setting_type

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
    group.add_argument("--max-retries", type=setting_type(int, {"low": 0}), default=8,
                       help="http: retries per request (default: %(default)s)")
    group.add_argument("--timeout", type=setting_type(float, {"above": 0}), default=120.0,
                       help="http: seconds to wait for an answer before retrying (default: %(default)s)")
    group.add_argument("--judge-device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="local: device (default: %(default)s)")
    group.add_argument("--judge-batch-size", type=positive_int, default=4, help="local: comparisons per forward pass")
    group.add_argument("--both-orders", action="store_true",
                       help="judge every pair in both orders and average (twice the calls; cancels position bias)")


def make_judge(args):
    """The judge the flags name, every requirement checked before any work (the key OpenAI's endpoint
    needs, the local checkpoint, the cache's owner); one sentence when one is not met."""
    if args.judge == "http":
        api_key = os.environ.get(args.api_key_env)
        if not api_key and urllib.parse.urlparse(args.base_url).hostname == "api.openai.com":
            raise SystemExit(f"--judge http at {args.base_url} needs an API key, and ${args.api_key_env} is not set: "
                             f"export it, or name another variable with --api-key-env")
        return HttpJudge(args.base_url, args.judge_model, api_key, cache_path=args.cache, timeout=args.timeout,
                         max_retries=args.max_retries, workers=args.workers)
    from lidr.harness.outputs import folder_identity
    from lidr.harness.sampled import open_model

    folder = Path(args.judge_model)
    if not folder.is_dir():
        raise SystemExit(f"--judge local needs --judge-model to be a checkpoint folder; {folder} is not one")
    identity = folder_identity(folder)
    model, tokenizer = open_model(folder, args.judge_device)
    try:
        return LocalJudge(model, tokenizer, batch_size=args.judge_batch_size, name=folder.resolve().name,
                          identity=identity)
    except ValueError as e:  # its tokenizer cannot say `m` or `M` in one token
        raise SystemExit(str(e)) from None


def judge_folder_name(args) -> str:
    """judge-{name}[-both]: one folder of judgements per judge and order mode."""
    from eval.common import slug

    name = args.judge_model if args.judge == "http" else "local-" + Path(args.judge_model).resolve().name
    return "judge-" + slug(name) + ("-both" if args.both_orders else "")
