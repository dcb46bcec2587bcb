"""Builders of the embedded tiny models, one module per architecture; model/tiny.py names them and builds on use."""
