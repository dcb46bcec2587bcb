"""The recipe: its schema (schema.py), loading and the key errors (load.py), the checks across keys (checks.py), the
tasks' own settings (task_settings.py), the launcher it runs under (launcher.py) and the key cache (keys.py).

`load_recipe` and `Recipe` are what the rest of the package uses."""

from qlora_pipeline.recipe.load import load_recipe
from qlora_pipeline.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe"]
