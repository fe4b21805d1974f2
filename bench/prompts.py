"""The prompts the generation and serving benchmarks send: short code openings, as a code model's users type.

Its own module so that ``bench.generate`` does not import ``bench.serve`` and with it Ray Serve, which a GPU
host without Serve's web stack cannot import.
"""

PROMPTS = ["def main(", "import os\nimport sys\n", "class Config:\n    def __init__(self", "for i in range(",
           "return self.", "with open(path) as f:", "if __name__ == ", "raise ValueError("]
