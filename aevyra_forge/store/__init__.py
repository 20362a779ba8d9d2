"""The only writer under .forge/: the append-only experiment log with exact replay, the
human and machine tables, best_recipe.yaml and the run lock."""
