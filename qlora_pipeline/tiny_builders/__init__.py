"""Builders of the embedded tiny models other than the Starling-shaped ones (see qlora_pipeline/tiny.py)."""
