"""Ranks on several nodes, simulated on this machine: two `torchrun --nnodes 2 --nproc_per_node 1`
"nodes", each with its own working directory, the output directory shared, and the data cache
`--data_output_path` either one per node (a node-local disk) or shared. Every run must equal the same run as 1 node x 2 ranks
under the deepspeed launcher, bit for bit in fp32; a node's rank killed mid-run must take the
other node down within a bounded time, and `--resume auto` must then end where an
uninterrupted run ends.

Runs are few and shared between tests (module fixtures): each costs a launch of two ranks.
"""
import os
import re
import time

import psutil
import pytest
from helpers import SRC, finish, free_port, launcher, start, train_losses
from safetensors.torch import load_file

# every test here starts processes: the slow tier (conftest.py enforces the mark)
pytestmark = pytest.mark.slow

# 64 records x 2 groups of K=2 / (4 x 2 ranks) = 16 steps an epoch; 4 are run, a resumable
# checkpoint every 2.
TRAIN_FLAGS = ["--loss_type", "exo-rw", "--num_contrastive", "2", "--max_seq_len", "48", "--max_gen_len", "16",
               "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16", "--learning_rate", "5e-3",
               "--seed", "7", "--max_iter_step", "4", "--save_step_interval", "2", "--print_loss",
               "--dist_timeout_min", "2"]
# config: (flags, where the two nodes' data cache is)
CONFIGS = {
    "zero2-lora": (["--zero_stage", "2", "--lora_dim", "4", "--only_optimize_lora"], "node-local"),
    "zero3": (["--zero_stage", "3"], "shared"),
}
SAMPLE_FLAGS = ["--split", "test", "--return_num", "2", "--temp", "1.0", "--max_new_tokens", "6",
                "--max_length", "24", "--batch_size", "3", "--seed", "11", "--prompt_num", "11"]
# A dead peer closes its sockets, so gloo fails the survivors' next collective at once; the
# bound asserted is what the runs below are given (--dist_timeout_min 2) plus teardown.
KILL_BOUND_S = 150


# a two-node run here takes two interpreters, two rendezvous and two caches
NODE_RUN_TIMEOUT_S = 400


def start_two_nodes(script, flags, root, cache="node-local"):
    """The two "nodes" of one run: [node 0's torchrun, node 1's torchrun], each started in its
    own directory under `root`; a training stage's data cache is ROOT/nodeN/cache (node-local)
    or ROOT/cache (shared); None: no cache flag."""
    port, nodes = free_port(), []
    for node in (0, 1):
        node_dir = root / f"node{node}"
        node_dir.mkdir(parents=True, exist_ok=True)
        nodes.append(start(["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                            "--master_addr", "127.0.0.1", "--master_port", str(port), str(SRC / script), *flags,
                            *cache_flag(root, node, cache)], cwd=node_dir))
    return nodes


def cache_flag(root, node, cache):
    if cache is None:
        return []
    return ["--data_output_path", str(root / f"node{node}" / "cache" if cache == "node-local" else root / "cache")]


def two_nodes(script, flags, root, cache="node-local"):
    """Run on two nodes; return node 0's output (rank 0's lines)."""
    outputs = [finish(node, NODE_RUN_TIMEOUT_S) for node in start_two_nodes(script, flags, root, cache)]
    assert "ChildFailedError" not in "".join(outputs), outputs[0][-3000:] + outputs[1][-3000:]
    return outputs[0]


def one_node(script, flags, root, cache=True):
    return finish(start([*launcher(2), f"src/{script}", *flags, *(["--data_output_path", str(root / "cache")] if cache else [])]),
                  NODE_RUN_TIMEOUT_S)


def train_flags(config, model, data, out):
    return ["--model_name_or_path", model, "--data_name_path", f"toy/rw:{data['rw']}", "--output_dir", str(out),
            *TRAIN_FLAGS, *CONFIGS[config][0]]


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def assert_bit_equal(dir_a, dir_b):
    a, b = weights(dir_a), weights(dir_b)
    assert a.keys() == b.keys()
    differing = {k: (a[k] - b[k]).abs().max().item() for k in a if not a[k].equal(b[k])}
    assert not differing, differing


@pytest.fixture(scope="module")
def training_runs(tiny_model, align_data, tmp_path_factory):
    """{config: {"one": (out, output), "two": (out, output, root)}}: each config as 1 node x 2
    ranks and as 2 nodes x 1 rank."""
    runs = {}
    for config in CONFIGS:
        root = tmp_path_factory.mktemp(config)
        one_out, two_out = root / "one_node_out", root / "two_nodes_out"
        one = one_node("train_exo.py", train_flags(config, tiny_model, align_data, one_out), root / "one_node")
        assert "saved the final model" in one, one[-3000:]
        two = two_nodes("train_exo.py", train_flags(config, tiny_model, align_data, two_out), root / "two_nodes",
                        CONFIGS[config][1])
        assert "saved the final model" in two, two[-3000:]
        runs[config] = {"one": (one_out, one), "two": (two_out, two, root / "two_nodes")}
    return runs


