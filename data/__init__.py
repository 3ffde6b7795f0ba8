"""The project's inputs, one folder each: `data/<name>/prepare.py` turns a raw file (from the
offline mirror named by ROLORA_MIRROR, or its public download; see mirror.py) into what the
scripts read, written next to it and git-ignored. Import them as a package:

    from data.models import resolve_model_dir      # a checkpoint folder, prepared on first use
    from data.wikitext2.prepare import load_test_text
    from data.commonsense import prepare

Each prepare.py also runs as a script: python data/<name>/prepare.py --help
"""
