"""Pairwise judges: which of two answers to a prompt is better, as P(the first is better).

A judge maps (prompt, first, second) triples to a probability in [0, 1] that `first` is the
better answer, or a `Failed(reason)` when it gave no usable judgment. Every judge sees each
pair in both orders (eval_winrate.py asks it so), which cancels a judge's position bias.

Whatever a judge gives that is not a finite probability is a failed judgment with its reason,
never a tie and never a traceback: a score or probability that is NaN, infinite, None or not a
number, a reward function or model that raises, a reply that is neither label (`judge_all`
checks every value; the score judges check each score, so one bad answer fails only its pairs).

    rm:PATH          a one-label sequence classifier (a reward model): sigmoid(r_first - r_second)
    lm:PATH          a local causal LM shown the judge prompt through its chat template; the next-token
                     probabilities of the two labels, renormalised (no sampling)
    openai:MODEL     any OpenAI-compatible chat endpoint (vLLM's server, OpenAI, ...): the label it replies
    fn:FILE.py:NAME  a Python reward function NAME(prompt, completions) -> [float, ...] (e.g. the
                     quickstart's VADER oracle): 1 if the first scores higher, 0 if lower, 0.5 if equal

A judge prompt is a text file holding {prompt}, {first} and {second}, which asks for the
label A (the first answer) or B (the second) and nothing else.
"""
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from .fileio import InputError, read_text

LABELS = ("A", "B")
PLACEHOLDERS = ("{prompt}", "{first}", "{second}")


class Failed:
    """A judgment that did not come: counted, reported, never cached."""

    def __init__(self, reason):
        self.reason = reason

    def __repr__(self):
        return f"Failed({self.reason!r})"


def checked(value, what="probability"):
    """`value` as a float when it is a finite number (and, for a probability, in [0, 1]); else
    Failed saying what came instead. Booleans are refused: True is no reward."""
    if isinstance(value, Failed):
        return value
    try:  # a number of any kind (numpy's, a one-element tensor) converts; a string or None does not
        if isinstance(value, (bool, str, bytes)):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        return Failed(f"the judge gave {type(value).__name__} {str(value)[:40]!r}, not a {what}")
    if not math.isfinite(value) or (what == "probability" and not 0 <= value <= 1):
        return Failed(f"the judge gave {value}, not a finite {what}" + (" in [0, 1]" if what == "probability" else ""))
    return value


def raised(err):
    """The reason of a judgment whose judge raised `err`."""
    return f"the judge raised {type(err).__name__}: {str(err)[:200]}"


def answer_text(answer):
    """The text of an answer: a string, an assistant message or a one-element list of one."""
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    return answer["content"] if isinstance(answer, dict) else answer


def prompt_text(prompt):
    """A prompt as the judge reads it: text as is, a conversation one `Role: content` turn a paragraph."""
    if isinstance(prompt, list):
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)
    return prompt


def read_judge_prompt(path):
    template = read_text(path)
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise InputError(f"--judge_prompt {path}: lacks {', '.join(missing)}; a judge prompt holds {{prompt}}, "
                         "{first} and {second}")
    return template


def fill(template, prompt, first, second):
    # one pass, so that braces or placeholders inside a post or an answer are left as they are
    values = {"{prompt}": prompt_text(prompt), "{first}": answer_text(first), "{second}": answer_text(second)}
    return re.sub("|".join(re.escape(p) for p in PLACEHOLDERS), lambda m: values[m.group(0)], template)


class JudgmentCache:
    """Every judgment a judge gave, on disk, one JSON line each, appended as it comes: a killed
    or repeated evaluation reads them back instead of asking again. A line cut by a kill is
    skipped. Keyed on the judge's identity, the prompt and the two answers in their order."""

    def __init__(self, path, judge_id):
        self.path, self.judge_id = path, judge_id
        self.values = {}
        self.lock = threading.Lock()
        if path and os.path.exists(path):
            for line in read_text(path).split("\n"):
                try:
                    entry = json.loads(line)
                    value = checked(entry["p_first"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line a kill cut short
                if not isinstance(value, Failed):  # nothing but probabilities was ever written
                    self.values[entry["key"]] = value
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def key(self, prompt, first, second):
        text = json.dumps([self.judge_id, prompt, first, second], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key):
        return self.values.get(key)

    def put(self, key, value):
        with self.lock:
            self.values[key] = value
            if self.path:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "p_first": value}) + "\n")


