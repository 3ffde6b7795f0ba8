"""Alpaca instruction data for fine-tuning (prepare.py)."""
