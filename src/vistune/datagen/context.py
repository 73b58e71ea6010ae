"""The symbolic context: how a language-only teacher "sees" an image, as in the LLaVA paper.

The captions, one per line, then (for `detail` and `complex`) one line per object,
`category: [x1, y1, x2, y2]`, corners normalised to [0, 1] with 3 decimals.
"""

from __future__ import annotations

from vistune.datagen.sources import ImageRecord


def symbolic_context(record: ImageRecord, with_boxes: bool) -> str:
    lines = list(record.captions)
    if with_boxes:
        for box in record.boxes:
            lines.append(f"{box.category}: [{', '.join(f'{v:.3f}' for v in box.bbox)}]")
    return "\n".join(lines)
