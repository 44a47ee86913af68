"""Anthropic-HH (hh-rlhf, helpful-base) -> `pref` data and `sft` data from its chosen side.

    python exp/hh_exp/preproc.py /path/to/hh-rlhf [--output_dir exp/hh_exp/data] [--format messages]

PATH holds train.jsonl and test.jsonl, one {"chosen": DIALOGUE, "rejected": DIALOGUE} a line,
each dialogue "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ...". The
two dialogues share every turn but the assistant's last answer, so each line becomes

  OUTPUT_DIR/hh/          {"prompt": the dialogue up to and including its last "\\n\\nAssistant:",
                           "chosen": the chosen final answer, "rejected": the rejected one}
  OUTPUT_DIR/hh_chosen/   {"prompt", "chosen"}: the same records without the rejected answer,
                          for SFT on the preferred answers

with the answers keeping their leading space (" I think ...") so that prompt + answer is the
original text. With `--format messages` the records are conversational instead, for aligning
an instruct model with its own chat template: the prompt is the dialogue's turns as messages
[{"role": "user", "content": ...}, {"role": "assistant", ...}, ..., {"role": "user", ...}]
and each answer an assistant message, contents stripped of the space after the marker.
Known quirks of the data, handled:

  * "Humans:" spelled for "Human:" as a turn marker: read as "Human:" (counted as fixed);
  * a turn marker inside an answer's text ("...Assistant: Sure. Human: and then?"), where
    the model went on to write the next turn itself: the answer is cut before the marker
    (counted as cut);
  * chosen and rejected that differ before the last turn (the dialogues diverge earlier,
    or one of them goes on after its answer): skipped and counted;
  * an empty final answer on either side, identical answers, or a dialogue that does not
    end with an assistant turn: skipped and counted.
"""
import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from utils.data.preproc_utils import Skips, field, read_json_lines, write_datasets  # noqa: E402
from utils.fileio import InputError, cli_main, where  # noqa: E402

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
MISSPELLED_HUMAN = "\n\nHumans:"
TURN = re.compile(r"\n\n(?:Human|Assistant):")
# A speaker's name inside an answer, at its start or after whitespace: the model writing a turn
# that is not its own.
INLINE_TURN = re.compile(r"(?:^|(?<=\s))(?:Humans?|Assistant):")


def split_last_answer(dialogue):
    """(prompt up to and including the last assistant marker, final answer), or None when the
    dialogue does not end with an assistant turn."""
    markers = list(TURN.finditer(dialogue))
    if not markers or markers[-1].group() != ASSISTANT:
        return None
    end = markers[-1].end()
    return dialogue[:end], dialogue[end:]


def cut_inline_turn(answer):
    """The answer up to a turn marker inside its text (trailing space removed), and whether one was cut."""
    match = INLINE_TURN.search(answer)
    if match is None:
        return answer.rstrip(), False
    return answer[:match.start()].rstrip(), True


def dialogue_to_pref(record, path, index, skips, split):
    chosen, rejected = (field(record, path, index, side) for side in ("chosen", "rejected"))
    if MISSPELLED_HUMAN in chosen or MISSPELLED_HUMAN in rejected:
        skips.fix(split, "'Humans:' read as the turn marker 'Human:'")
        chosen, rejected = chosen.replace(MISSPELLED_HUMAN, HUMAN), rejected.replace(MISSPELLED_HUMAN, HUMAN)
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.startswith(HUMAN):
            raise InputError(f"{where(path, index, side)}: expected a dialogue starting with {HUMAN!r}, "
                             f"got {text[:30]!r}")
    parts = split_last_answer(chosen), split_last_answer(rejected)
    if None in parts:
        skips.add(split, "dialogue does not end with an assistant turn")
        return None
    (prompt, chosen_answer), (rejected_prompt, rejected_answer) = parts
    if prompt != rejected_prompt:
        skips.add(split, "chosen and rejected differ before the last turn")
        return None
    (chosen_answer, cut_c), (rejected_answer, cut_r) = cut_inline_turn(chosen_answer), cut_inline_turn(rejected_answer)
    if cut_c or cut_r:
        skips.fix(split, "answer cut before a turn marker inside its text")
    if not chosen_answer.strip() or not rejected_answer.strip():
        skips.add(split, "empty final answer")
        return None
    if chosen_answer.strip() == rejected_answer.strip():
        skips.add(split, "identical final answers")
        return None
    return {"prompt": prompt, "chosen": chosen_answer, "rejected": rejected_answer}


def as_messages(record):
    """A text record of this preprocessor -> the same dialogue as messages."""
    turns = list(TURN.finditer(record["prompt"]))[:-1]  # the last is the open "\n\nAssistant:"
    ends = [t.start() for t in turns[1:]] + [len(record["prompt"]) - len(ASSISTANT)]
    prompt = [{"role": "user" if t.group() == HUMAN else "assistant", "content": record["prompt"][t.end():end].strip()}
              for t, end in zip(turns, ends)]
    answers = {side: {"role": "assistant", "content": record[side].strip()}
               for side in ("chosen", "rejected") if side in record}
    return {"prompt": prompt, **answers}


def is_valid_conversation(record):
    """Messages need content and the prompt must end with the user's turn."""
    return all(m["content"] for m in record["prompt"]) and record["prompt"][-1]["role"] == "user"


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="directory with train.jsonl and test.jsonl of hh-rlhf (helpful-base)")
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "data"),
                        help="where hh/ (pref) and hh_chosen/ (sft) are written")
    parser.add_argument("--format", default="text", choices=["text", "messages"],
                        help="text: prompts as the dialogue text; messages: conversational records for a chat template")
    args = parser.parse_args(argv)
    skips, pref = Skips(), {}
    for split in ("train", "test"):
        path = os.path.join(args.path, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file; export hh-rlhf's train and test splits as train.jsonl and "
                             "test.jsonl")
        records = (dialogue_to_pref(r, path, i, skips, split) for i, r in enumerate(read_json_lines(path)))
        pref[split] = [r for r in records if r is not None]
        if args.format == "messages":
            converted = [as_messages(r) for r in pref[split]]
            for record in converted:
                if not is_valid_conversation(record):
                    skips.add(split, "a turn with no text (not a conversation a chat template renders)")
            pref[split] = [r for r in converted if is_valid_conversation(r)]
    skips.report({split: len(records) for split, records in pref.items()})
    pref_dir, sft_dir = os.path.join(args.output_dir, "hh"), os.path.join(args.output_dir, "hh_chosen")
    sft = {split: [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in records] for split, records in pref.items()}
    write_datasets({pref_dir: pref, sft_dir: sft}, {pref_dir: "pref", sft_dir: "sft"})


if __name__ == "__main__":
    main()
