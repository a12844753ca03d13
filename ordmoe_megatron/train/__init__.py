"""``ordmoe-pretrain``: the built-in trainer (cli -> config -> build -> trainer)."""
