"""Prefix sharing: K candidates of one prompt scored at the cost of one prompt.

A collated batch holds groups of consecutive rows (group-major) that continue one prompt:
the K candidates of an alignment example, the (chosen, rejected) pair of a reward-model
example, the completions of one `gen` record. Instead of encoding the prompt K times, each
group becomes ONE packed row

    [shared prefix | suffix_1 | suffix_2 | ... | suffix_K | pad]

run through the transformer with a block attention mask (a suffix sees the shared prefix and
itself, causally; nothing else) and position ids that restart after the prefix for every
suffix, so that every suffix token gets exactly the hidden state it would get in its own
unshared row. The shared prefix is the longest common prefix of the group's rows before the
first loss position. The tokenisation rule cuts a long prompt once per group, so a cut group
still shares its whole prompt; rows that differ before their completions anyway (data
tokenised elsewhere) share only their common part, and sharing stays exact. The hidden states are then
gathered back into one row per candidate for the LM head (log-probs) or the score head
(reward models: utils/reward_scoring.py).

Why packing and not "encode the prompt once, run the K completions on its KV cache expanded
K times": the cache route needs `use_cache` in the training forward, which transformers turns
off under gradient checkpointing, and it takes two forwards where packing takes one (one
ZeRO-3 parameter gather per step, as without sharing).

The packed forward is the model's own top-level forward (so DeepSpeed's and peft's hooks run
as in any forward), its head's input caught by utils.heads.HeadInput, a pre-hook on the head.

It is exact only where tokens mix through a full causal attention mask alone, placed by
`position_ids`: not with sliding-window, local or chunked attention (the block mask replaces
the window), state-space, convolution or linear-attention layers (they mix tokens outside the
mask), ALiBi or soft-capped attention. So sharing is on only for the architectures of
SHARING_ARCHITECTURES, each tested exact (1e-5, fp32, gradients included) against the unshared
forward in tests/test_arch_matrix.py, and only with an attention implementation that takes a
custom 4D mask (eager, sdpa; not flash-attention or flex); `sharing_support` says why a model
does not qualify.
"""
import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .fileio import InputError
from .heads import HeadInput, lm_head, unwrap
from .sharing_cost import decide_sharing

PREFIX_SHARING_CHOICES = ("auto", "on", "off")
_MASKED_ATTENTION = ("eager", "sdpa")  # the implementations that apply a custom 4D mask as given

# The architectures (config.model_type) on which the packed forward is tested exact against the
# unshared one (tests/test_arch_matrix.py): tokens mix only through attention, placed by
# position ids, under the mask given. `auto` shares on these only; `on` also only on these.
SHARING_ARCHITECTURES = ("falcon", "gemma", "gpt2", "gpt_neo", "gpt_neox", "llama", "mistral", "mixtral", "opt",
                         "phi3", "qwen2", "qwen3")


def add_prefix_sharing_arg(parser):
    parser.add_argument("--prefix_sharing", default="auto", choices=PREFIX_SHARING_CHOICES,
                        help="encode the prompt once per group of candidates instead of once per candidate "
                             "(exact; saves the prompt's compute and memory K-1 times over): auto = on for the "
                             f"architectures it is tested exact on (model types {', '.join(SHARING_ARCHITECTURES)}; "
                             "no sliding/local window, SSM layers or ALiBi; eager or sdpa attention), else off "
                             "with a note, and only for the batches that packing makes cheaper (short prompts "
                             "with long completions are scored unshared); on = every batch, and stop if the "
                             "model does not qualify")
    return parser


# -- which models ---------------------------------------------------------------------------
_STATE_SPACE_FIELDS = ("mamba", "ssm", "conv_", "linear_", "attn_layer_period", "layers_block_type")


def _attention_window(config):
    """Why attention in `config` is not plain causal attention over the whole row, or None."""
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"sliding-window attention (sliding_window={config.sliding_window})"
    if "local" in (getattr(config, "attention_layers", None) or ()):
        return f"local attention layers (window_size={getattr(config, 'window_size', None)})"
    if getattr(config, "attention_chunk_size", None):
        return f"chunked attention (attention_chunk_size={config.attention_chunk_size})"
    windowed = sorted(t for t in set(_layer_types(config)) if any(w in t for w in ("sliding", "local", "chunk")))
    if windowed:
        return f"{', '.join(windowed)} layers"
    return None


def _layer_types(config):
    return [str(t) for t in getattr(config, "layer_types", None) or ()]


