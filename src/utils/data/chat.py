"""Conversational records and chat templates.

A record is conversational when its `prompt` is a list of messages `{"role", "content"}`:
an optional leading `system` turn, then turns that end with a `user` turn. Each completion
(`chosen`, `rejected`, every entry of `completions`) is then one assistant message, given as
a dict, a one-element list of one, or a plain string meaning the assistant's content; it is
normalised to `{"role": "assistant", "content": str}`.

Rendering, with the chat template that `--chat_template` selects (`auto`: the tokenizer's
own; `PATH`: a Jinja file; `none`: conversational records are refused):

- the prompt's ids are the template applied to the prompt messages with the generation
  prompt (what a server feeds the model before it answers);
- a completion's ids are the tokens the template adds for that assistant turn, up to and
  including its end-of-turn token (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`), so that
  prompt ids + completion ids are the ids of the whole rendered conversation, token for
  token; what a template puts after the end-of-turn token (ChatML's newline before the next
  turn) belongs to no turn and is left out, as a sampler stops at the end-of-turn token and
  never draws it. No EOS is appended after an end-of-turn token; a template whose assistant
  turn ends with no special token gets EOS appended, as text completions do.

The prefix rule is checked for every completion (it fails for templates that rewrite earlier
turns once an answer follows, e.g. ones that strip reasoning): one error line naming the
record. Ids are those of `tokenizer.apply_chat_template(..., tokenize=True)`: the rendered
text tokenised without adding special tokens (a template writes its own BOS).
"""
import datetime
import json
import os
import re

from ..fileio import InputError, read_text, where

CHAT_TEMPLATE_CHOICES = "auto|none|PATH"
COMPLETION_FIELDS = {"sft": ("chosen",), "pref": ("chosen", "rejected"), "gen": ("completions",),
                     "rw": ("completions",)}


# The date a template that reads today's date (`strftime_now`, as Llama 3.1-3.3's do in their
# system header) renders: fixed, so that a conversation renders to the same ids on every day,
# samples are scored behind the header they were drawn with, and caches stay valid. It is the
# date those templates fall back to themselves.
DEFAULT_TEMPLATE_DATE = "2024-07-26"
_DATE_CALL = re.compile(r"strftime_now\s*\(")
_DATE_LITERAL_CALL = re.compile(r"""strftime_now\s*\(\s*(["'])([^"']*)\1\s*\)""")


def add_chat_template_arg(group):
    group.add_argument("--chat_template", default="auto", metavar=CHAT_TEMPLATE_CHOICES,
                       help="how conversational records (prompt = a list of messages) are rendered: auto = the "
                            "tokenizer's chat template; PATH = a Jinja template file; none = refuse them. Text "
                            "records are tokenised as plain text whatever this says")
    group.add_argument("--chat_template_date", default=DEFAULT_TEMPLATE_DATE, metavar="YYYY-MM-DD",
                       help="the date a chat template that reads today's date (strftime_now, e.g. Llama 3.2/3.3's "
                            "system header) renders, the same on every day and in every stage; pass the same value "
                            "to sampling, scoring and training")


def parse_template_date(value):
    try:
        return datetime.datetime.strptime(value, "%Y-%m-%d")
    except (TypeError, ValueError):
        raise InputError(f"--chat_template_date {value!r}: expected a date YYYY-MM-DD, e.g. {DEFAULT_TEMPLATE_DATE}") \
            from None


def is_conversation(prompt):
    return isinstance(prompt, list)


# -- validation ------------------------------------------------------------------------------
def _message(value, at, roles=None):
    if not isinstance(value, dict):
        raise InputError(f"{at}: expected a message {{\"role\", \"content\"}}, got {type(value).__name__}")
    role, content = value.get("role"), value.get("content")
    if not isinstance(role, str):
        raise InputError(f"{at}: a message needs a \"role\" string")
    if not isinstance(content, str):
        raise InputError(f"{at}: message \"content\" must be a string, got {type(content).__name__}")
    if roles and role not in roles:
        raise InputError(f"{at}: role {role!r}, expected {' or '.join(roles)}")
    return {"role": role, "content": content}


def check_prompt_messages(prompt, source, index):
    """The prompt's messages, normalised; it must end with a user turn (a system turn may lead)."""
    at = where(source, index, "prompt")
    if not prompt:
        raise InputError(f"{at}: empty list of messages")
    messages = [_message(m, f"{at}[{i}]", ("system", "user", "assistant")) for i, m in enumerate(prompt)]
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            raise InputError(f"{at}[{i}]: a system turn may only lead the conversation")
    if messages[-1]["role"] != "user":
        raise InputError(f"{at}: the prompt must end with a user turn, its last is {messages[-1]['role']!r}")
    return messages


def check_completion_message(completion, at):
    """One assistant message, normalised: a dict, a one-element list of one, or its content."""
    if isinstance(completion, str):
        completion = {"role": "assistant", "content": completion}
    elif isinstance(completion, list):
        if len(completion) != 1:
            raise InputError(f"{at}: a completion is one assistant message, got a list of {len(completion)}")
        completion = completion[0]
    message = _message(completion, at)
    if message["role"] != "assistant":
        raise InputError(f"{at}: a completion's role must be 'assistant', got {message['role']!r}")
    if not message["content"]:
        raise InputError(f"{at}: empty content; drop the record or fill it in")
    return message