def judge_all(judge, triples, cache, progress=None):
    """P(first is better) or Failed for every (prompt, first, second) triple; cached ones are
    not asked again, new ones are cached as each arrives. Returns (values, number taken from the cache)."""
    keys = [cache.key(*t) for t in triples]
    values = [cache.get(k) for k in keys]
    todo = {}  # each distinct triple is asked once: key -> the positions it fills
    for i, (key, value) in enumerate(zip(keys, values)):
        if value is None:
            todo.setdefault(key, []).append(i)
    asked = list(todo.values())
    cached = len(triples) - sum(len(positions) for positions in asked)
    if progress is not None:
        progress.update(cached)

    def done(position, value):
        value = checked(value)
        for i in asked[position]:
            values[i] = value
        if not isinstance(value, Failed):
            cache.put(keys[asked[position][0]], value)
        if progress is not None:
            progress.update(len(asked[position]))

    missing = "the judge gave no judgment"
    if asked:
        try:
            judge.judge([triples[positions[0]] for positions in asked], done)
        except Exception as err:  # noqa: BLE001 -- whatever a judge raises is its judgments' failure
            missing = raised(err)
    for position, positions in enumerate(asked):
        if values[positions[0]] is None:  # the ones it had not given (when it raised)
            done(position, Failed(missing))
    return values, cached


# -- judges ------------------------------------------------------------------------------------
class ScoreJudge:
    """A judge from a score per (prompt, answer): each distinct answer is scored once. A score
    that is not a finite number fails the judgments of its answer; a batch that raises, or
    gives a score too many or too few, fails its answers'."""

    def judge(self, triples, done):
        answers = list({json.dumps([p, a], sort_keys=True): (p, a) for p, f, s in triples for a in (f, s)}.values())
        scores = {}
        for start in range(0, len(answers), self.batch_size):
            batch = answers[start:start + self.batch_size]
            for (p, a), score in zip(batch, self.batch_scores(batch)):
                scores[json.dumps([p, a], sort_keys=True)] = checked(score, "number")
        for i, (p, f, s) in enumerate(triples):
            first, second = scores[json.dumps([p, f], sort_keys=True)], scores[json.dumps([p, s], sort_keys=True)]
            failed = next((x for x in (first, second) if isinstance(x, Failed)), None)
            done(i, failed or self.compare(first, second))

    def batch_scores(self, batch):
        try:
            scores = list(self.scores(batch))
        except Exception as err:  # noqa: BLE001 -- a scorer that raises fails its answers, not the run
            return [Failed(raised(err))] * len(batch)
        if len(scores) != len(batch):
            return [Failed(f"the judge gave {len(scores)} scores for {len(batch)} answers")] * len(batch)
        return scores


class RewardModelJudge(ScoreJudge):
    def __init__(self, path, args):
        import torch
        from .data.tokenisation import Tokenisation
        from .model_utils import check_position_limit, load_reward_model, load_tokenizer, model_fingerprint

        check_position_limit(path, args.max_seq_len, "--max_seq_len", args.trust_remote_code)
        self.torch = torch
        self.batch_size = args.batch_size
        tokenizer = load_tokenizer(path, args.trust_remote_code)
        self.tokenisation = Tokenisation(tokenizer, args.max_seq_len, args.max_gen_len, args.chat_template)
        self.model = load_reward_model(path, tokenizer, args.dtype, args.trust_remote_code, disable_dropout=True).eval()
        # the weights' fingerprint: a model retrained in place is another judge
        self.id = {"judge": f"rm:{model_fingerprint(path)}", "max_seq_len": args.max_seq_len,
                   "max_gen_len": args.max_gen_len, "chat_template": args.chat_template}

    def scores(self, answers):
        from .inference import completion_batch
        from .reward_scoring import reward_scores

        # text answers, each scored as reward-model training scores it (the template's tokens for a message)
        records = [{"prompt": p, "completions": [a]} for p, a in answers]
        with self.torch.no_grad():
            return reward_scores(self.model, completion_batch(self.tokenisation, records)).float().tolist()

    @staticmethod
    def compare(first, second):
        """sigmoid(first - second), without overflow at any reward gap."""
        z = first - second
        return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


