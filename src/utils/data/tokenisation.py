"""The tokenisation rule every stage shares (`Tokenisation`), and the tokenizer's fingerprint.

`tokenizer_fingerprint` identifies what a tokenizer's token ids mean (records of sampled ids
carry it); `Tokenisation.settings_fingerprint` identifies the whole rule's settings (caches key on it).

Tokenisation rule: prompt and completion are tokenised separately; EOS is appended to the
completion, which is then cut on the right to `max_gen_len`; the prompt is cut on the left so
the whole fits `max_seq_len` (a BOS the tokenizer puts in front is kept). Only completion
tokens carry loss. Conversational records are rendered with the chat template instead
(utils/data/chat.py): the prompt with the generation prompt, the completion as the assistant
turn up to its end-of-turn token, with no EOS after it; the cuts are the same. A sampled
completion that carries its exact token ids (`completion_ids`, from a tokenizer with the
record's `tokenizer_fingerprint`) is not re-tokenised: its ids are the completion as they
are, the stop token included only where one was sampled, and the same cuts apply; ids that
do not decode to the record's text (a completion edited after sampling) are refused, one
line naming the record. With another tokenizer its text is used instead, with a warning
(utils/data/encoders.py).
"""
import functools
import hashlib
import json

from .chat import COMPLETION_FIELDS, ChatTemplate, is_conversation
from ..fileio import InputError, where