def normalise_conversation(record, kind, source, index):
    """Validate and normalise a conversational record in place (see the module docstring)."""
    record["prompt"] = check_prompt_messages(record["prompt"], source, index)
    for field in COMPLETION_FIELDS[kind]:
        if field == "completions":
            if not isinstance(record[field], list):
                raise InputError(f"{where(source, index, field)}: expected list, got {type(record[field]).__name__}")
            if not record[field]:
                raise InputError(f"{where(source, index, field)}: empty list")
            record[field] = [check_completion_message(c, f"{where(source, index, field)}[{j}]")
                             for j, c in enumerate(record[field])]
        else:
            record[field] = check_completion_message(record[field], where(source, index, field))


# -- rendering -------------------------------------------------------------------------------
class ChatTemplate:
    """The chat template `--chat_template` selects for one tokenizer, and its end-of-turn ids."""

    def __init__(self, tokenizer, option="auto", date=DEFAULT_TEMPLATE_DATE):
        self.tokenizer, self.option = tokenizer, option or "auto"
        self.date = parse_template_date(date or DEFAULT_TEMPLATE_DATE)
        if self.option == "auto":
            self.template = getattr(tokenizer, "chat_template", None)
        elif self.option == "none":
            self.template = None
        else:
            if not os.path.isfile(self.option):
                raise InputError(f"--chat_template {self.option}: no such file; pass auto, none or a Jinja file")
            self.template = read_text(self.option)
        self._end_of_turn = None
        self.reads_date = self.template is not None and bool(_DATE_CALL.search(self.template))
        if self.reads_date:
            self.template = self.fix_date(self.template)

    def fix_date(self, template):
        """`template` with each strftime_now("FORMAT") call replaced by the fixed date in that
        format (transformers renders only plain data, so no function of ours can stand in)."""
        fixed = _DATE_LITERAL_CALL.sub(lambda m: json.dumps(self.date.strftime(m.group(2))), template)
        if _DATE_CALL.search(fixed):
            raise InputError(f"--chat_template {self.option}: the template calls strftime_now with a format that is "
                             "not a string literal, so its date cannot be fixed; pass a copy that writes the date "
                             "itself (--chat_template PATH)")
        return fixed

    def require(self, source, index):
        """Raise unless conversational records can be rendered: one line naming the data and the fix."""
        if self.template is not None:
            return
        if self.option == "none":
            raise InputError(f"{where(source, index, 'prompt')}: a conversation (a list of messages), but "
                             "--chat_template none; pass --chat_template auto (or a Jinja file) to render it")
        raise InputError(f"{where(source, index, 'prompt')}: a conversation (a list of messages), but the tokenizer "
                         f"{self.tokenizer.name_or_path} has no chat template; pass --chat_template PATH (a Jinja "
                         "file), or give the prompt as text")

    def render_ids(self, messages, generation_prompt):
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja2's errors (a template's raise_exception too) share no base
            raise ValueError(f"the chat template cannot render this conversation ({err})") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages):
        return self.render_ids(messages, generation_prompt=True)

    @property
    def end_of_turn_ids(self):
        """Ids that end an assistant turn, a sampler's stop ids: EOS and `turn_end_id`."""
        return sorted({self.tokenizer.eos_token_id, self.turn_end_id})

    @property
    def turn_end_id(self):
        """The first special token the template writes after an answer's content (found by
        rendering a probe conversation), or EOS when it writes none."""
        if self._end_of_turn is None:
            ids = []
            probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "OK42"}]
            try:
                text = self.tokenizer.apply_chat_template(probe, chat_template=self.template, tokenize=False)
                prompt = self.tokenizer.apply_chat_template(probe[:1], chat_template=self.template, tokenize=False,
                                                            add_generation_prompt=True)
                after = text[len(prompt):]
                after = after[after.index("OK42") + len("OK42"):]
            except Exception:  # a template that cannot render the probe: EOS alone
                after = ""
            special = set(self.tokenizer.all_special_ids) | {
                i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
            ids = [i for i in self.tokenizer(after, add_special_tokens=False)["input_ids"] if i in special]
            self._end_of_turn = ids[0] if ids else self.tokenizer.eos_token_id
        return self._end_of_turn

    def completion_ids(self, messages, completion, prompt_ids=None):
        """The ids the template adds for the assistant turn `completion` after `messages`, up to
        its end-of-turn token (EOS appended when it writes none). Raises ValueError when
        prompt ids + completion ids are not a prefix of the whole conversation's ids, or the
        template cannot render it (the caller names the record)."""
        prompt_ids = self.prompt_ids(messages) if prompt_ids is None else prompt_ids
        whole = self.render_ids(messages + [completion], generation_prompt=False)
        if whole[:len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template renders the conversation with this answer so that it does not "
                             "start with the prompt rendered with the generation prompt (it rewrites earlier "
                             "turns, or the answer's first token merges with the prompt's last); use a template "
                             "that appends each turn (--chat_template PATH) or give the data as text")
        added = whole[len(prompt_ids):]
        ends = [i for i, t in enumerate(added) if t in self.end_of_turn_ids]
        return added[:ends[-1] + 1] if ends else added + [self.tokenizer.eos_token_id]
