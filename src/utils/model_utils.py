"""Tokenizer and model loading, LoRA, saving in HF format (log-probs of a model: utils.logprobs)."""
import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from . import provenance
from .fileio import InputError, atomic_dir, commit_dir, commit_files

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _not_a_model(path, what, err):
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return InputError(f"{path}: cannot load {what} ({reason}); pass a Hugging Face model directory")


def load_tokenizer(path, trust_remote_code=False):
    """Tokenizer with right padding; a model without a pad token pads with EOS (the pad
    positions are masked out of attention and loss, so the choice of id does not matter)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise _not_a_model(path, "a tokenizer", err) from None
    if not tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"]:
        raise InputError(f"{path}: the tokenizer encodes text to no tokens (are its tokenizer files missing?); "
                         "pass a model directory with the tokenizer it was trained with")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"{path}: the tokenizer has neither a pad nor an EOS token; add one to its config")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_config(path, trust_remote_code=False, disable_dropout=False):
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise _not_a_model(path, "a model config", err) from None
    if disable_dropout:
        # Alignment compares policy and reference log-probs of the same text; dropout noise
        # in either would bias h = log pi - log pi_ref, so every dropout rate goes to 0.
        # Config keys cover functional dropout (e.g. Llama's attention_dropout, GPT-2's
        # *_pdrop); zero_dropout() then catches any nn.Dropout module whatever its name.
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
    return config


def position_limit(config):
    """The most positions a model config can embed, or None where it names no limit."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_position_limit(path, length, flag, trust_remote_code=False):
    """Refuse a length flag beyond what the model at `path` can embed, before any work (its
    forward would otherwise stop with an index error, or run on positions it never learnt)."""
    limit = position_limit(load_config(path, trust_remote_code))
    if limit is not None and length > limit:
        raise InputError(f"{flag} {length} is more than the {limit} positions the model {path} has "
                         f"(max_position_embeddings); use {flag} {limit} or less")


def zero_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class _HeldLoadReport(logging.Filter):
    """Holds back the LOAD REPORT transformers logs (on every rank) from one from_pretrained."""

    def __init__(self):
        super().__init__()
        self.records = []

    def filter(self, record):
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


def _only_a_new_head(model, info):
    """Whether a load report says no more than that a sequence classifier was built on a
    causal LM: its head (`score`) is missing, and the LM head, if the checkpoint had one, unused."""
    head = {n for n, _ in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")}
    missing, unexpected = set(info.get("missing_keys", ())), set(info.get("unexpected_keys", ()))
    others = [key for key, value in info.items() if value and key not in ("missing_keys", "unexpected_keys")]
    return missing and missing <= head and all(k.startswith("lm_head.") for k in unexpected) and not others


def _load_model(auto_class, what, path, tokenizer, dtype, trust_remote_code, disable_dropout, new_head_expected=False,
                **config_overrides):
    if os.path.isdir(path):
        provenance.verified(path, "model")
    config = load_config(path, trust_remote_code, disable_dropout)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    report_logger, held = logging.getLogger("transformers.modeling_utils"), _HeldLoadReport()
    if new_head_expected:
        report_logger.addFilter(held)
    try:
        model, info = auto_class.from_pretrained(path, config=config, dtype=TORCH_DTYPES[dtype],
                                                 trust_remote_code=trust_remote_code, output_loading_info=True)
    except (OSError, ValueError, TypeError) as err:
        raise _not_a_model(path, what, err) from None
    finally:
        report_logger.removeFilter(held)
    if held.records and _only_a_new_head(model, info):
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"{path}: a causal LM, so the reward head ({', '.join(sorted(info['missing_keys']))}) "
                  "starts from random weights", flush=True)
    else:  # anything else may be a broken checkpoint: every rank shows the whole report
        for record in held.records:
            report_logger.handle(record)
    if disable_dropout:
        zero_dropout(model)
    prepare_for_tokenizer(model, tokenizer)
    return model


def load_causal_lm(path, tokenizer, dtype="fp32", trust_remote_code=False, disable_dropout=False):
    """AutoModelForCausalLM in `dtype`, its pad id set and embeddings grown to the tokenizer.

    Under ZeRO-3 the caller keeps a `HfDeepSpeedConfig` alive first, so transformers builds
    the weights already partitioned across ranks instead of whole on every rank.
    """
    return _load_model(AutoModelForCausalLM, "a causal LM", path, tokenizer, dtype, trust_remote_code,
                       disable_dropout)


def load_reward_model(path, tokenizer, dtype="fp32", trust_remote_code=False, disable_dropout=False):
    """AutoModelForSequenceClassification with one output: the scalar reward of a sequence,
    read at its last non-pad token. From a causal LM checkpoint the score head starts fresh;
    from a saved reward model it loads as trained. The pad id is written into the config,
    which is how transformers finds the last token (and how serving engines will)."""
    return _load_model(AutoModelForSequenceClassification, "a reward model", path, tokenizer, dtype,
                       trust_remote_code, disable_dropout, new_head_expected=True, num_labels=1,
                       pad_token_id=tokenizer.pad_token_id)