class FunctionJudge(ScoreJudge):
    batch_size = 256

    def __init__(self, spec):
        path, sep, name = spec.rpartition(":")
        if not sep or not path.endswith(".py"):
            raise InputError(f"--judge fn:{spec}: expected fn:FILE.py:FUNCTION")
        if not os.path.isfile(path):
            raise InputError(f"--judge fn:{spec}: no such file {path}")
        module_spec = importlib.util.spec_from_file_location(f"judge_{os.path.basename(path)[:-3]}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, name, None)):
            raise InputError(f"--judge fn:{spec}: {path} has no function {name}")
        self.function = getattr(module, name)
        self.id = {"judge": f"fn:{os.path.abspath(path)}:{name}",
                   "code": hashlib.sha256(read_text(path).encode()).hexdigest()}

    def scores(self, answers):
        return [self.score(p, a) for p, a in answers]

    def score(self, prompt, answer):
        """The function's reward of one answer, or Failed when it raises or returns no list of one."""
        try:
            rewards = self.function(prompt, [answer_text(answer)])
        except Exception as err:  # noqa: BLE001 -- the user's function: its failure is this judgment's
            return Failed(raised(err))
        try:
            (reward,) = rewards
        except (TypeError, ValueError):
            return Failed(f"the judge gave {type(rewards).__name__} {str(rewards)[:40]!r}, not a list of one reward")
        return reward

    @staticmethod
    def compare(first, second):
        return 1.0 if first > second else 0.0 if first < second else 0.5


class LocalLMJudge:
    """The judge prompt as the one user turn of the LM's chat template, with its generation
    prompt; P(first) = p(A) / (p(A) + p(B)) at the next token, the labels' first tokens."""

    def __init__(self, path, template, args):
        import torch
        from .model_utils import load_causal_lm, load_tokenizer, model_fingerprint

        self.torch, self.template, self.batch_size = torch, template, args.batch_size
        self.tokenizer = load_tokenizer(path, args.trust_remote_code)
        if not self.tokenizer.chat_template:
            raise InputError(f"--judge lm:{path}: its tokenizer has no chat template; a judge LM is asked through "
                             "one (use an instruct model, or add a template to its tokenizer_config.json)")
        self.label_ids = [self.tokenizer(label, add_special_tokens=False)["input_ids"][:1] for label in LABELS]
        if not all(self.label_ids) or self.label_ids[0] == self.label_ids[1]:
            raise InputError(f"--judge lm:{path}: the labels {' and '.join(LABELS)} do not start with two distinct tokens")
        self.label_ids = [ids[0] for ids in self.label_ids]
        self.model = load_causal_lm(path, self.tokenizer, args.dtype, args.trust_remote_code, disable_dropout=True).eval()
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.id = {"judge": f"lm:{model_fingerprint(path)}", "template": hashlib.sha256(template.encode()).hexdigest()}

    def judge(self, triples, done):
        inputs = []
        for triple in triples:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": fill(self.template, *triple)}],
                                                      tokenize=False, add_generation_prompt=True)
            inputs.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        for start in range(0, len(inputs), self.batch_size):
            batch = [(i, ids) for i, ids in enumerate(inputs[start:start + self.batch_size], start)]
            fits = []
            for i, ids in batch:
                if self.max_positions and len(ids) > self.max_positions:
                    done(i, Failed(f"judge input of {len(ids)} tokens exceeds the judge's {self.max_positions} positions"))
                else:
                    fits.append((i, ids))
            if not fits:
                continue
            padded = self.tokenizer.pad({"input_ids": [ids for _, ids in fits]}, padding_side="left",
                                        return_tensors="pt")
            # positions counted from each row's first real token, so left padding changes nothing
            positions = (padded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with self.torch.no_grad():
                logits = self.model(**padded, position_ids=positions).logits[:, -1].float()
            pair = self.torch.softmax(logits[:, self.label_ids], dim=-1)[:, 0].tolist()
            for (i, _), p in zip(fits, pair):
                done(i, p)


def parse_label(reply):
    """A or B from a reply that starts with one (quotes, markdown or a trailing dot allowed)."""
    match = re.match(r"[\s\"'*(\[]*([A-Za-z]+)\b", reply or "")
    return match.group(1) if match and match.group(1) in LABELS else None


class OpenAIJudge:
    """A chat endpoint asked with the official `openai` client, at temperature 0.

    Up to --judge_concurrency requests in flight; each has --judge_timeout seconds; a 429, a
    5xx, a timeout or a dropped connection is retried --judge_retries times with exponential
    backoff and jitter (a server's Retry-After is honoured). Every attempt counts against
    --max_requests: once it is spent, the judgments left are failed, not asked. An endpoint
    that stays unreachable after the retries is marked down: what is left fails at once
    instead of each waiting through its own retries.
    """

    BACKOFF_CAP_S = 60

    def __init__(self, model, template, args):
        try:
            import openai
        except ImportError:
            raise InputError("--judge openai:...: needs the openai client; pip install -e \".[judge]\"") from None
        self.openai, self.model, self.template = openai, model, template
        key = os.environ.get(args.judge_api_key_env)
        if not key and not args.judge_base_url:
            raise InputError(f"--judge openai:{model}: set {args.judge_api_key_env} (or --judge_api_key_env NAME), or "
                             "--judge_base_url for a local server")
        self.client = openai.OpenAI(base_url=args.judge_base_url, api_key=key or "unused", timeout=args.judge_timeout,
                                    max_retries=0)  # retries here, so every attempt is counted
        self.extra_body = args.judge_extra_body
        self.max_tokens, self.retries, self.backoff = args.judge_max_tokens, args.judge_retries, args.judge_backoff
        self.concurrency = args.judge_concurrency
        self.requests_left = args.max_requests
        self.requests = 0
        self.down = None
        self.lock = threading.Lock()
        self.id = {"judge": f"openai:{model}", "template": hashlib.sha256(template.encode()).hexdigest(),
                   "max_tokens": self.max_tokens, "extra_body": self.extra_body}

    def take_request(self):
        with self.lock:
            if self.requests_left is not None and self.requests_left <= 0:
                return False
            if self.requests_left is not None:
                self.requests_left -= 1
            self.requests += 1
            return True

    def retry_wait(self, attempt, err):
        after = None
        response = getattr(err, "response", None)
        if response is not None:
            try:
                after = float(response.headers.get("retry-after"))
            except (TypeError, ValueError):
                after = None
        wait = after if after is not None else self.backoff * 2 ** attempt
        return min(wait, self.BACKOFF_CAP_S) * (1 + 0.25 * random.random())

    def ask(self, triple):
        openai = self.openai
        messages = [{"role": "user", "content": fill(self.template, *triple)}]
        for attempt in range(self.retries + 1):
            if self.down:
                return Failed(self.down)
            if not self.take_request():
                return Failed("request budget --max_requests spent")
            try:
                reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                            max_tokens=self.max_tokens, extra_body=self.extra_body)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as err:
                if attempt == self.retries:
                    reason = f"{type(err).__name__} after {self.retries + 1} attempts: {err}"
                    if isinstance(err, openai.APIConnectionError) and not isinstance(err, openai.APITimeoutError):
                        self.down = f"endpoint {self.client.base_url} unreachable ({err})"
                    return Failed(reason)
                time.sleep(self.retry_wait(attempt, err))
                continue
            except openai.APIStatusError as err:  # 400, 401, 404, ...: asking again would not help
                return Failed(f"HTTP {err.status_code}: {err.message}"[:300])
            content = reply.choices[0].message.content if reply.choices else None
            label = parse_label(content)
            if label is None:
                return Failed(f"reply is neither label {' nor '.join(LABELS)}: {content!r:.60}")
            return 1.0 if label == LABELS[0] else 0.0
        return Failed("no attempt made")

    def ask_safely(self, triple):
        try:
            return self.ask(triple)
        except Exception as err:  # noqa: BLE001 -- an odd reply or client error fails one judgment
            return Failed(raised(err))

    def judge(self, triples, done):
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self.ask_safely, t): i for i, t in enumerate(triples)}
            for future in as_completed(futures):
                done(futures[future], future.result())


def make_judge(spec, args):
    kind, sep, target = spec.partition(":")
    if not sep or not target or kind not in ("rm", "lm", "openai", "fn"):
        raise InputError(f"--judge {spec!r}: expected rm:PATH, lm:PATH, openai:MODEL or fn:FILE.py:FUNCTION")
    if kind in ("lm", "openai") and not args.judge_prompt:
        raise InputError(f"--judge {spec}: needs --judge_prompt PATH (e.g. exp/tldr_exp/judge_prompt.txt)")
    if kind == "rm":
        return RewardModelJudge(target, args)
    if kind == "fn":
        return FunctionJudge(target)
    template = read_judge_prompt(args.judge_prompt)
    return LocalLMJudge(target, template, args) if kind == "lm" else OpenAIJudge(target, template, args)
