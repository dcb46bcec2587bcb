"""What a run leaves for people to read: the model card (card.py, from card_template.md), the report with its plots
(report.py), the evaluation table (evaluation_table.py) and the Weights & Biases run (tracking.py)."""
