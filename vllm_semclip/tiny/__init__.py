"""The factory of the bundled demo models: a tiny CLIP (the LLaVA's tower and ψ) and a tiny LLaVA.

Scenes and cards to train on, the trainers, the open_clip → Hugging Face conversion and the
builders that write checkpoints vLLM loads. The weights it produced ship in ``models/``.
Needs the ``demo`` extra (easy-vqa, scikit-image) to draw its material.
"""
