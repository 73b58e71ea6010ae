"""Evaluation: metrics as pure functions (`metrics`), benchmark tasks and judges built on the engine."""