def _inexact_because(config):
    """Why the block mask would not give the unshared forward's hidden states, or None."""
    if getattr(config, "alibi", False) or config.model_type in ("bloom", "mpt"):
        return "it places tokens by ALiBi, not by position ids"
    window = _attention_window(config)
    if window:
        return f"it has {window}, which the block mask would override"
    if getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps the attention logits"
    others = sorted(set(_layer_types(config)) - {"full_attention", "attention"})
    if others:
        return f"it has {', '.join(others)} layers, which mix tokens outside the attention mask"
    if config.model_type in SHARING_ARCHITECTURES:
        return None
    fields = sorted(key for key in config.to_dict() if any(mark in key for mark in _STATE_SPACE_FIELDS))
    if fields:
        return f"it has state-space, convolution or linear-attention layers ({fields[0]}), which mix tokens " \
               "outside the attention mask"
    return f"{config.model_type} is not among the architectures it is tested exact on " \
           f"({', '.join(SHARING_ARCHITECTURES)})"


def sharing_support(model):
    """None if prefix sharing is exact for `model` (a causal LM or a one-label sequence
    classifier, possibly wrapped), else the reason it is not."""
    hf = unwrap(model)
    config = hf.config
    why = _inexact_because(config)
    if why:
        return why
    attention = getattr(config, "_attn_implementation", None)
    if attention not in _MASKED_ATTENTION:
        return f"attention implementation {attention!r} does not take a custom block mask (eager and sdpa do)"
    if "position_ids" not in inspect.signature(hf.forward).parameters:
        return f"{type(hf).__name__}'s forward takes no position_ids"
    if hf.get_output_embeddings() is not None:
        why = lm_head(model)[1]
        if why:  # the shared path computes the head itself, so the head must be a plain linear map
            return f"the shared path needs the LM head's input, but {why}"
    else:
        if getattr(hf, "score", None) is None:
            return f"{type(hf).__name__} has neither an LM head nor a score head"
        if config.pad_token_id is None:
            return "the reward model has no pad_token_id to find each sequence's last token by"
    return None


def resolve_prefix_sharing(mode, model, what="the model"):
    """--prefix_sharing auto|on|off for `model` -> False (never share), "auto" (share the
    batches it makes cheaper) or "on" (share every batch). auto falls back with one line
    saying why; `on` with a model that cannot share is an input error (exit 2)."""
    if mode == "off":
        return False
    reason = sharing_support(model)
    if reason is None:
        return mode
    if mode == "on":
        raise InputError(f"--prefix_sharing on: {what} cannot share prompts ({reason}); use auto or off")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"prefix sharing off for {what}: {reason}", flush=True)
    return False


# -- the packed layout ----------------------------------------------------------------------
def group_sizes_of(batch):
    """Rows per group, in order: batch["group_sizes"] (the collators add it), else K from
    an alignment batch's rewards [B, K]."""
    if "group_sizes" in batch:
        return [int(k) for k in batch["group_sizes"]]
    if "rewards" in batch:
        groups, k = batch["rewards"].shape
        return [k] * groups
    raise ValueError("prefix sharing needs the batch's group_sizes (rows per prompt)")


@dataclass
class PackedGroups:
    """One packed row per group, and where every original (row, position) went."""
    input_ids: torch.Tensor       # [G, T] prefix, then every row's suffix, right-padded
    position_ids: torch.Tensor    # [G, T] the positions the tokens have in their own rows
    segments: torch.Tensor        # [G, T] 0 on the prefix, i on row i's suffix (1-based), -1 on pads
    row_group: torch.Tensor       # [N] the group of every original row
    row_prefix: torch.Tensor      # [N] that group's shared prefix length
    row_offset: torch.Tensor      # [N] where the row's suffix starts in the packed row
    row_lengths: torch.Tensor     # [N] the row's unpadded length

    def attention_bias(self, dtype):
        """[G, 1, T, T] additive mask: a query sees earlier keys of the prefix or of its own
        segment. A pad query sees the prefix and earlier pads (never an empty row, which would
        make NaNs); no real query sees a pad."""
        seg = self.segments
        t = seg.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
        visible = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
        bias = torch.zeros(visible.shape, dtype=dtype, device=seg.device)
        return bias.masked_fill_(~visible, torch.finfo(dtype).min).unsqueeze(1)

    def flat_index(self, positions):
        """Original positions [N, L] (each < its row's length) -> indices into the packed
        hidden states flattened to [G * T, H]."""
        prefix, offset = self.row_prefix[:, None], self.row_offset[:, None]
        packed = torch.where(positions < prefix, positions, offset + positions - prefix)
        return self.row_group[:, None] * self.input_ids.shape[1] + packed


def first_loss_positions(loss_mask, lengths):
    """The first loss position of every row; a row without one counts as all prompt."""
    has_loss = loss_mask.bool().any(-1)
    return torch.where(has_loss, loss_mask.long().argmax(-1), lengths)


def packed_layout(model, batch, prefix_sharing):
    """The batch's PackedGroups when it is to be scored shared, else None: `prefix_sharing`
    False (or None) never shares, "auto" shares where packing costs less than the unshared
    batch (utils/sharing_cost.py), "on" or True always."""
    if not prefix_sharing:
        return None
    packed = pack_groups(batch)
    shared = decide_sharing(model, unwrap(model), tuple(batch["input_ids"].shape), tuple(packed.input_ids.shape),
                            prefix_sharing, batch["input_ids"].device)
    return packed if shared else None


