"""`python -m lora_pipeline`: the `lora-pipeline` command."""

from lora_pipeline.cli import run

if __name__ == "__main__":
    run()
