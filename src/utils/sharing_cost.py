"""When prefix sharing pays: `--prefix_sharing auto` packs a batch only where that saves work.

Packing a group of K rows into one row `[prefix | s_1 | ... | s_K]` saves the prefix's tokens
K - 1 times over, but the packed row is long and its block mask is applied densely, so its
attention costs (packed length)^2 pairs where the K rows cost K (row length)^2. Short prompts
with long completions (prompt 8 tokens, completions 200, K = 4) save almost no tokens and
quadruple the pairs: shared, such a batch is slower. The decision is taken per batch from its
own shape, with one cost for the transformer on a [rows, width] batch:

    cost(rows, width) = rows * width * (TOKEN_PAIRS * hidden_size + width)

in units of one attention pair (the query-key product and its share of the weighted sum:
~4 * hidden flops a layer). A token's projections and MLP are ~24 * hidden^2 flops a layer, or
6 * hidden pairs at matmul speed; masked attention runs well below it (its softmax and mask are
memory-bound, in the forward and the backward), so a token counts as TOKEN_PAIRS = 2 * hidden
pairs (fitted on CPU runs of a 4-layer Llama; it leans towards unshared, the safe side).
Both sides are the padded shapes the forward really runs: [N, T] unshared, [G, W] packed.
The LM head, the loss and the optimizer cost the same either way and do not enter.
"""
import collections

import torch
import torch.distributed as dist

TOKEN_PAIRS = 2

# how the batches of this process were scored under auto: {"shared": n, "unshared": n}
tally = collections.Counter()
_said = set()


def forward_cost(rows, width, hidden_size):
    """The transformer's cost on a [rows, width] batch, in attention pairs (see above)."""
    return rows * width * (TOKEN_PAIRS * hidden_size + width)


def sharing_saves_work(unshared_shape, packed_shape, hidden_size):
    """Whether the packed [G, W] batch costs less than the unshared [N, T] one."""
    return forward_cost(*packed_shape, hidden_size) < forward_cost(*unshared_shape, hidden_size)


def hidden_size_of(hf_model):
    config = hf_model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "hidden_size", None)
    return int(size) if size else int(hf_model.get_input_embeddings().embedding_dim)


def _zero3_partitioned(model):
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _say_once(kind, line):
    if kind not in _said and (not dist.is_initialized() or dist.get_rank() == 0):
        _said.add(kind)
        print(line, flush=True)


def decide_sharing(model, hf_model, unshared_shape, packed_shape, mode, device):
    """Whether to score a batch shared: `mode` "auto" by the cost above, anything else (on,
    True) always. Under ZeRO-3 every rank must run the same modules in the same order, so
    there the ranks agree (shared only where every rank's batch saves work)."""
    if mode != "auto":
        return True
    hidden = hidden_size_of(hf_model)
    shared = sharing_saves_work(unshared_shape, packed_shape, hidden)
    if dist.is_initialized() and dist.get_world_size() > 1 and _zero3_partitioned(model):
        vote = torch.tensor([int(shared)], device=device)
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        shared = bool(vote.item())
    tally["shared" if shared else "unshared"] += 1
    if not shared:
        (n, t), (g, w) = unshared_shape, packed_shape
        _say_once("unshared", f"prefix sharing (auto): scoring batches unshared where packing costs more, e.g. "
                              f"{n} rows x {t} tokens against {g} packed rows x {w} (cost {forward_cost(n, t, hidden):,} "
                              f"vs {forward_cost(g, w, hidden):,} attention pairs; --prefix_sharing on forces it)")
    return shared


def sharing_summary():
    """One line on how `auto` scored this process's batches, or None if it decided none."""
    total = tally["shared"] + tally["unshared"]
    if not total:
        return None
    return (f"prefix sharing (auto): {tally['shared']} of {total} batches shared, {tally['unshared']} scored unshared "
            "(packing them would have cost more)")
