"""ectune: Easy Consistency Tuning (ECT), improved Consistency Training (iCT) and EDM diffusion
training, sampling and evaluation in PyTorch, from one CPU to many GPUs."""

__version__ = "0.1.0"
