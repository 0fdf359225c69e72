"""Data loaders: built-in tensor data sets, user .npz files, and text corpora.

Tensor data (`load_dataset`): `digits` (scikit-learn, bundled), `mnist` and `cifar10` (read in
place from the shared data folder), or a user `.npz` file. `validate_for_model` checks a data
set against a model's input shape and classes. Text corpora (`load_text_corpus`) come back as
strings and labels for the embedding step.
"""

from verifier.data.datasets import BUILTIN_DATASETS, load_dataset, validate_for_model
from verifier.data.locations import default_cache_dir, default_data_dir
from verifier.data.samples import Dataset, data_sha256
from verifier.data.text import TEXT_CORPORA, TextCorpus, load_text_corpus

__all__ = [
    "BUILTIN_DATASETS",
    "TEXT_CORPORA",
    "Dataset",
    "TextCorpus",
    "data_sha256",
    "default_cache_dir",
    "default_data_dir",
    "load_dataset",
    "load_text_corpus",
    "validate_for_model",
]
