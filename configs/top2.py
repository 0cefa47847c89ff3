"""Paper variant 'top2' on the default tiny model (see configs/paper.py)."""

from configs import paper


def get_config():
  return paper.variant_config("top2")
