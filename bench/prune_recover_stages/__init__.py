"""The stages of bench/prune_recover.py, one module each (its docstring tells the whole run)."""
