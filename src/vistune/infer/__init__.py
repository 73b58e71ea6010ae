"""Inference: the engine that chat, ask, eval and serve use."""
