"""Models: ResNet backbones, ResNet-38, DeepLab-V2, and the single verified weights loader."""

from .backbones import ResNetBackbone, build_resnet, freeze_batchnorm
from .deeplab import ASPP, DeepLabV2, build_deeplabv2
from .resnet38 import ResNet38, build_resnet38, freeze_stem
from .weights import load_weights

__all__ = ["ResNetBackbone", "build_resnet", "freeze_batchnorm", "ASPP", "DeepLabV2", "build_deeplabv2",
           "ResNet38", "build_resnet38", "freeze_stem", "load_weights"]
