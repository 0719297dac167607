"""Evaluation: V*-layout benchmark data, the harness behind ``semclip eval``, box metrics,
pictures of selections, and the demo. Needs the ``eval`` extra (matplotlib) for plots."""
