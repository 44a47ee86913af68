"""`TrainingSetup`: what every training stage sets up before its model (ranks, tokenizer, data)."""
import torch
from transformers.integrations import HfDeepSpeedConfig

from .data.cache import DEFAULT_CACHE_DIR
from .data.tokenisation import Tokenisation
from .data.tokenised_datasets import build_dataset
from .data.dataset_names import load_raw_datasets
from .distributed import init_distributed
from .ds_utils import train_ds_config
from .model_utils import load_tokenizer


class TrainingSetup:
    """What every training stage sets up first, in one place: the ranks, the device, the
    tokenizer, the tokenisation rule and the raw datasets. Under ZeRO-3 it also holds the
    `HfDeepSpeedConfig` that must stay alive while models load, so that transformers builds
    their weights already partitioned across ranks instead of whole on every rank."""

    def __init__(self, args):
        self.device = init_distributed(args)
        self.world_size = torch.distributed.get_world_size()
        args.data_output_path = args.data_output_path or DEFAULT_CACHE_DIR
        self.hf_ds_config = HfDeepSpeedConfig(train_ds_config(args, self.world_size)) if args.zero_stage == 3 else None
        self.tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
        self.tokenisation = Tokenisation(self.tokenizer, args.max_seq_len, args.max_gen_len, args.chat_template,
                                         args.chat_template_date)
        self.raw = load_raw_datasets(args.data_name_path, args.dataset_module, args.data_split_names, args.columns)
        self.cache_dir = args.data_output_path

    def datasets(self, encoding, make_encoder):
        """{"train": (dataset, cache key), "test": (...)} tokenised by `make_encoder`."""
        return {split: build_dataset(self.raw, split, self.tokenisation, self.cache_dir, encoding, make_encoder)
                for split in ("train", "test")}
