"""The comparison runner behind `scripts/reproduce.py`: one first stage, every prior, one evaluation.

`spec` reads a `configs/repro/*.yaml` file, `steps` turns it into the training, caching, evaluation and
grid steps (each one a run of an existing script, each able to tell whether it is finished), `runner`
runs the unfinished ones in subprocesses with a progress display, and `table` writes the table, its JSON
and the plot from what the steps left on disk.
"""
