"""The classical fused text+audio baseline (frozen sentence embeddings + prosody, VAD-guided fusion,
speaker-aware context GRU). Shares ``erc_llm.data`` and the evaluation metrics; never imports the LLM."""