@pytest.mark.parametrize("config", CONFIGS)
def test_two_nodes_train_bit_equal_to_one_node(training_runs, config):
    """Same seed, same global batch: the weights of every export and the logged losses of 2 nodes
    x 1 rank equal those of 1 node x 2 ranks exactly."""
    (one_out, one), (two_out, two, _) = training_runs[config]["one"], training_runs[config]["two"]
    assert train_losses(one) == train_losses(two) and len(train_losses(two)) == 4
    for sub in ("", "ckpt1", "ckpt2"):
        assert_bit_equal(one_out / sub, two_out / sub)


@pytest.mark.parametrize("config", CONFIGS)
def test_caches_are_built_where_each_node_reads_them(training_runs, config):
    """Node-local --data_output_path: each node's own directory ends with the tokenised splits
    and the reference log-probs. Shared: the one directory holds one copy of each. No probe
    marker or temporary is left, and nothing is written into the nodes' working directories."""
    _, _, root = training_runs[config]["two"]
    local = CONFIGS[config][1] == "node-local"
    caches = [root / f"node{n}" / "cache" for n in (0, 1)] if local else [root / "cache"]
    for cache in caches:
        names = sorted(os.listdir(cache))
        assert [name.split("_")[0] for name in names] == ["ref", "ref", "toy", "toy"], names  # train and test
    for n in (0, 1):
        assert sorted(os.listdir(root / f"node{n}")) == (["cache"] if local else [])


@pytest.mark.parametrize("config", CONFIGS)
def test_killing_node1_stops_node0_and_resume_ends_bit_equal(training_runs, tiny_model, align_data, tmp_path,
                                                            config):
    """SIGKILL to node 1's rank after step 3: node 0 exits non-zero within KILL_BOUND_S, node 1's
    torchrun too; both relaunched with --resume auto resume from the step-2 checkpoint and end
    bit-equal to the uninterrupted two-node run (for a LoRA run under ZeRO-2 and a ZeRO-3 run)."""
    out = tmp_path / "out"
    flags = train_flags(config, tiny_model, align_data, out)
    node0, node1 = start_two_nodes("train_exo.py", flags, tmp_path, CONFIGS[config][1])
    for line in node0.stdout:
        if "[train step 3]" in line:
            break
    else:
        pytest.fail(f"node 0 ended before step 3: {finish(node1, NODE_RUN_TIMEOUT_S)[-3000:]}")
    rank = next(p for p in psutil.Process(node1.pid).children(recursive=True) if "train_exo.py" in " ".join(p.cmdline()))
    killed_at = time.monotonic()
    rank.kill()
    finish(node0, timeout=KILL_BOUND_S)
    stopped_after = time.monotonic() - killed_at
    finish(node1, timeout=KILL_BOUND_S)
    assert node0.returncode != 0 and node1.returncode != 0
    assert stopped_after < KILL_BOUND_S
    print(f"{config}: node 0 stopped {stopped_after:.1f} s after node 1's rank was killed")

    resumed = two_nodes("train_exo.py", [*flags, "--resume", "auto"], tmp_path, CONFIGS[config][1])
    assert re.search(r"resumed from .* at step 2\b", resumed), resumed[-3000:]
    ref_out, ref_output, _ = training_runs[config]["two"]
    assert train_losses(resumed) == {s: v for s, v in train_losses(ref_output).items() if s > 2}
    assert_bit_equal(ref_out, out)


def test_sharded_sampling_over_two_nodes_merges_to_the_one_node_file(tiny_model, align_data, tmp_path):
    """inference_sft splits the prompts by global rank and merges the shards through the shared
    output directory: the merged file equals the 1 node x 2 ranks one byte for byte."""
    def flags(out):
        return ["--model_name_or_path", tiny_model, "--data_name_path", f"toy/rw:{align_data['rw']}",
                "--output_path", str(out), *SAMPLE_FLAGS]

    one = one_node("inference_sft.py", flags(tmp_path / "one_out"), tmp_path / "one", cache=False)
    two_nodes("inference_sft.py", flags(tmp_path / "two_out"), tmp_path / "two", cache=None)
    merged_one, merged_two = (tmp_path / "one_out" / "test.json"), (tmp_path / "two_out" / "test.json")
    assert merged_one.is_file(), one[-3000:]
    assert merged_one.read_bytes() == merged_two.read_bytes()
    assert sorted(os.listdir(tmp_path / "two_out")) == sorted(os.listdir(tmp_path / "one_out"))  # shards removed
