"""Side-by-side measurements of asr-merge against the plain ways, each run as ``python -m benchmarks.<name>``."""
