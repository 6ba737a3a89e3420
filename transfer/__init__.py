"""Backbone export and transfer evaluation: linear/kNN, segmentation (mmseg), detection
(detectron2), depth."""

# --weights: which network of a checkpoint: a pretraining (or official JAX) checkpoint's ema /
# online / target network, or DINO's student / teacher (ema = the teacher, DINO's EMA network)
WEIGHTS = ("ema", "online", "target", "student", "teacher")
