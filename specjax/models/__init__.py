"""Model code: the one decoder, its KV cache, and checkpoint loading."""
