"""The VMM helper: discovery, save/load, migration and the saved-file layer."""
