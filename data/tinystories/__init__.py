"""TinyStories text for fine-tuning stories260K (prepare.py)."""
