"""nn.Modules only: the paper's MLP, LeNet-5, CIFAR ResNet-18 (and a 28×28 variant), build_model."""

from parm.models.lenet import LeNet5
from parm.models.mlp import MLP, TileMLP
from parm.models.registry import ARCHITECTURES, build_model, check_arch
from parm.models.resnet import ResNet18

__all__ = ["ARCHITECTURES", "LeNet5", "MLP", "ResNet18", "TileMLP", "build_model", "check_arch"]
