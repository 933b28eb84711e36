"""Models: the embedded tiny base model (tiny.py), loading tokenizers and causal LMs (loading.py), and merging a
stage's adapter into its input model (merging.py)."""
