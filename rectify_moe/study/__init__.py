"""The study runner: the Rectify-Router paper's experiment as one command (see `__main__.py`).

`config.py` (the typed study config), `runner.py` (the runs: dense pretraining, upcycled variants x capacity factors
x seeds; resumable), `report.py` (tables with seed statistics, plots).
"""
