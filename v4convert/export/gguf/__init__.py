"""GGUF export for llama.cpp / Ollama."""
