"""Data layer: image/mask IO, the toy dataset generator, VOC/COCO layouts, transforms, torch datasets."""
