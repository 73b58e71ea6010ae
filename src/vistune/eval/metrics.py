r"""Benchmark scoring as pure functions, checked rule by rule against the official tools' source.

Each rule below names the file it was compared with, line by line (read from the stored public
GitHub index; "repo:path"). The tables (contractions, number words, punctuation) and the parsing
rules are facts taken from those files; the code is ours. tests/parity/test_eval_metrics.py pins, for each,
a case where a naive implementation would score differently. Where two official tools disagree, we
follow the one LLaVA-1.5's published numbers came from and say so:

- VQA answer processing and soft accuracy. Compared with LLaVA's `llava/eval/m4c_evaluator.py`
  (`EvalAIAnswerProcessor`, `TextVQAAccuracyEvaluator`), read from the LLaVA fork
  pixas/LLaVA:llava/eval/m4c_evaluator.py (haotian-liu/LLaVA's own copy is not in the index; its
  `llava/eval/eval_textvqa.py`, which imports it, is, and was read too). Same steps, same order:
  lowercase, drop "," and "?", "'s" -> " 's", newline/tab -> space, the punctuation rule (delete a
  mark that touches a space, else replace it by a space), the period strip, number words (none..ten),
  articles, contractions (table identical, key for key). Quirks kept: the period pattern
  `(?!<=\d)(\.)(?!\d)` is a lookahead typo, so "3." loses its period; the call passes `re.UNICODE`
  as the `count` argument, so at most 32 periods go; "Im"/"Ive" keys never match (text is
  lowercased first). Soft accuracy: for each of the 10 human answers left out, min(1, matches among
  the other 9 / 3), averaged. The evaluator asserts exactly 10 answers; `vqa_accuracy` takes any
  number >= 1 with the same formula. The VQA server (vqaEval.py) normalises only when the 10 answers
  disagree; LLaVA's VQAv2/VizWiz converters run this processor on predictions before upload.
- POPE. LLaVA's `eval_pope.py` pairs predictions with labels by position in the label file; we pair
  by question id (same result on the official files). Its parser is case sensitive: "No"/"no"/"not"
  as a whole word in the first sentence means no, anything else yes, so "Not sure" is a yes (kept).
  The script divides by zero when nothing is predicted yes; `pope_metrics` reports precision 0 there.
- MME. Compared with MME's `eval_tool/calculation.py` (the stored copy is zjunlp/Deco:
  eval_tool/calculation.py; MME's own repo is not in the index) and with LLaVA's
  haotian-liu/LLaVA:playground/data/eval/MME/convert_answer_to_mme.py + scripts/v1_5/eval/mme.sh.
  The reply is lowercased; exactly "yes"/"no", else "yes" then "no" searched in its first 4
  characters ("not sure" -> no, "i know" -> no: "know" holds "no"), else "other" (always wrong).
  calculation.py reads the reply with its line's trailing newline, so its exact-match branch never
  fires; the prefix branch gives the same label. acc = per question (sklearn accuracy, "other"
  wrong), acc+ = per image, both questions right; score = 100 acc + 100 acc+; perception and
  cognition are sums over the same 10 and 4 subtask names. It pairs an image's questions by
  consecutive lines, we by image name (the same pairs on the official files).
- ScienceQA. LLaVA's `eval_science_qa.py`: a bare letter, "X. ..." or exactly one "The answer is X."
  match, else FAILED; a letter beyond the question's choices scores as wrong. `scienceqa_parse`
  returns None for both (FAILED and out of range: both are wrong, the letter would mislead).
- GQA. Compared with haotian-liu/LLaVA:scripts/convert_gqa_for_eval.py (`text.rstrip('.').lower()`)
  and scripts/v1_5/eval/gqa.sh, then GQA's `eval.py` (stored copies found by its code, not under a
  GQA repo name): `correct = (predicted == gold)`, no further normalisation (no articles, no number
  words, no strip beyond the trailing periods).
- SEED-Bench. Compared with haotian-liu/LLaVA:scripts/convert_seed_for_submission.py: accuracy is
  `row['text'] == question_data['answer']`, exact, over all image questions (a missing reply is
  wrong); no letter extraction, so "B." or "(B)" is wrong. LLaVA's `model_vqa_loader` strips the
  reply before it is saved; our engine strips too, and `seed_match` strips again (same result).
- MMBench. haotian-liu/LLaVA:scripts/convert_mmbench_for_submission.py only writes the raw replies
  into the submission xlsx; the scoring is the MMBench/VLMEvalKit evaluator, compared with
  open-compass/VLMEvalKit:vlmeval/utils/matching_util.py (`can_infer_option`, `can_infer_text`) and
  vlmeval/dataset/utils/multiple_choice.py (`prefetch_circular_group`, `eval_circular_group`,
  `mcq_circular_eval`). Circular: copies share `index % 1e6`; a question counts only if every copy's
  inferred letter is its answer. Replies `can_infer` cannot read go to a GPT matcher there; we call
  none, they count as wrong (as VLMEvalKit's own exact-matching mode scores them). Later VLMEvalKit
  versions also require the letter to sit among the last 5 tokens, and the first MMBench evaluator
  refused a lone "A" in replies of more than 3 tokens ("A" may be an article); we follow the form
  most stored copies show (no position check, the "A" guard only in verbose mode).
- LLaVA-Bench. `summarize_gpt_review.py` averages the judge's (reference, model) pairs and reports
  model / reference x 100; an unparseable review becomes (-1, -1) and is averaged in. We count
  unparseable reviews and leave them out of both means.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

# --------------------------------------------------------------------------------------------------
# VQA (EvalAI answer processor, m4c TextVQAAccuracyEvaluator)
# --------------------------------------------------------------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# "(?!<=\d)" is the official pattern as written (a typo for a lookbehind: it is a lookahead that
# never fails), so a period is kept only when a digit follows it: "3.5" stays, "end." loses it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)  # count=32: the official call's quirk


def normalize_vqa_answer(text: str) -> str:
    """An answer as the EvalAI processor leaves it: 'Two.' -> '2', 'The Red' -> 'red', 'dont' -> "don't"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _punctuation(text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy: the mean over the human answers of min(1, matches among the others / 3).

    With 10 answers, a prediction given by 3 or more annotators scores 1, by 2 scores 0.9... exactly
    as `TextVQAAccuracyEvaluator`. Both sides go through `normalize_vqa_answer`."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        total += min(1.0, matches / 3)
    return total / len(gts)


def exact_match(prediction: str, answer: str) -> bool:
    """Normalised prediction equals the normalised reference answer (single-answer sets)."""
    return normalize_vqa_answer(prediction) == normalize_vqa_answer(answer)


# --------------------------------------------------------------------------------------------------
# GQA, SEED-Bench
# --------------------------------------------------------------------------------------------------

def normalize_gqa_answer(text: str) -> str:
    """LLaVA's GQA conversion: trailing periods stripped, lowercased (the GQA eval then compares exactly)."""
    return text.rstrip(".").lower()


def gqa_match(prediction: str, answer: str) -> bool:
    return normalize_gqa_answer(prediction) == answer


def seed_match(prediction: str, answer: str) -> bool:
    """SEED-Bench as LLaVA scores it: the (stripped) reply is exactly the answer letter."""
    return prediction.strip() == answer


# --------------------------------------------------------------------------------------------------
# POPE, MME
# --------------------------------------------------------------------------------------------------

def pope_parse(text: str) -> str:
    """'no' if 'No', 'no' or 'not' is a word of the first sentence (case sensitive), else 'yes'."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of parsed predictions ('yes'/'no') against labels.

    A label other than 'no' counts as yes (as the official script does). Undefined ratios are 0."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for p, label in zip(predictions, labels):
        pos, true = p != "no", label != "no"
        tp += pos and true
        fp += pos and not true
        tn += (not pos) and (not true)
        fn += (not pos) and true
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "n": n}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(text: str) -> str:
    """'yes' | 'no' | 'other' as MME's calculation.py reads a reply."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def mme_scores(rows: Iterable[tuple[str, str, str, str]]) -> dict:
    """MME from (subtask, image, reference yes/no, reply) rows.

    Per subtask: acc (per question) and acc+ (per image: both of its questions right), score =
    100 * acc + 100 * acc+; perception and cognition are the sums over their subtasks."""
    per: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for task, image, answer, reply in rows:
        per[task][image].append(mme_parse(reply) == answer.lower())
    tasks = {}
    for task, images in sorted(per.items()):
        flat = [x for xs in images.values() for x in xs]
        acc = sum(flat) / len(flat)
        acc_plus = sum(all(xs) for xs in images.values()) / len(images)
        tasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus,
                       "questions": len(flat), "images": len(images)}
    return {"perception": sum(v["score"] for k, v in tasks.items() if k in MME_PERCEPTION),
            "cognition": sum(v["score"] for k, v in tasks.items() if k in MME_COGNITION),
            "tasks": tasks}


