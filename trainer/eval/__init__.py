"""Evaluation: benchmarks, prompting, generation backends, grading and metrics."""
