"""The serving benchmark behind ``semclip bench serve`` (installed, so the command works
anywhere); ``benchmarks/`` holds the scripts that call it and their results."""
