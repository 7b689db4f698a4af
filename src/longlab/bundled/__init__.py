"""The bundled model's pipeline: its tokenizer, its training recipe and its model card (the
checkpoint itself is in ``tiny/``; :mod:`longlab.loading` loads it)."""
