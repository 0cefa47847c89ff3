"""The run config: typed sections (`schema`), their generic checks (`fields`), command-line overrides (`cli`) and
the generated reference (`reference`)."""
