"""lit_heads: SFT of causal LMs with attention-head activation patterns."""
__version__ = "0.1.0"
