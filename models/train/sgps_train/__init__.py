"""Training recipe for the sgps shipped models (image encoder, text encoder, synthesizer)."""
