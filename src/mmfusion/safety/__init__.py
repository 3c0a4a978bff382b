"""Safety tools on mmfusion's own models (issue 17): adversarial-input detection (SCD, `scd`), the attacks that
test it (`attacks`), embedding-space concept filters (`filters`) and provenance of generated media
(`provenance`, `watermark`)."""
