"""The dataset a run makes: its configs (`export`), its card (`card`) and its statistics (`analysis`: Table 1)."""
