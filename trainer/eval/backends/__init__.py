"""Generation backends for evaluation: transformers (CPU, one GPU) and vLLM (GPU pods)."""
