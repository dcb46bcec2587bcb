"""Data: rows read and checked from a file, a folder or the Hub (rows.py), tokenized (tokenize.py), rendered by a
prompt template (templates.py), packed into full-length rows (packing.py); the shipped samples in samples/."""
