"""LLaMA inference in PyTorch: model, Meta checkpoint loading, tokenizer, generation, engine.

Importing this package imports torch; the web process must only import it lazily.
"""
