"""The model: vision tower, projector, LLM, their composition, and the checkpoint format."""
