"""The stages a user runs, each one file, each a short sequence of named steps: train, evaluate, merge, publish,
infer (generate, chat). A stage uses the layers below it and never another stage."""
