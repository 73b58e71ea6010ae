"""Data generation: LLaVA-style instruction data from captions and boxes, alignment sets, mixtures.

Flow: `sources` reads COCO / JSONL annotations into `ImageRecord`s; `context` renders a record as the
text a language-only teacher sees; `teachers` answer prompts built from `prompts/`; `parse` turns a
reply into LLaVA turns or a rejection reason; `instruct` runs it all, resumably. `align` builds
stage-1 caption data, `mix` converts academic VQA sets and combines sets with ratios.
"""
