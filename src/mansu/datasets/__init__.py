"""Bundled cloze fact sets (JSONL), built by tools/build_fact_sets.py and verified on the embedded model."""
