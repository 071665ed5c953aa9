"""GRPO training for ERGO on TRL (run from the repository root: ``python -m training.grpo --config ...``)."""
