"""Make a tiny, randomly initialised causal LM and its tokenizer locally, with no hub access.

The model, the tokenizer and the chat templates are utils/tiny_model.py's; this script reads the
text to train the tokenizer on and writes the directory:

    python src/make_tiny_model.py --out /tmp/tiny-gpt2 --text_file data/train.jsonl
"""
import argparse

from utils.fileio import InputError, cli_main, read_json_records
from utils.tiny_model import ARCHS, CHAT_TEMPLATES, builtin_corpus, count_saved_parameters, make_tiny_model


def read_texts(path):
    """Documents of a text file: string fields of JSON/JSONL records, else one per non-empty line."""
    if path.endswith((".json", ".jsonl")):
        for record in read_json_records(path):
            for value in record.values():
                values = value if isinstance(value, list) else [value]
                yield from (v for v in values if isinstance(v, str))
        return
    try:
        with open(path, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read as UTF-8 text ({err})") from None


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the model and tokenizer to (replaced if it exists)")
    parser.add_argument("--text_file", nargs="+", action="extend", default=[],
                        help="text to train the tokenizer on: plain text (one document per line) or "
                             "project .json/.jsonl data (every string field); default: a built-in English corpus")
    parser.add_argument("--arch", default="gpt2", choices=ARCHS, help="model architecture")
    parser.add_argument("--vocab_size", type=int, default=512, help="target BPE vocabulary size")
    parser.add_argument("--hidden_size", type=int, default=64, help="hidden (embedding) size")
    parser.add_argument("--num_layers", type=int, default=2, help="number of transformer layers")
    parser.add_argument("--num_heads", type=int, default=4, help="number of attention heads")
    parser.add_argument("--max_positions", type=int, default=256, help="maximum sequence length")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument("--pad_token", default=None, help="add this special token as the pad token (default: none)")
    parser.add_argument("--chat_template", default=None, choices=sorted(CHAT_TEMPLATES),
                        help="give the tokenizer this chat template and its special tokens (default: none)")
    args = parser.parse_args(argv)

    texts = [t for path in args.text_file for t in read_texts(path)] if args.text_file else builtin_corpus()
    if not texts:
        raise InputError(f"no text found in {', '.join(args.text_file)}")
    try:
        out = make_tiny_model(args.out, texts, arch=args.arch, vocab_size=args.vocab_size,
                              hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                              max_positions=args.max_positions, seed=args.seed, pad_token=args.pad_token,
                              chat_template=args.chat_template)
    except ValueError as err:
        raise InputError(str(err)) from None
    print(f"wrote tiny {args.arch} model to {out} ({count_saved_parameters(out):,} parameters)")


if __name__ == "__main__":
    main()
