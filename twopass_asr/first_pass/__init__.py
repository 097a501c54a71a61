"""First pass: the streaming Paraformer, batched over streams."""
