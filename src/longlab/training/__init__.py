"""Long-context fine-tuning (``longlab finetune``): train a checkpoint at a longer length under a
position method — plain fine-tuning, PoSE or LongLoRA — and save a plain transformers checkpoint whose
config carries the method."""
