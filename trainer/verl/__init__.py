"""PSFT on verl (FSDP2, multi-GPU) for clusters, and the CPU platform plugin that lets the
same path run on CPUs (tests, laptops)."""
