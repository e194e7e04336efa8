"""Measuring models: eval metrics (`metrics`: avg@K, pass@k, maj@K, comparisons) and ProcessBench's error
localization (`localize`)."""
