"""One module per ``lipverify`` sub-command."""
