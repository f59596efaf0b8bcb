from mi2b2.cli.main import run

run()
