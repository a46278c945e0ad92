"""The command line: serve, chat, calibrate, bench, load."""
