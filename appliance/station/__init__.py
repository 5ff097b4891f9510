"""The station's inspection core: the staged pipeline (`pipeline`), what it produces (`inspection`), where it
reports (`sink`: the protocol every sink implements), the mode and fallback causes (`modes`), its typed
status snapshot (`status`), rolling statistics (`stats`) and the systemd watchdog (`watchdog`). Knows no
sink, store or network: those are reporting/, wired by runtime.py."""