def trainable_reward_model(args, tokenizer):
    """The one-logit sequence classifier that train_rm and train_class train, from the training
    flags: the backbone, its dropout as --disable_dropout says, and LoRA when --lora_dim > 0
    (as SEQ_CLS, so that peft keeps the freshly initialised score head fully trainable)."""
    model = load_reward_model(args.model_name_or_path, tokenizer, args.dtype, args.trust_remote_code,
                              disable_dropout=args.disable_dropout)
    if args.lora_dim > 0:
        model = apply_lora(model, args.lora_dim, args.lora_alpha, args.lora_module_name, args.only_optimize_lora,
                           task_type="SEQ_CLS")
    return model


def prepare_for_tokenizer(model, tokenizer):
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # no KV cache when training: it only costs memory
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    # the padded-vocabulary rule (utils.heads.token_vocab_size): ids past the tokenizer are no tokens
    model.token_vocab_size = len(tokenizer)


def apply_lora(model, lora_dim, lora_alpha=None, target_modules="all-linear", only_optimize_lora=False,
               task_type="CAUSAL_LM"):
    """Wrap `model` with peft LoRA adapters of rank `lora_dim` (scaling lora_alpha / lora_dim,
    default 1). Unless `only_optimize_lora`, the base weights keep training too.

    With task_type="SEQ_CLS" peft trains a fresh copy of the score head in full (its
    `modules_to_save`) and keeps the original as a frozen, unused `original_module`, which
    stays frozen here too: it gets no gradient."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else target_modules.split(",")
    config = LoraConfig(r=lora_dim, lora_alpha=lora_alpha or lora_dim, lora_dropout=0.0,
                        target_modules=targets, task_type=task_type)
    model = get_peft_model(model, config)
    if not only_optimize_lora:
        for name, param in model.named_parameters():
            if "lora_" not in name and ".original_module." not in name:
                param.requires_grad_(True)
    return model


def model_fingerprint(path):
    """Identity of a model for caches: the digests (utils/provenance.py) of a model directory's
    own files, its weights, config and tokenizer (not what a run keeps beside them, such as
    checkpoints), so a model retrained in place is another model and a copy is the same one;
    a Hub name is itself."""
    if not os.path.isdir(path):
        return path
    files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)) and not f.startswith(".")
                   and not f.endswith(".log") and f not in ("README.md", provenance.RECORD_FILE))
    return provenance.fingerprint({f: provenance.file_digest(os.path.join(path, f)) for f in files})


# -- saving -------------------------------------------------------------------------------
def _full_state_dict(engine, zero_stage):
    """The whole model's state dict on rank 0 (None elsewhere); under ZeRO-3 every rank
    takes part in gathering the partitions, one layer at a time."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if torch.distributed.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def _merge_lora(model, state_dict):
    """Fold LoRA adapters into their base weights so the export is a plain HF model; a head
    peft trained as `modules_to_save` (a reward model's score) replaces its frozen original."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            path = name[len(prefix):] if name.startswith(prefix) else name
            lora_a = state_dict[f"{name}.lora_A.default.weight"].float()
            lora_b = state_dict[f"{name}.lora_B.default.weight"].float()
            delta = (lora_b @ lora_a) * module.scaling["default"]
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            base = state_dict[f"{name}.base_layer.weight"]
            merged[f"{path}.weight"] = (base.float() + delta).to(base.dtype)
    out = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key or ".original_module." in key:
            continue
        key = key[len(prefix):] if key.startswith(prefix) else key
        out[key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = value
    out.update(merged)
    return out


def save_hf_model(engine, tokenizer, output_dir, zero_stage, replace_dir=True, model_card=None):
    """Export the engine's model as a Hugging Face directory (safetensors + tokenizer, and
    `model_card`, the text of its README.md, when given).

    Called on every rank. Rank 0 writes into a temporary directory and renames it into place,
    so `output_dir` is always a complete model or absent; with `replace_dir=False` the files
    are renamed in one by one and the directory's other contents stay. LoRA adapters are merged.
    """
    state_dict = _full_state_dict(engine, zero_stage)
    if torch.distributed.get_rank() == 0:
        model = engine.module
        if hasattr(model, "get_base_model"):  # peft
            state_dict = _merge_lora(model, state_dict)
            model = model.get_base_model()
        tmp = atomic_dir(output_dir)
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model_card is not None:
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card)
        provenance.record_dir(tmp)  # every later stage that loads the export verifies it first
        (commit_dir if replace_dir else commit_files)(tmp, output_dir)
    torch.distributed.barrier()
