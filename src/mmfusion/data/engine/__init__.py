"""The data engine: build, check, de-duplicate, version and stream multimodal datasets."""
