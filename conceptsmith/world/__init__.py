"""ShapesWorld: a procedural captioned-image world and the micro models trained on it.

Submodules (import them explicitly; this package imports nothing heavy):
``vocab`` (the world's vocabulary and caption templates), ``render`` (deterministic renderer),
``tokenizer`` (CLIP BPE tokenizer from open_clip's bundled vocabulary), ``clip_train``
(contrastive training of the generator's text tower and of the open_clip evaluator).
"""
