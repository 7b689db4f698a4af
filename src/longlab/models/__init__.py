"""The bridge to transformers: patching a loaded model so that longlab computes its attention."""
