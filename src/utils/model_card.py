"""The README.md model card of every exported model directory (final model and ckptN).

A Hugging Face model card: a YAML header the Hub reads (base_model, library_name, tags,
pipeline_tag) and a body saying how the model was made: the stage, data, loss, K, betas,
steps and the command line. `base_model` is a Hub id: for a model started from a Hub id it is
that id; from a local directory it is that directory's own card's base_model (an SFT export
started from gpt2-large passes gpt2-large on to the models aligned from it), and it is left
out when there is none, as for a tiny local model. The body names the local path in any case.
"""
import json
import os
import shlex
import sys

from huggingface_hub import ModelCardData, metadata_load

from .loss import LOSSES


def stage_name():
    """The entry script that is running: train_exo, train_sft, ..."""
    return os.path.splitext(os.path.basename(sys.argv[0]))[0]


def command_line(world_size):
    """What this rank was started with, without the launcher's --local_rank (the launcher's own
    flags never reach the ranks)."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            argv.append(arg)
    if world_size == 1:
        return shlex.join(["python", sys.argv[0], *argv])
    return f"# on {world_size} ranks (the launcher's own flags are not recorded)\n" + shlex.join(["deepspeed", sys.argv[0], *argv])


def hub_base_model(path):
    """The Hub id a model at `path` (a Hub id or a local directory) descends from, or None."""
    if not os.path.isdir(path):
        return path
    card = os.path.join(path, "README.md")
    metadata = metadata_load(card) if os.path.isfile(card) else None
    return (metadata or {}).get("base_model")


def _is_sequence_classifier(model):
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(model).__name__.endswith("ForSequenceClassification")


def _tags(stage, args, classifier):
    tags = ["exo-align"]
    if hasattr(args, "loss_type"):
        tags += [args.loss_type.split("-")[0], args.loss_type]  # exo / dpo, and the exact loss
    elif stage == "train_sft":
        tags.append("sft")
    elif classifier:
        tags.append("reward-model")
    return tags


def _loss_rows(args):
    """The alignment loss and the hyperparameters it reads (utils.loss.LOSSES)."""
    spec = LOSSES[args.loss_type]
    reference = f"`{args.ref_name_or_path}`" if spec.reference else "none (a reference-free loss)"
    rows = [("reference model", reference), ("loss type", f"`{args.loss_type}`"),
            ("K (candidates per group)", args.num_contrastive)]
    if spec.labels == "rw":
        rows.append(("beta_pi / beta_r", f"{args.beta_pi} / {args.beta_r}"))
    else:
        rows.append(("beta_pi", args.beta_pi))
    if spec.labels == "pref":
        rows.append(("pref epsilon", args.pref_epsilon))
    if args.loss_type == "simpo":
        rows.append(("SimPO margin gamma", args.simpo_margin))
    if args.loss_type == "lipo":
        rows.append(("LiPO labels", args.lipo_labels))
    return rows + [("temperature", args.temp)]


def _usage(classifier):
    if classifier:
        return """```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
rm = AutoModelForSequenceClassification.from_pretrained(PATH)
tok = AutoTokenizer.from_pretrained(PATH)
# one scalar per text, read at its last non-pad token (padding on either side)
rewards = rm(**tok(["prompt + response", ...], return_tensors="pt", padding=True)).logits.squeeze(-1)
```"""
    return """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH)
tok = AutoTokenizer.from_pretrained(PATH)
out = model.generate(**tok("a prompt", return_tensors="pt"), max_new_tokens=64, do_sample=True)
print(tok.decode(out[0], skip_special_tokens=True))
```"""


def model_card(args, model, path, steps, total_steps, world_size):
    """README.md text for the export of `model` to `path` after `steps` of `total_steps` optimizer steps."""
    stage = stage_name()
    classifier = _is_sequence_classifier(model)
    header = ModelCardData(base_model=hub_base_model(args.model_name_or_path), library_name="transformers",
                           tags=_tags(stage, args, classifier),
                           pipeline_tag="text-classification" if classifier else "text-generation")
    rows = [("stage", f"`{stage}`"), ("initialised from", f"`{args.model_name_or_path}`"),
            ("data", ", ".join(f"`{spec}`" for spec in args.data_name_path))]
    if hasattr(args, "loss_type"):
        rows += _loss_rows(args)
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    rows += [("optimizer steps", f"{steps} of {total_steps}"), ("learning rate", f"{args.learning_rate:g} "
             f"({args.lr_scheduler_type})"), ("batch per optimizer step", batch),
             ("LoRA rank (merged)", args.lora_dim) if args.lora_dim > 0 else ("LoRA", "none (full model)"),
             ("dtype", args.dtype), ("seed", args.seed)]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
{header.to_yaml()}
---

# {os.path.basename(os.path.normpath(path))}

Trained by the `{stage}` stage of exo-align, which implements EXO and DPO
([Ji et al. 2024, arXiv:2402.00856](https://arxiv.org/abs/2402.00856)).

| | |
|---|---|
{table}

## Command line

```bash
{command_line(world_size)}
```

## Usage

{_usage(classifier).replace("PATH", json.dumps(path))}
"""
