"""Engine integrations: the only package that imports inference engines.

Each module imports its engine lazily and fails with an install hint when it is missing:
`transformers` (Hugging Face), `model` (the offline SmolLM2 model folder), later `vllm`.
"""
