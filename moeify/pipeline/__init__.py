"""Recipes and the runner that executes them: `recipe` (the validated description of a run), `checks`
(everything validated before the long work), `stages` (the one table of stages), `runner`, `demo`."""
