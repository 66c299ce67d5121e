"""Nets (plain ``nn.Module``) and the LightningModule that trains any of them."""

from mlplab.models.classifier import Classifier
from mlplab.models.losses import ClassificationLoss, CrossEntropy, SquaredError
from mlplab.models.nets import MLP, SigmoidNet, SimpleNet

__all__ = ["Classifier", "MLP", "SigmoidNet", "SimpleNet", "ClassificationLoss", "CrossEntropy", "SquaredError"]
