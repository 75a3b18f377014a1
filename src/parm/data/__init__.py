"""Datasets: readers for the standard on-disk formats, the dataset registry, download, splits.

Public names are listed in ``__all__``; everything else in this package is private.
"""

from parm.data.cifar import read_cifar
from parm.data.download import RemoteFile
from parm.data.idx import read_idx
from parm.data.imagefolder import read_image_folder
from parm.data.inputs import load_inputs
from parm.data.registry import (
    DATASETS,
    ArrayDataset,
    DatasetSpec,
    dataset_identity,
    download_dataset,
    load_dataset,
    train_val_split,
    verify_dataset,
)
from parm.data.root import resolve_data_root

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetSpec",
    "RemoteFile",
    "dataset_identity",
    "download_dataset",
    "load_dataset",
    "load_inputs",
    "read_cifar",
    "read_idx",
    "read_image_folder",
    "resolve_data_root",
    "train_val_split",
    "verify_dataset",
]
