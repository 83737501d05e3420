"""Model families of tint_hf, one self-contained folder each (uploadable as remote code)."""
