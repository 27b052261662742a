"""What the recipes share (dataset flags, YAML under CLI flags, where images come from, result files).

The library never imports this package; it ships with hf_cfft so that ``accelerate launch recipes/x.py`` works from
any directory and a pip-installed user can write their own scripts on the same flags (like TRL's ``trl.scripts``).
"""
