"""Second pass: Fun-ASR-Nano (audio encoder + adaptor + LLM) on vLLM or torch."""