# --------------------------------------------------------------------------------------------------
# Multiple choice: ScienceQA, MMBench
# --------------------------------------------------------------------------------------------------

OPTION_LETTERS = "ABCDEFGHIJ"
# A tuple, as the official script's `--options` list: membership is whole-letter equality, never a
# substring test ("AB" in "ABCDE" would pass).
_SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_parse(text: str, num_choices: int) -> str | None:
    """The chosen letter as eval_science_qa.py reads it, or None where it says FAILED or the letter is
    beyond the question's `num_choices` options (both score as wrong)."""
    if text in _SQA_OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in _SQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _SQA_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else ""
    return letter if letter and letter in _SQA_OPTIONS[:num_choices] else None


_MMB_STRIP = ".()[],:;!*#{}"  # characters VLMEvalKit's can_infer_option turns into spaces
_MMB_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                 "I'm sorry, but without the image provided", "Cannot determine the answer")


def mmbench_parse(text: str, num_options: int, options: Sequence[str] = ()) -> str | None:
    """The option letter a reply picks, as VLMEvalKit's `can_infer` (matching_util.py) reads it, or None
    where it infers nothing (the official pipeline then asks a GPT matcher: `--judge`, see
    `mmbench_matcher_prompt`).

    1. Letters: with `.()[],:;!*#{}` replaced by spaces and the reply split on whitespace, exactly one
       of the question's option letters is a whole token -> that letter ("B", "(B) cat", "The answer
       is B."). Case sensitive: "b" is no letter. The "A might be a quantifier" guard only runs in
       VLMEvalKit's verbose mode, so "A dog on a mat" picks A here as it does there.
    2. No option letter but a "Z" token, or one of its refusal phrases: the official 'Z' (always
       wrong) -> None.
    3. Two letters ("A or B") or none: exactly one option's text (lowercased) occurs in the
       lowercased reply -> its letter; skipped when the reply is longer than twice the options'
       total length."""
    if any(r in text for r in _MMB_REFUSALS):
        return None
    letters = OPTION_LETTERS[:num_options]
    mod = text
    for ch in _MMB_STRIP:
        mod = mod.replace(ch, " ")
    tokens = mod.split()
    hits = [c for c in letters if c in tokens]
    if len(hits) == 1:
        return hits[0]
    if not hits and "Z" in tokens:
        return None
    opts = [str(o).lower() for o in options[:num_options]]
    low = text.lower()
    if not opts or len(low) > 2 * sum(len(o) for o in opts):
        return None
    found = [letters[i] for i, o in enumerate(opts) if o in low]
    return found[0] if len(found) == 1 else None


