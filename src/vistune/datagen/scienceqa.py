"""ScienceQA's official `problems.json` + `pid_splits.json` -> LLaVA records, for the paper's ScienceQA finetune.

The text follows LLaVA's `scripts/convert_sqa_to_llava.py` (with `convert_sqa_to_llava_base_prompt.py`'s
`build_prompt_chatbot`, `is_test=False`), which wrote the `llava_train_QCM-LEA.json` LLaVA trained on:

- a prompt format is INPUT-OUTPUT, e.g. QCM-LEA: Q(uestion), C(ontext), M (options), L(ecture),
  E(xplanation = solution), A(nswer), P (LEPA's upper-case sections);
- context is the hint (stripped), "N/A" when empty; options read "(A) x (B) y"; the answer is the letter;
- the two texts are assembled, every double space replaced once by a single one, stripped, a
  dangling "BECAUSE:" removed; then every "Question: " in the input and every "Answer: " in the
  output is deleted (`str.replace`, so also inside a question's own text, as the script does);
- lecture and solution round-trip "\\n" <-> newline, which turns a literal backslash-n into a newline;
- a problem with an image gets "\\n<image>" after the input and `image` = "{pid}/{image file}"
  (relative to ScienceQA's `images/{split}/`); one without gets neither.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vistune.datagen.outputs import claim_output
from vistune.errors import DataError
from vistune.files import write_text
from vistune.tokens import IMAGE_PLACEHOLDER

OPTIONS = "ABCDE"  # build_prompt_chatbot's default option letters

# The input and output templates of create_one_example_chatbot, by format code.
INPUTS = {
    "CQM": "Context: {context}\nQuestion: {question}\nOptions: {choice}\n",
    "QCM": "Question: {question}\nContext: {context}\nOptions: {choice}\n",
    "QCML": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture}\n",
    "QCME": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {solution}\n",
    "QCMLE": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture} {solution}\n",
    "QCLM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {choice}\n",
    "QCEM": "Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {choice}\n",
    "QCLEM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture} {solution}\nOptions: {choice}\n",
}
OUTPUTS = {
    "A": "Answer: The answer is {answer}.",
    "AL": "Answer: The answer is {answer}. BECAUSE: {solution}",
    "AE": "Answer: The answer is {answer}. BECAUSE: {lecture}",
    "ALE": "Answer: The answer is {answer}. BECAUSE: {lecture} {solution}",
    "AEL": "Answer: The answer is {answer}. BECAUSE: {solution} {lecture}",
    "LA": "Answer: {lecture} The answer is {answer}.",
    "EA": "Answer: {solution} The answer is {answer}.",
    "LEA": "Answer: {lecture} {solution} The answer is {answer}.",
    "ELA": "Answer: {solution} {lecture} The answer is {answer}.",
    "LEPA": "",  # sections, built in _output
}


def _output(code: str, fields: dict[str, str]) -> str:
    if code != "LEPA":
        return OUTPUTS[code].format(**fields)
    text = f"LECTURE: {fields['lecture']}\n" if fields["lecture"].strip() else ""
    text += f"SOLUTION: {fields['solution']}\n" if fields["solution"].strip() else ""
    return text + f"###\nANSWER: {fields['answer']}."


def _tidy(text: str) -> str:
    text = text.replace("  ", " ").strip()
    return text.replace("BECAUSE:", "").strip() if text.endswith("BECAUSE:") else text


def problem_texts(problem: dict[str, Any], prompt_format: str = "QCM-LEA") -> tuple[str, str]:
    """(human text without the image placeholder, gpt text) for one problem in `prompt_format`."""
    input_code, _, output_code = prompt_format.partition("-")
    if input_code not in INPUTS or output_code not in OUTPUTS:
        raise DataError(f"unknown ScienceQA prompt format {prompt_format!r}; valid: INPUT-OUTPUT with INPUT in "
                        f"{', '.join(INPUTS)} and OUTPUT in {', '.join(OUTPUTS)}", "bad option")
    context = " ".join([problem.get("hint") or "", ""]).strip() or "N/A"  # use_caption=False: no caption
    fields = {"question": problem["question"], "context": context,
              "choice": " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"])),
              "answer": OPTIONS[problem["answer"]],
              "lecture": (problem.get("lecture") or "").replace("\n", "\\n").replace("\\n", "\n"),
              "solution": (problem.get("solution") or "").replace("\n", "\\n").replace("\\n", "\n")}
    text_in, text_out = _tidy(INPUTS[input_code].format(**fields)), _tidy(_output(output_code, fields))
    if text_in.startswith("Question: "):
        text_in = text_in.replace("Question: ", "")
    if text_out.startswith("Answer: "):
        text_out = text_out.replace("Answer: ", "")
    return text_in, text_out


def convert_scienceqa(root: Path, split: str = "train", prompt_format: str = "QCM-LEA",
                      out: Path | None = None) -> tuple[Path, int, int]:
    """Write the split's LLaVA records (default ROOT/llava_{split}_{format}.json, as LLaVA names it);
    returns (path, records, records with an image)."""
    for name in ("problems.json", "pid_splits.json"):
        if not (root / name).is_file():
            raise DataError(f"scienceqa: {root / name} is missing (ScienceQA's data/scienceqa folder holds it)",
                            "missing file")
    problems = json.loads((root / "problems.json").read_text(encoding="utf-8"))
    splits = json.loads((root / "pid_splits.json").read_text(encoding="utf-8"))
    if split not in splits:
        raise DataError(f"scienceqa: split {split!r} is not in pid_splits.json; valid: {', '.join(splits)}", "bad option")
    records = []
    for pid in splits[split]:
        if pid not in problems:
            raise DataError(f"scienceqa: problem {pid} of split {split} is not in problems.json", "bad record")
        p = problems[pid]
        text_in, text_out = problem_texts(p, prompt_format)
        if p.get("image") is None:
            records.append({"id": pid, "conversations": [{"from": "human", "value": text_in},
                                                         {"from": "gpt", "value": text_out}]})
        else:
            records.append({"id": pid, "image": f"{pid}/{p['image']}",
                            "conversations": [{"from": "human", "value": f"{text_in}\n{IMAGE_PLACEHOLDER}"},
                                              {"from": "gpt", "value": text_out}]})
    path = out or root / f"llava_{split}_{prompt_format}.json"
    claim_output(path, "scienceqa")  # LLaVA's own file of this name may sit there: never replace it
    write_text(path, json.dumps(records, indent=2))
    return path, len(records), sum("image" in r for r in records)
