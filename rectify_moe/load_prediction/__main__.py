"""`python -m rectify_moe.load_prediction --workdir=RUN ...`: see `cli.py` and docs/load_prediction.md."""

from rectify_moe.load_prediction.cli import main

if __name__ == "__main__":
  main()
