from mpifedmeta.cli import entry

entry()
