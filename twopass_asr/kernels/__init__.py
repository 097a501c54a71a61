"""CPU helpers: linear layers packed once at load, process priority."""
