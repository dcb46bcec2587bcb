"""Training a model, what every task shares: the SFT trainer that scores labelled positions only (trainer.py), the
run's callbacks (callbacks.py), its checkpoints (checkpoints.py) and what it measures about itself (measures.py)."""
