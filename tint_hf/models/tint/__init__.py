"""TinT: Trainable Transformer in Transformer."""
