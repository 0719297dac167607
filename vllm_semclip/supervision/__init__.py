"""Distant supervision of ψ: the VLM labels which crops help (``semclip label``, on Ray),
and ψ is fine-tuned on those labels (``semclip train-relevance``). Needs the ``train`` extra."""
