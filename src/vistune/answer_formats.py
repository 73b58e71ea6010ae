"""LLaVA-1.5's response-format prompts (paper, Table 7): the line after a question that says how to answer.

Training data (`vistune.datagen.mix`) and evaluation (`vistune.eval.tasks`) must use the same text, or a
model is scored on prompts it never saw; both import it from here. A leaf: it imports nothing.
"""

from __future__ import annotations

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTER_ANSWER_CN = "请直接回答选项字母。"  # MMBench-CN, as LLaVA's eval scripts ask it
VIZWIZ_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
CAPTION = "Provide a one-sentence caption for the provided image."
REGION = "Please provide a short description for this region: {box}"
GROUND = "Please provide the bounding box coordinate of the region this sentence describes: {phrase}"

__all__ = ["CAPTION", "GROUND", "LETTER_ANSWER", "LETTER_ANSWER_CN", "REGION", "SHORT_ANSWER", "VIZWIZ_UNANSWERABLE"]
