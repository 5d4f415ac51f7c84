"""Datasets and transforms for training and evaluation (see ``create_dataset``)."""

from .datasets import (
    FASHION_MNIST_CLASSES,
    ArrayDataset,
    FolderDataset,
    SyntheticDataset,
    check_labels,
    find_fashion_mnist,
    read_idx,
)
from .factory import DATASETS, build_transform, create_dataset, dataset_stats

__all__ = ['DATASETS', 'FASHION_MNIST_CLASSES', 'ArrayDataset', 'FolderDataset', 'SyntheticDataset', 'build_transform',
           'check_labels', 'create_dataset', 'dataset_stats', 'find_fashion_mnist', 'read_idx']
