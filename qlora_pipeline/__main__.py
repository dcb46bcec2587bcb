from qlora_pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
