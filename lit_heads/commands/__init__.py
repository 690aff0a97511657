"""Subcommands of `lit_heads` beyond LightningCLI's fit/validate/test: one module per command."""