def pack_groups(batch):
    """Lay out every group of a collated, right-padded batch as one packed row (PackedGroups)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    device = input_ids.device
    lengths = attention_mask.long().sum(-1)
    first_loss = first_loss_positions(batch["loss_mask"], lengths)
    sizes = group_sizes_of(batch)
    if sum(sizes) != input_ids.shape[0]:
        raise ValueError(f"group sizes {sizes} do not add up to the batch's {input_ids.shape[0]} rows")
    ids_cpu, len_cpu, first_cpu = input_ids.cpu(), lengths.tolist(), first_loss.tolist()
    rows, positions, segments, prefixes, offsets, row_group = [], [], [], [], [], []
    start = 0
    for group, size in enumerate(sizes):
        members = range(start, start + size)
        cap = min(first_cpu[r] for r in members)  # share no loss position: its row must predict it
        block = ids_cpu[start:start + size, :cap]
        prefix = int((block == block[:1]).all(0).long().cumprod(0).sum())
        pieces, pos, seg = [ids_cpu[start, :prefix]], [torch.arange(prefix)], [torch.zeros(prefix, dtype=torch.long)]
        offset = prefix
        for i, r in enumerate(members):
            pieces.append(ids_cpu[r, prefix:len_cpu[r]])
            pos.append(torch.arange(prefix, len_cpu[r]))
            seg.append(torch.full((len_cpu[r] - prefix,), i + 1, dtype=torch.long))
            prefixes.append(prefix)
            offsets.append(offset)
            row_group.append(group)
            offset += len_cpu[r] - prefix
        rows.append(torch.cat(pieces))
        positions.append(torch.cat(pos))
        segments.append(torch.cat(seg))
        start += size
    width = max(len(r) for r in rows)
    pad_id = int(ids_cpu[0, -1]) if ids_cpu.shape[1] else 0  # any id: pads are seen by no real token

    def stack(pieces, fill):
        out = torch.full((len(pieces), width), fill, dtype=torch.long)
        for g, piece in enumerate(pieces):
            out[g, :len(piece)] = piece
        return out.to(device)

    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return PackedGroups(stack(rows, pad_id), stack(positions, 0), stack(segments, -1), as_tensor(row_group),
                        as_tensor(prefixes), as_tensor(offsets), lengths)


# -- running a model on it --------------------------------------------------------------------
def _packed_hidden_states(backbone, packed):
    """The head's input at every position of the packed rows, flattened to [G * T, H]."""
    dtype = unwrap(backbone.model).get_input_embeddings().weight.dtype
    hidden, _ = backbone(input_ids=packed.input_ids, attention_mask=packed.attention_bias(dtype),
                         position_ids=packed.position_ids, use_cache=False)
    return hidden.flatten(0, 1)


def shared_prefix_hidden_states(backbone, batch, packed=None):
    """(hidden [N, L, H], labels [N, L], loss_mask [N, L]) of a collated batch, one row per
    candidate, in the Hugging Face convention (hidden[:, t-1] predicts labels[:, t]; the label
    at 0 is unused), so that an LM head and utils.logprobs.sequence_logprobs give exactly the
    per-sequence log-probs of the unshared forward. Row n's window starts one position before
    its first loss token and is as long as the longest completion of the batch (+1).

    `backbone` is a utils.heads.HeadInput of the model (engine, peft or HF): the model's own
    forward, run with input_ids, a 4D attention_mask and position_ids, its head's input caught.
    The batch needs `group_sizes` (or `rewards` [B, K]); `packed` is its pack_groups layout
    when the caller has it already."""
    packed = pack_groups(batch) if packed is None else packed
    hidden = _packed_hidden_states(backbone, packed)
    lengths = packed.row_lengths
    start = (first_loss_positions(batch["loss_mask"], lengths) - 1).clamp(min=0)
    window = int((lengths - start).max())
    positions = start[:, None] + torch.arange(window, device=start.device)
    inside = positions < lengths[:, None]
    positions = torch.minimum(positions, (lengths - 1).clamp(min=0)[:, None])
    labels = batch["input_ids"].gather(1, positions)
    loss_mask = batch["loss_mask"].gather(1, positions) * inside
    return hidden[packed.flat_index(positions)], labels, loss_mask


def shared_prefix_hidden_at(model, batch, positions, packed=None):
    """The head's input [N, L, H] at original `positions` [N, L] (each < its row's length) of
    every row of a collated batch, with each group's prompt encoded once; `packed` is the
    batch's pack_groups layout when the caller has it already."""
    packed = pack_groups(batch) if packed is None else packed
    hidden = _packed_hidden_states(HeadInput(model), packed)
    return hidden[packed.flat_index(positions)]
