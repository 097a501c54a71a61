"""Fun-ASR-Nano (the second pass): a random-weight model builder laid out like the real
FunAudioLLM/Fun-ASR-Nano-2512, and a recogniser running FunASR's own FunASRNano."""
