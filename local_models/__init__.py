"""Local quantized models run by llama.cpp (the cascade tiers). Arrives with the cascade issue; today it only
locates the packaged GGUF files so tests and benchmarks can start a real upstream on them."""
