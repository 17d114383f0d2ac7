"""GenEval (Ghosh et al. 2023), E-MMDiT's headline metric, as an evaluation step.

    rules.py     the protocol's verdict on one image, model-free (thresholds, counts, colours, positions)
    prompts.py   its 553 prompts and their metadata (shipped, with GenEval's licence in NOTICE), checked
    detector.py  Mask2Former (Swin-S, COCO instances) through transformers
    colour.py    the CLIP ViT-L/14 colour check through open_clip
    step.py      draw, detect, judge and score, resumably: results.jsonl and summary.json
"""
