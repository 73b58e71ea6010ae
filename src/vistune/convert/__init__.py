"""Checkpoint interop: read original-LLaVA and llava-hf folders, write llava-hf, merge LoRA.

`detect` tells a folder's format from its files and config fields (never its name); `llava_original`
and `llava_hf` read those formats into a vistune `Bundle`; `llava_hf` also writes one; `api` joins
them into `convert`, `merge_lora` and `load_any` (what `vistune convert`, `merge-lora` and `info` run).
"""
