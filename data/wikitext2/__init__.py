"""The WikiText-2 test text for perplexity (prepare.py)."""
