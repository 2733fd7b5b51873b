"""Model building (shipped as verm_local.convert): tiny test model, GGUF conversion and
quants, and the llama.cpp sources they come from."""
