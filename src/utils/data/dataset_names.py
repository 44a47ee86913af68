"""From `--data_name_path` (and `--dataset_module`) to the raw datasets it names.

NAME/KIND:PATH is parsed, dataset modules are imported, and each name is resolved (a dataset
of your own can be added by hand in get_raw_dataset).
"""
import hashlib
import importlib
import importlib.util
import os
import sys

from .raw_datasets import check_columns_for_kind, parse_columns, resolve_dataset
from ..fileio import InputError


def parse_data_name_path(spec):
    """'NAME/KIND:PATH' -> ('NAME/KIND', 'PATH')."""
    name_kind, sep, path = spec.partition(":")
    if not sep or not name_kind or not path:
        raise InputError(f"--data_name_path {spec!r}: expected NAME/KIND:PATH, e.g. imdb/rw:data/imdb_rw")
    return name_kind, path


def import_dataset_module(module):
    """Import a file path or module name so that its @register_dataset classes register."""
    try:
        if module.endswith(".py") or os.path.sep in module:
            if not os.path.isfile(module):
                raise InputError(f"--dataset_module {module}: no such file")
            name = "exo_align_user_datasets_" + hashlib.sha1(os.path.abspath(module).encode()).hexdigest()[:8]
            spec = importlib.util.spec_from_file_location(name, module)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            spec.loader.exec_module(loaded)
            return loaded
        return importlib.import_module(module)
    except ImportError as err:
        raise InputError(f"--dataset_module {module}: cannot import ({err})") from None


def get_raw_dataset(name_kind, path, split_names=None, columns=None):
    """The raw dataset `NAME[/KIND]` at `path`, as `--data_name_path NAME[/KIND]:PATH` names it.

    Datasets of your own can be added here by hand, one entry each, as in DeepSpeed-Chat:

        if name == "my_tsv":
            dataset = MyTsv(name, path, kind or None)

    or, with no edit to this file, registered with @register_dataset in a module passed with
    --dataset_module (utils/data/raw_datasets.py). Any other name with a standard KIND reads
    the standard files. `split_names` (--data_split_names) and `columns` (--columns) apply to
    every dataset.
    """
    name, _, kind = name_kind.partition("/")
    dataset = None
    # -- datasets added by hand go here --
    if dataset is None:
        dataset = resolve_dataset(name_kind, path)
    if split_names:
        dataset.split_names = dict(zip(("train", "test"), split_names))
    if columns:
        check_columns_for_kind(columns, dataset.kind, name_kind)
        dataset.columns = dict(columns)
    return dataset


def load_raw_datasets(data_name_paths, dataset_modules=(), split_names=None, columns=None):
    for module in dataset_modules or ():
        import_dataset_module(module)
    columns = parse_columns(columns) if isinstance(columns, str) else columns
    return [get_raw_dataset(*parse_data_name_path(spec), split_names=split_names, columns=columns)
            for spec in data_name_paths]
