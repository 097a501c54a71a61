"""Model logic and shared code of the two-pass streaming ASR service."""
