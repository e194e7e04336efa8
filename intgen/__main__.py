from intgen.cli import app

app(prog_name="intgen")
