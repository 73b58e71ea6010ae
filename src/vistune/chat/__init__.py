"""Conversation formats and turning conversations into token ids with labels."""
