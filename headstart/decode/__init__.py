"""Decoding rules over logits: sampling, logit processors, grammars, stop strings."""
