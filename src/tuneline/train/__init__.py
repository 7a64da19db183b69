"""The trainer core: family-agnostic training under accelerate (see trainer.py).

Importing this package is instant; torch loads inside the modules that need it.
"""
