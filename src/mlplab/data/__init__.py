"""DataModules: every dataset is held as preprocessed tensors and served by tensor indexing."""

from mlplab.data.digits import DigitsDataModule
from mlplab.data.tensor import BatchSliceSampler, BatchTensorDataset, TensorDataModule, split_indices
from mlplab.data.toy import MoonsDataModule, XORDataModule
from mlplab.data.vision import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "BatchSliceSampler",
    "BatchTensorDataset",
    "TensorDataModule",
    "split_indices",
    "DigitsDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "XORDataModule",
    "MoonsDataModule",
]
