"""Artifacts on disk and what is in them: schemas, manifests, tokenization, pairing, the training order."""
