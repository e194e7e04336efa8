from intgen.cli import app

if __name__ == "__main__":  # a spawned worker process (vLLM's engine core) imports this module again
    app(prog_name="intgen")
