"""The unified autoregressive model: one decoder over text tokens and VQ codes."""
