"""Layer 0, the ground floor: errors, configuration dataclasses and the version. Imports nothing else of
knnmt (see ``tests/test_layers.py`` for the layers)."""
