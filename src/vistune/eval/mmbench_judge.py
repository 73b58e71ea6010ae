"""MMBench's judge matcher: the prompt VLMEvalKit gives a judge LLM to map a reply that its rules
(`metrics.mmbench_parse`) cannot read to an option, and how it reads the judge's answer.

Kept apart from `metrics`, whose functions are pure scoring rules: this module is the text of a judge
conversation; `tasks.choice.MMBench.match_with_judge` runs it through the cached judge client.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vistune.eval.metrics import _MMB_STRIP, OPTION_LETTERS, mmbench_parse

_CJK = re.compile("[\u4e00-\u9fa5]")


def mmbench_matcher_prompt(question: str, options: Sequence[str], reply: str) -> str:
    """The prompt VLMEvalKit's `extract_answer_from_item` gives its judge to map a reply to an option
    (`build_prompt`, or `build_prompt_cn` when the question has Chinese characters), options as
    `build_option_str` lists them. The wording is the official one: the judge was tuned to it."""
    option_str = "There are several options: \n" + "".join(f"{OPTION_LETTERS[i]}. {o}\n" for i, o in enumerate(options))
    if _CJK.search(question):
        return ("你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。"
                "你会被提供：一个问题，多个选项，一个答案。你的任务是找到与答案意义最相近的选项。"
                "如果所有选项的意义都与答案显著不同，则输出 Z。"
                "你应该输出一个单个的大写字母，例如 A, B, C, D（如果它们是有效选项），或 Z。"
                "例 1:"
                "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 一只可爱的泰迪熊\n输出: A\n"
                "例 2: \n"
                "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 蜘蛛\n输出: Z\n"
                f"例 3: \n问题: {question}?\n选项: {option_str}\n答案: {reply}\n输出: ")
    return ("You are an AI assistant who will help me to match an answer with several options of a single-choice "
            "question. You are provided with a question, several options, and an answer, and you need to find which "
            "option is most similar to the answer. If the meaning of all options are significantly different from the "
            "answer, output Z. Your should output a single uppercase character in A, B, C, D (if they are valid "
            "options), and Z. \n"
            "Example 1: \n"
            "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
            "Answer: a cute teddy bear\nYour output: A\n"
            "Example 2: \n"
            "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
            "Answer: Spider\nYour output: Z\n"
            f"Example 3: \nQuestion: {question}?\nOptions: {option_str}\nAnswer: {reply}\nYour output: ")


def mmbench_judge_letter(reply: str, options: Sequence[str]) -> str | None:
    """The judge's reply as VLMEvalKit reads it (`can_infer` again): an option letter, "Z" (no option
    fits: final, scored wrong) or None (unreadable: VLMEvalKit asks again)."""
    letter = mmbench_parse(reply, len(options), options)
    if letter is not None:
        return letter
    tokens = reply
    for ch in _MMB_STRIP:
        tokens = tokens.replace(ch, " ")
    return "Z" if "Z" in tokens.split() else None
