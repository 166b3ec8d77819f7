"""``python -m sparc_cli``: the ``sparc`` command (what torchrun and the deepspeed launcher start)."""

from sparc_cli.main import main

main()
