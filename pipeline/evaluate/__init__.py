"""The evaluate step: FID and CLIP score on COCO, and the demo's caption match."""
