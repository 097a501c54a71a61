"""Streaming FSMN-VAD, batched over streams."""