def tokenizer_fingerprint(tokenizer):
    """16 hex digits identifying what token ids mean to `tokenizer`: its vocabulary, merges,
    added tokens, normalisation and EOS id (not its padding or truncation settings, which
    change while it runs)."""
    if getattr(tokenizer, "is_fast", False):
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        backend.pop("padding", None)
        backend.pop("truncation", None)
    else:
        backend = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([backend, tokenizer.eos_token_id], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class Tokenisation:
    """The tokenisation rule above, for one tokenizer and pair of lengths."""

    def __init__(self, tokenizer, max_seq_len, max_gen_len, chat_template="auto", chat_template_date=None):
        if max_gen_len >= max_seq_len:
            raise InputError(f"--max_gen_len {max_gen_len} must be smaller than --max_seq_len {max_seq_len} "
                             "so that at least one prompt token conditions the completion")
        if tokenizer.eos_token_id is None:
            raise InputError(f"tokenizer {tokenizer.name_or_path}: has no EOS token; set eos_token in its config")
        self.tokenizer = tokenizer
        self.chat = ChatTemplate(tokenizer, chat_template, chat_template_date)
        self.max_seq_len = max_seq_len
        self.max_gen_len = max_gen_len
        self.prompts_cut = 0  # sequences whose prompt `join_group` cut, reported once a split is tokenised
        # Tokens the tokenizer puts in front of every text (a BOS); left cuts keep them.
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        special = tokenizer("a")["input_ids"]
        self.num_prefix = next((i for i in range(len(special) - len(plain) + 1)
                                if special[i:i + len(plain)] == plain), 0)
        if max_seq_len - max_gen_len <= self.num_prefix:
            raise InputError(f"--max_seq_len {max_seq_len} - --max_gen_len {max_gen_len} leaves no room for a prompt "
                             f"token after the {self.num_prefix} the tokenizer puts in front")

    def prompts(self, prompts):
        """Prompt ids: text tokenised as is, a conversation rendered with the generation prompt."""
        prompts = list(prompts)
        if not any(is_conversation(p) for p in prompts):
            return self.tokenizer(prompts)["input_ids"] if prompts else []
        return [self.chat.prompt_ids(p) if is_conversation(p) else self.tokenizer(p)["input_ids"] for p in prompts]

    def completions(self, completions, prompts=None):
        """Completion ids: text + EOS; an assistant message (of `prompts[i]`, its conversation)
        as the tokens its template adds, up to the end-of-turn token."""
        completions = list(completions)
        if not completions or not isinstance(completions[0], dict):
            eos = self.tokenizer.eos_token_id
            return [c + [eos] for c in self.tokenizer(completions, add_special_tokens=False)["input_ids"]]
        return [self.chat.completion_ids(p, c) for p, c in zip(prompts, completions)]

    def check_conversation(self, record, kind, source, index):
        """Conversational records: a template renders them and every completion meets the prefix
        rule (prompt ids + completion ids = the conversation's ids), else one line naming the record."""
        self.chat.require(source, index)
        try:
            prompt_ids = self.chat.prompt_ids(record["prompt"])
        except ValueError as err:
            raise InputError(f"{where(source, index, 'prompt')}: {err}") from None
        for field in (f for f in COMPLETION_FIELDS[kind] if f in record):  # sampling checks prompts alone
            values = record[field] if field == "completions" else [record[field]]
            for j, completion in enumerate(values):
                try:
                    self.chat.completion_ids(record["prompt"], completion, prompt_ids)
                except ValueError as err:
                    at = where(source, index, f"{field}[{j}]" if field == "completions" else field)
                    raise InputError(f"{at}: {err}") from None

    @functools.cached_property
    def _tokenizer_fingerprint(self):
        """tokenizer_fingerprint(self.tokenizer), computed once: `uses_ids` asks for every record."""
        return tokenizer_fingerprint(self.tokenizer)

    def uses_ids(self, record):
        """Whether `record`'s completions are its exact sampled ids (from this tokenizer)."""
        return record.get("completion_ids") is not None and \
            record.get("tokenizer_fingerprint") == self._tokenizer_fingerprint

    def ids_spell(self, ids, text):
        """Whether sampled `ids` decode to `text`, as the sampler wrote it: the ids before the
        stop token it drew (EOS, an end-of-turn token), or all of them when none was drawn."""
        stops = set(self.chat.end_of_turn_ids) if self.chat.template is not None else {self.tokenizer.eos_token_id}
        body = ids[:-1] if ids and ids[-1] in stops else ids
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return decode(body) == text or decode(ids) == text

    def record_completions(self, record, texts=None):
        """The completion ids of a gen/rw record (or of `texts`, its candidates), uncut: the
        sampled ids as they are when the record carries them from this tokenizer, else text + EOS."""
        if self.uses_ids(record):
            return [list(ids) for ids in record["completion_ids"]]
        texts = record["completions"] if texts is None else texts
        return self.completions(texts, [record["prompt"]] * len(texts))

    def join(self, prompt_ids, completion_ids):
        """(input_ids, prompt_len) with the completion cut right, then the prompt cut left."""
        return self.join_group(prompt_ids, [completion_ids])[0]

    def join_group(self, prompt_ids, group):
        """[(input_ids, prompt_len)] of every completion of `group` (the candidates of one
        prompt): each completion cut right, then the prompt cut left ONCE, so that the group's
        longest completion fits. Every candidate is conditioned on the same prompt tokens, as
        the K samples of one prompt are, and prefix sharing can encode them once."""
        group = [completion_ids[:self.max_gen_len] for completion_ids in group]
        room = self.max_seq_len - max((len(completion_ids) for completion_ids in group), default=0)
        if len(prompt_ids) > room:
            self.prompts_cut += len(group)
            # the BOS a tokenizer (or a chat template) puts in front stays
            keep = self.num_prefix or int(self.chat.template is not None and room > 1
                                           and prompt_ids[0] == self.tokenizer.bos_token_id)
            prefix = prompt_ids[:keep]
            prompt_ids = prefix + prompt_ids[len(prompt_ids) - (room - len(prefix)):]
        return [(prompt_ids + completion_ids, len(prompt_ids)) for completion_ids in group]

    def settings_fingerprint(self):
        """A hash of everything the rule's output depends on: the tokenizer (its class, vocabulary,
        merges and special tokens), both lengths and the chat template; caches and output files
        record it (`"tokenisation"`) to tell which tokenisation made them."""
        tok = self.tokenizer
        backend = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else repr(sorted(tok.get_vocab().items()))
        payload = [type(tok).__name__, backend, str(tok.special_tokens_map), self.max_seq_len, self.max_gen_len]
        if self.chat.template is not None:  # what renders conversational records
            payload.append(self.chat.template)  # with its date fixed, if it reads one
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()
