"""The native engine: one process, PyTorch + transformers, CPU or one GPU.

step.py holds the per-batch training step shared with the verl path; optim.py the
optimizer and schedule; checkpoint.py resumable state; progress.py the progress display;
loop.py the training loop of the train stage.
"""
