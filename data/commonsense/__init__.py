"""The seven commonsense tasks in lm-evaluation-harness form (prepare.py)."""
