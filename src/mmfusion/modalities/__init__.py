"""One file per modality: its preprocessing, tokenizer (if any) and encoders."""
