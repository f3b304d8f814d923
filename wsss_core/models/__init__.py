"""Models: ResNet backbones, DeepLab-V2, and the single verified weights loader."""

from .backbones import ResNetBackbone, build_resnet, freeze_batchnorm
from .deeplab import ASPP, DeepLabV2, build_deeplabv2
from .weights import load_weights

__all__ = ["ResNetBackbone", "build_resnet", "freeze_batchnorm", "ASPP", "DeepLabV2", "build_deeplabv2", "load_weights"]
