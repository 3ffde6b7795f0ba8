"""HellaSwag validation items in lm-evaluation-harness form (prepare.py)."""
