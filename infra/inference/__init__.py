"""Inference serving: llama.cpp artifacts for the lab (wheel, tiny GGUF model) and `bench-inference`."""
