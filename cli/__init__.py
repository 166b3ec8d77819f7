"""The `sparc` command-line interface (installed as the `sparc_cli` package)."""