def circular_accuracy(results: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """MMBench circular evaluation from (question group, correct) pairs, one per circular pass:
    a question is right only when all of its passes are. Also the single-pass accuracy (first pass)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for group, correct in results:
        groups[group].append(correct)
    n = len(groups)
    return {"circular_accuracy": sum(all(v) for v in groups.values()) / n if n else 0.0,
            "single_pass_accuracy": sum(v[0] for v in groups.values()) / n if n else 0.0, "questions": n}


# --------------------------------------------------------------------------------------------------
# Judged benchmarks: LLaVA-Bench, MM-Vet
# --------------------------------------------------------------------------------------------------

def parse_review_scores(review: str) -> tuple[float, float] | None:
    """The (assistant 1, assistant 2) scores on a review's first line, as eval_gpt_review_bench.py
    reads them ("8 7", "8,7"); None where it would return [-1, -1]. Like the official split on single
    spaces, "8, 7" (two spaces once the comma is replaced) is unparseable."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


def relative_scores(rows: Iterable[tuple[str, tuple[float, float] | None]]) -> dict:
    """LLaVA-Bench: per category and overall, mean model score / mean reference score x 100.

    `rows` are (category, (reference score, model score) or None for an unparseable review). Those
    are counted in `unparsed` and left out of the means (the official summary averages them in as -1)."""
    scores: dict[str, list[tuple[float, float]]] = defaultdict(list)
    unparsed: dict[str, int] = defaultdict(int)
    for category, pair in rows:
        for key in (category, "all"):
            if pair is None:
                unparsed[key] += 1
            else:
                scores[key].append(pair)
    out = {}
    for key in sorted(set(scores) | set(unparsed)):
        pairs = scores.get(key, [])
        ref = sum(p[0] for p in pairs) / len(pairs) if pairs else 0.0
        model = sum(p[1] for p in pairs) / len(pairs) if pairs else 0.0
        out[key] = {"relative": model / ref * 100 if ref else 0.0, "reference_mean": ref, "model_mean": model,
                    "judged": len(pairs), "unparsed": unparsed.get(key, 0)}
    return out


def parse_mmvet_score(reply: str) -> float | None:
    """MM-Vet's grader reply as mm-vet_evaluator.py reads it: the text before the first space,
    stripped, as a float in [0, 1]; None when it is not one ("0.5\nok" is unreadable there too)."""
    try:
        value = float(reply.split(" ")[0].strip())
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None
