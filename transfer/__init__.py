"""Backbone export and transfer evaluation: linear/kNN, segmentation (mmseg), detection (detectron2), depth."""
