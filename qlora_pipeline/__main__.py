"""`python -m qlora_pipeline`: the same command line as `qlora-pipeline`."""

from qlora_pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
